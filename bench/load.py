"""A bounded, reproducible heavy load to run beside a stack: busy processes, a multi-threaded
numpy job, memory churn, disk churn and, optionally, a second sim stack. It stops by itself
after `--duration` seconds (or on SIGTERM/SIGINT), taking every process it started with it.

    .venv/bin/python -m bench.load --duration 120 [--busy 16] [--numpy-threads 2]
        [--memory-mb 256] [--disk-mb 64] [--second-stack]

"The bench load" of docs/benchmarks.md is the defaults plus `--second-stack`. Every worker
does the same work in the same order on every run (fixed seeds, fixed sizes); how much of
it gets done depends on the machine, which is the point.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def busy(end: float) -> None:
    """One core's worth of pure-Python work (the interpreter never sleeps)."""
    x = 0
    while time.monotonic() < end:
        for i in range(10_000):
            x = (x * 31 + i) % 1_000_003


def numpy_job(end: float, threads: int) -> None:
    """Matrix products on `threads` BLAS threads: a multi-threaded numeric job (an export,
    a training step) that wants every core."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 400)), rng.standard_normal((400, 400))
    while time.monotonic() < end:
        a = np.tanh(a @ b)


def memory_churn(end: float, megabytes: int) -> None:
    """Touch and free `megabytes` in 16 MB blocks, over and over: page faults, reclaim."""
    block = 16 << 20
    while time.monotonic() < end:
        held = [bytearray(block) for _ in range(max(1, megabytes // 16))]
        for buf in held:
            buf[::4096] = b"\x01" * len(buf[::4096])
        del held


def disk_churn(end: float, megabytes: int, directory: str) -> None:
    """Write, fsync and delete `megabytes` in 4 MB files: block I/O and its interrupts."""
    chunk = os.urandom(4 << 20)
    i = 0
    while time.monotonic() < end:
        path = Path(directory, f"churn-{i % 16}")
        with open(path, "wb") as f:
            for _ in range(max(1, megabytes // 4)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        i += 1


def second_stack(duration_s: float, run_dir: str) -> subprocess.Popen[bytes]:
    """Another sim stack on this machine (its follower takes a free core, or says it shares)."""
    cmd = [sys.executable, "-m", "runtime.cli", "run", "--config", str(REPO / "configs/sim.yaml"),
           "--set", f"run_dir={run_dir}", "--duration", str(duration_s)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))


class Load:
    """The load as a context manager: started on enter, stopped (all of it) on exit."""

    def __init__(self, duration_s: float, busy_procs: int = 16, numpy_threads: int = 2,
                 memory_mb: int = 256, disk_mb: int = 64, stack: bool = False) -> None:
        self.duration_s = duration_s
        self.spec = (busy_procs, numpy_threads, memory_mb, disk_mb, stack)
        self.procs: list[Any] = []
        self.tmp = tempfile.TemporaryDirectory(prefix="duet-load-")
        self.stack: subprocess.Popen[bytes] | None = None

    def describe(self) -> str:
        busy_procs, threads, memory_mb, disk_mb, stack = self.spec
        return (f"{busy_procs} busy processes, numpy on {threads} threads, {memory_mb} MB "
                f"memory churn, {disk_mb} MB disk churn"
                + (", a second sim stack" if stack else ""))

    def __enter__(self) -> Load:
        busy_procs, threads, memory_mb, disk_mb, stack = self.spec
        end = time.monotonic() + self.duration_s
        ctx = mp.get_context("spawn")  # nothing of the caller's state in the workers
        jobs: list[tuple[Any, tuple[Any, ...]]] = [(busy, (end,))] * busy_procs
        if threads:
            jobs.append((numpy_job, (end, threads)))
        if memory_mb:
            jobs.append((memory_churn, (end, memory_mb)))
        if disk_mb:
            jobs.append((disk_churn, (end, disk_mb, self.tmp.name)))
        for target, args in jobs:
            proc = ctx.Process(target=target, args=args, daemon=True)
            proc.start()
            self.procs.append(proc)
        if stack:
            self.stack = second_stack(self.duration_s, str(Path(self.tmp.name) / "run"))
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5.0)
        if self.stack is not None and self.stack.poll() is None:
            self.stack.send_signal(signal.SIGINT)
            try:
                self.stack.wait(15.0)
            except subprocess.TimeoutExpired:
                self.stack.kill()
                self.stack.wait()
        self.tmp.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds, then it stops")
    ap.add_argument("--busy", type=int, default=16, help="busy processes")
    ap.add_argument("--numpy-threads", type=int, default=2)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--disk-mb", type=int, default=64)
    ap.add_argument("--second-stack", action="store_true")
    args = ap.parse_args()
    load = Load(args.duration, args.busy, args.numpy_threads, args.memory_mb, args.disk_mb,
                args.second_stack)

    def _stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"load for {args.duration:g} s: {load.describe()}", flush=True)
    with load:
        try:
            end = time.monotonic() + args.duration
            while time.monotonic() < end:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    print("load stopped", flush=True)


if __name__ == "__main__":
    main()
