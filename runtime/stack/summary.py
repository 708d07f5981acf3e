"""The `duet run` summary: one JSON object (its keys are fixed: benches and checks read them)
and a human table, built from what each process left in the run dir: records typed beside
their writers (runtime/follower/records.py, runtime/planner/records.py; the sim's below)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

from rich.console import Console
from rich.table import Table

from runtime.config import DuetConfig
from runtime.follower.records import FollowerSummary
from runtime.ipc import endpoints
from runtime.ipc.follower_mode import LATCHED_MODES
from runtime.planner.records import PlannerSummary


class SimSummary(TypedDict):
    """What the sim (sim/server.py, outside the runtime) leaves in the run dir at exit."""

    episodes: int
    successes: int
    success_rate: float
    motor_reply_us: dict[str, float]  # the emulated motors' service time per request


Record = TypeVar("Record", FollowerSummary, PlannerSummary, SimSummary)


P2 = {"p50": 0.0, "p99": 0.0}
P3 = {**P2, "max": 0.0}


def _nothing_left(cfg: DuetConfig) -> tuple[FollowerSummary, PlannerSummary, SimSummary]:
    """The records of processes that left none (they crashed): what the summary then says."""
    follower: FollowerSummary = {
        "final_mode": "unknown", "final_reason": None, "target_hz": cfg.follower.hz,
        "achieved_hz": 0.0, "ticks": 0, "deadline_misses": 0,
        "period_jitter_us": {**P3, "p999": 0.0}, "tick_compute_us": P3, "bus_read_us": P3,
        "bus_write_us": P3, "logic_us": P3, "mode_counts": {}, "first_track_ns": None,
        "plan_delivery_us": P2, "plans_received": 0, "dropped_messages": {},
        "bus": {"errors": 0, "reads": 0, "writes": 0}, "safety": {}, "max_rss_mb": None}
    planner: PlannerSummary = {"plans": 0, "achieved_hz": 0.0, "latency_ms": P2,
                               "load_s": None, "first_plan_s": None,
                               "dropped_messages": {}, "inference_ms": P2, "stage_ms": {}}
    return follower, planner, {"episodes": 0, "successes": 0, "success_rate": 0.0,
                               "motor_reply_us": P3}


def _load(path: Path, empty: Record) -> Record:
    """The record a process left, over the empty one (keys it did not write keep theirs)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        loaded = {}
    return cast(Record, {**empty, **(loaded if isinstance(loaded, dict) else {})})


def _never_tracked(cfg: DuetConfig, fol: FollowerSummary, pla: PlannerSummary) -> str:
    """Why a run whose follower never tracked a plan only held, from the counts."""
    stale = fol["dropped_messages"].get("stale", 0)
    lat = pla["latency_ms"]
    why = f"the follower never tracked a plan: the planner published {pla['plans']}"
    if stale:
        return (f"{why}, {stale} dropped as stale (older than follower.plan_timeout_ms "
                f"{cfg.follower.plan_timeout_ms:g}; planner latency p50 {lat['p50']:g} ms, "
                f"p99 {lat['p99']:g} ms)")
    if not pla["plans"]:
        return f"{why} (no task? see `duet status` and the planner's log)"
    rejected = sum(fol["dropped_messages"].values())
    return f"{why}, the follower took {fol['plans_received']}, dropped {rejected}"


def build_summary(cfg: DuetConfig, config_label: str, run_dir: Path, duration_s: float,
                  t_start_ns: int, planner_restarts: int,
                  exit_codes: dict[str, int | None]) -> dict[str, Any]:
    no_fol, no_pla, no_sim = _nothing_left(cfg)
    fol = _load(run_dir / endpoints.FOLLOWER_SUMMARY, no_fol)
    pla = _load(run_dir / endpoints.PLANNER_SUMMARY, no_pla)
    sim = _load(run_dir / endpoints.SIM_SUMMARY, no_sim)
    first_track_ns = fol["first_track_ns"] or 0
    final_mode = fol["final_mode"]
    ok, reason = final_mode in ("HOLD", "TRACK"), fol["final_reason"]
    if ok and not first_track_ns:
        ok, reason = False, _never_tracked(cfg, fol, pla)
    summary: dict[str, Any] = {
        # first: how the run ended (a FAULT, or a robot that only held, never looks like a
        # success)
        "outcome": {"ok": ok, "final_mode": final_mode, "reason": reason},
        "config": config_label,
        "duration_s": round(duration_s, 2),
        "follower": {
            "target_hz": fol["target_hz"],
            "achieved_hz": fol["achieved_hz"],
            "ticks": fol["ticks"],
            "deadline_misses": fol["deadline_misses"],
            "period_jitter_us": fol["period_jitter_us"],
            "tick_compute_us": fol["tick_compute_us"],
            "mode_counts": fol["mode_counts"],
            "bus_read_us": fol["bus_read_us"],
            "bus_write_us": fol["bus_write_us"],
            "logic_us": fol["logic_us"],
            "max_rss_mb": fol["max_rss_mb"],
            "final_mode": final_mode,
            "dropped_messages": fol["dropped_messages"],
        },
        "planner": {
            "plans": pla["plans"],
            "achieved_hz": pla["achieved_hz"],
            "latency_ms": pla["latency_ms"],
            "load_s": pla["load_s"],
            "first_plan_s": pla["first_plan_s"],
            "inference_ms": pla["inference_ms"],
            "restarts": planner_restarts,
            "stage_ms": pla["stage_ms"],
            "dropped_messages": pla["dropped_messages"],
        },
        "plan_delivery_us": fol["plan_delivery_us"],
        "bus": fol["bus"],
        "safety": {k: fol["safety"].get(k, 0)
                   for k in ("faults", "clamped_commands", "estops")},
        "startup": {"first_track_s": round((first_track_ns - t_start_ns) / 1e9, 3)
                    if first_track_ns else None},
        "dropped_messages": fol["dropped_messages"],
        "exit_codes": exit_codes,
    }
    if cfg.planner.remote is not None:  # the relay's figures (runtime/remote/relay.py)
        got = pla.get("remote")
        remote: dict[str, Any] = got if isinstance(got, dict) else {}
        figures: dict[str, Any] = {
            "endpoint": cfg.planner.remote.endpoint, "secure": not cfg.planner.remote.insecure,
            "round_trip_ms": remote.get("round_trip_ms", {"p50": 0.0, "p99": 0.0})}
        for key in ("server_ms", "connects", "disconnects", "refused", "dropped"):
            if key in remote:
                figures[key] = remote[key]
        summary["planner"]["remote"] = figures
    if fol["safety"].get("last_reason"):
        summary["safety"]["last_reason"] = fol["safety"]["last_reason"]
    if cfg.sim is not None and cfg.sim.enabled:
        summary["task"] = {"episodes": sim["episodes"],
                           "successes": sim["successes"],
                           "success_rate": sim["success_rate"]}
        summary["sim"] = {"motor_reply_us": sim["motor_reply_us"]}
    return summary


def print_summary(s: dict[str, Any]) -> None:
    f, p = s["follower"], s["planner"]
    console = Console()
    outcome = s["outcome"]
    if not outcome["ok"] and outcome["final_mode"] in (*LATCHED_MODES, "unknown"):
        # the run is over: no `duet reset` to send; what the next run does instead
        after = "a sim run starts unlatched" if "task" in s else \
            "the next run starts latched: fix the cause, start it, then duet reset"
        console.print(f"[bold red]follower ended in {outcome['final_mode']}: "
                      f"{outcome['reason']}[/] ({after})")
    elif not outcome["ok"]:
        console.print(f"[bold red]not ok: {outcome['reason']}[/]")
    table = Table(title=f"duet run — {s['config']} — {s['duration_s']} s", show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    j, c = f["period_jitter_us"], f["tick_compute_us"]
    rows = [
        ("follower rate (target / achieved)", f"{f['target_hz']:g} / {f['achieved_hz']:g} Hz"),
        ("ticks / deadline misses", f"{f['ticks']} / {f['deadline_misses']}"),
        ("period jitter p50/p99/p99.9/max",
         f"{j['p50']}/{j['p99']}/{j.get('p999', 0)}/{j['max']} µs"),
        ("tick compute p50/p99/max", f"{c['p50']}/{c['p99']}/{c['max']} µs"),
        ("  bus read / write / the rest p50",
         f"{f['bus_read_us']['p50']} / {f['bus_write_us']['p50']} / {f['logic_us']['p50']} µs"),
        ("modes (ticks)", ", ".join(f"{k}={v}" for k, v in f["mode_counts"].items() if v)),
        ("planner plans / rate", f"{p['plans']} / {p['achieved_hz']:g} Hz"),
        ("planner latency p50/p99", f"{p['latency_ms']['p50']}/{p['latency_ms']['p99']} ms"),
        ("planner start → loaded / first plan", f"{p['load_s']} / {p['first_plan_s']} s"),
        *([("off-board planner round trip p50/p99",
            f"{p['remote']['round_trip_ms']['p50']}/{p['remote']['round_trip_ms']['p99']} ms "
            f"({p['remote']['endpoint']})")] if "remote" in p else []),
        ("plan delivery p50/p99",
         f"{s['plan_delivery_us']['p50']}/{s['plan_delivery_us']['p99']} µs"),
        ("bus reads / writes / errors",
         f"{s['bus']['reads']} / {s['bus']['writes']} / {s['bus']['errors']}"),
        ("safety faults / clamped / estops",
         f"{s['safety']['faults']} / {s['safety']['clamped_commands']} / {s['safety']['estops']}"),
        ("start → first tracked command", f"{s['startup']['first_track_s']} s"),
    ]
    if f.get("max_rss_mb") is not None:
        rows.append(("follower max RSS", f"{f['max_rss_mb']} MB"))
    if "task" in s:
        t = s["task"]
        rows.append(("task episodes / successes",
                     f"{t['episodes']} / {t['successes']} ({100 * t['success_rate']:.0f} %)"))
    if "sim" in s:
        r = s["sim"]["motor_reply_us"]
        rows.append(("sim motors: reply p50/p99/max", f"{r['p50']}/{r['p99']}/{r['max']} µs"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
