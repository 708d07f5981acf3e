"""Soak: the whole sim stack (`duet run`) for a given time, sampled every few seconds: each
process's resident memory (from /proc), the follower's misses and tick figures, the planner's
latency, from the telemetry the stack publishes anyway.

    .venv/bin/python -m bench.soak --duration 600 [--every 10] [--csv soak.csv] [--png soak.png]

Prints one row per sample (RSS per process in MB; misses in that interval; the last
second's tick compute and plan delivery p99) and the exit summary's figures. What it shows:
RSS flat after the first minute, misses that do not grow with time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from runtime.ipc import endpoints
from runtime.ipc.messages import decode

REPO = Path(__file__).resolve().parents[1]
PROCESSES = ("follower", "planner", "sim", "sim-servos")  # sim-servos: the sim's child


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def stack_processes(root: int) -> dict[str, int]:
    """The stack's processes by name (DUET_PROCESS, as `duet run` sets it); a process
    started by a named one (the sim's servo process) is "<name>-servos"."""
    found: dict[str, int] = {}

    def walk(pid: int, parent: str | None) -> None:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return
        name = next((e.split(b"=", 1)[1].decode() for e in env
                     if e.startswith(b"DUET_PROCESS=")), None)
        if name is not None and parent == name:
            name = f"{name}-servos"
        if name is not None:
            found.setdefault(name, pid)
        for child in children(pid):
            walk(child, name)

    for child in children(root):
        walk(child, None)
    return found


class Telemetry:
    """The newest telemetry record of each process (non-blocking drain)."""

    def __init__(self, run_dir: str) -> None:
        self.ctx = zmq.Context()
        self.socks = {}
        for source in ("follower", "planner"):
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.RCVHWM, 64)
            sock.connect(endpoints.telemetry(run_dir, source))
            self.socks[source] = sock
        self.latest: dict[str, dict[str, Any]] = {}

    def drain(self) -> None:
        for source, sock in self.socks.items():
            while True:
                try:
                    msg = decode(sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if msg["type"] == "telemetry":  # the planner's socket carries plans too
                    self.latest[source] = msg

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600.0, help="seconds")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--config", default=str(REPO / "configs/sim.yaml"))
    ap.add_argument("--set", action="append", default=[], help="config overrides, as duet run")
    ap.add_argument("--csv", default=None, help="write the samples here")
    ap.add_argument("--png", default=None, help="plot RSS and misses over time here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="duet-soak-") as run_dir:
        summary_path = Path(run_dir) / "summary.json"
        cmd = [sys.executable, "-m", "runtime.cli", "run", "--config", args.config,
               "--set", f"run_dir={run_dir}", "--duration", str(args.duration),
               "--summary-json", str(summary_path)]
        for override in args.set:
            cmd += ["--set", override]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        telemetry = Telemetry(run_dir)
        rows: list[dict[str, Any]] = []
        t0 = time.monotonic()
        next_sample = t0 + min(args.every, 5.0)  # one sample early: the start-up footprint
        last_misses = 0
        head = (f"{'t_s':>6} " + " ".join(f"{p + ' MB':>14}" for p in PROCESSES)
                + f" {'misses':>7} {'ticks':>9} {'compute p99':>11} {'delivery p99':>12}"
                  f" {'planner p99 ms':>14}")
        print(head, flush=True)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                telemetry.drain()
                if time.monotonic() < next_sample:
                    continue
                next_sample += args.every
                names = stack_processes(proc.pid)
                fol = telemetry.latest.get("follower", {})
                pla = telemetry.latest.get("planner", {})
                misses = int(fol.get("deadline_misses", 0))
                row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 1)}
                for name in PROCESSES:
                    rss = rss_mb(names[name]) if name in names else None
                    row[f"{name}_rss_mb"] = None if rss is None else round(rss, 1)
                row |= {"misses": misses - last_misses, "ticks": fol.get("ticks", 0),
                        "compute_p99_us": fol.get("tick_compute_us", {}).get("p99"),
                        "delivery_p99_us": fol.get("plan_delivery_us", {}).get("p99"),
                        "planner_p99_ms": pla.get("latency_ms", {}).get("p99")}
                last_misses = misses
                rows.append(row)
                print(f"{row['t_s']:>6} " + " ".join(
                    f"{row[f'{p}_rss_mb'] if row[f'{p}_rss_mb'] is not None else '-':>14}"
                    for p in PROCESSES)
                    + f" {row['misses']:>7} {row['ticks']:>9} {row['compute_p99_us']!s:>11}"
                      f" {row['delivery_p99_us']!s:>12} {row['planner_p99_ms']!s:>14}",
                    flush=True)
        except KeyboardInterrupt:
            os.kill(proc.pid, signal.SIGINT)
        proc.wait()
        telemetry.close()
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    report(rows, summary)
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.png and rows:
        plot(rows, args.png)


def report(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """RSS growth after the first minute, per process, and the exit summary's figures."""
    settled = [r for r in rows if r["t_s"] >= 60.0] or rows[-1:]
    for name in PROCESSES:
        series = [r[f"{name}_rss_mb"] for r in settled if r[f"{name}_rss_mb"] is not None]
        if series:
            print(f"{name}: RSS {series[0]} MB at {settled[0]['t_s']} s -> {series[-1]} MB at "
                  f"{settled[-1]['t_s']} s (max {max(series)} MB)")
    f = summary.get("follower", {})
    if f:
        print(f"follower summary: {f.get('ticks')} ticks, {f.get('deadline_misses')} misses, "
              f"faults {f.get('safety', {}).get('faults')}, logic_us {f.get('logic_us')}, "
              f"tick_compute_us {f.get('tick_compute_us')}, max_rss_mb {f.get('max_rss_mb')}")
    sim = summary.get("sim", {})
    if sim:
        print(f"sim: {sim.get('successes')}/{sim.get('episodes')} episodes")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["t_s"] for r in rows]
    fig, (ax_rss, ax_miss) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for name in PROCESSES:
        ys = [r[f"{name}_rss_mb"] for r in rows]
        if any(y is not None for y in ys):
            ax_rss.plot(t, ys, label=name)
    ax_rss.set_ylabel("RSS, MB")
    ax_rss.legend()
    ax_miss.plot(t, [r["misses"] for r in rows], label="follower misses per sample")
    ax_miss.set_ylabel("misses")
    ax_miss.set_xlabel("s")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
