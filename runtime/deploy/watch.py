"""After an activation: watch the new bundle's health on the live robot and roll back by
itself on a regression.

`duet bundle activate` (runtime/commands/bundle.py `arm`) takes a baseline from the live
robot's telemetry before the switch -- the follower's deadline-miss ratio and faults, its
tracking error while it tracks, the planner's latency -- and leaves the pending watch in the
store (PENDING: it outlives the restart that loads the new bundle, and a reboot). Then
`duet bundle watch` (`watch`, below; started by `duet run` beside the planner, by
duet-watch.service under systemd) waits for the planner to plan with the new version, watches
it for `bundle.watch.window_s`, and compares: a fault, a planner that never plans with it, or a
figure over baseline x ratio + margin is a regression. An ESTOP is the operator's (or the
e-stop input's), not the bundle's: the watch pauses while it is latched and goes on after
`duet reset`, its clocks stopped meanwhile. The rollback is the store's own
(`BundleStore.rollback`: one place), logged once with the reason, and the outcome is kept in
the store and in the run dir (WATCH_REPORT: `duet status` shows it). The services are then
restarted to load the previous bundle: under systemd by `systemctl restart` of the follower
and the planner, under `duet run` by the supervisor (the watch exits RESTART_STACK_EXIT).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from runtime.config import ActivationWatch, DuetConfig
from runtime.deploy.bundle_store import BundleStore
from runtime.ipc import endpoints
from runtime.ipc.messages import MessageError, unpack_array
from runtime.observe.rollout import WatchRecord
from runtime.observe.subscriber import TelemetrySubscriber

log = logging.getLogger("duet.watch")

PENDING = "watch.json"  # in the store: the activation to watch, its baseline, then the outcome
SAMPLE_S = 0.1
SYSTEMD_RESTART = ["systemctl", "restart", "duet-follower.service", "duet-planner.service"]


class Health(TypedDict):
    """The robot's health over a stretch of telemetry."""

    samples: int  # follower telemetry samples
    miss_ratio: float  # the follower's deadline misses over its ticks, mean
    faulted: str | None  # FAULT/ESTOP seen, with its reason
    tracking_p95_rad: float | None  # p95 of the worst joint's |tracking error| while tracking
    latency_p99_ms: float | None  # the planner's, its newest (over its last plans)
    plans: int  # the planner's plan count, newest


class Sampler:
    """Telemetry samples in, `Health` out."""

    def __init__(self) -> None:
        self.misses: list[float] = []
        self.tracking: list[float] = []
        self.faulted: str | None = None
        self.latency_p99: float | None = None
        self.plans = 0
        self.estopped = False  # the newest follower sample was in ESTOP

    def follower(self, t: dict[str, Any]) -> None:
        mode = t.get("mode")
        self.estopped = mode == "ESTOP"
        if self.estopped:
            return  # the operator's stop: nothing in it says how the bundle does
        health = t.get("health")
        if isinstance(health, dict) and isinstance(health.get("miss_ratio"), (int, float)):
            self.misses.append(float(health["miss_ratio"]))
        if mode == "FAULT" and self.faulted is None:
            self.faulted = f"the follower entered FAULT: {t.get('fault_reason')}"
        if mode == "TRACK":
            try:
                err = unpack_array(t.get("tracking_error"), "tracking_error")
            except MessageError:
                return
            if err.size and np.isfinite(err).all():
                self.tracking.append(float(np.abs(err).max()))

    def planner(self, t: dict[str, Any]) -> None:
        p99 = (t.get("latency_ms") or {}).get("p99") if isinstance(t, dict) else None
        if isinstance(p99, (int, float)) and t.get("plans"):
            self.latency_p99 = float(p99)
        if isinstance(t.get("plans"), int):
            self.plans = t["plans"]

    def health(self) -> Health:
        return {"samples": len(self.misses),
                "miss_ratio": round(float(np.mean(self.misses)), 5) if self.misses else 0.0,
                "faulted": self.faulted,
                "tracking_p95_rad": round(float(np.percentile(self.tracking, 95)), 5)
                if self.tracking else None,
                "latency_p99_ms": self.latency_p99, "plans": self.plans}


def sample(sub: TelemetrySubscriber, sampler: Sampler, seconds: float,
           planner_ok: Callable[[dict[str, Any]], bool] = lambda _: True,
           stop: Callable[[], bool] = lambda: False) -> None:
    """`seconds` of telemetry into `sampler` (each source's newest every SAMPLE_S); the
    planner's only while `planner_ok` says it is the one watched."""
    seen: dict[str, float] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop():
        sub.poll(SAMPLE_S)
        for source, at in sub.received_at.items():
            if seen.get(source) == at:
                continue
            seen[source] = at
            msg = sub.latest[source]
            if source == "follower":
                sampler.follower(msg)
            elif planner_ok(msg):
                sampler.planner(msg)
        time.sleep(SAMPLE_S)


class RunningClock:
    """Seconds watched, not counting those the follower spent in ESTOP (logged once each)."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.seconds = 0.0
        self._last = time.monotonic()
        self._paused = False

    def tick(self, sampler: Sampler) -> float:
        now = time.monotonic()
        if sampler.estopped != self._paused:
            self._paused = sampler.estopped
            log.info("watch of %s %s", self.version,
                     "paused: the follower is in ESTOP (it goes on after duet reset)"
                     if self._paused else "resumed: the follower is out of ESTOP")
        elif not self._paused:
            self.seconds += now - self._last
        self._last = now
        return self.seconds


def baseline(run_dir: str, seconds: float) -> Health | None:
    """The live robot's health now (None: no follower and planner telemetry to take it from)."""
    sub = TelemetrySubscriber(run_dir)
    try:
        if set(sub.sample(min(seconds, 2.0))) != {"follower", "planner"}:
            return None
        sampler = Sampler()
        sample(sub, sampler, seconds)
    finally:
        sub.close()
    return sampler.health()


def regression(base: Health | None, now: Health, w: ActivationWatch) -> str | None:
    """Why `now` is worse than `base` (None: it is not). Without a baseline only a fault
    counts."""
    if now["faulted"]:
        return now["faulted"]
    if base is None:
        return None
    checks = [("planner latency p99", base["latency_p99_ms"], now["latency_p99_ms"],
               w.latency_ratio, w.latency_margin_ms, "ms"),
              ("tracking error p95", base["tracking_p95_rad"], now["tracking_p95_rad"],
               w.tracking_ratio, w.tracking_margin_rad, "rad"),
              ("deadline-miss ratio", base["miss_ratio"], now["miss_ratio"], 1.0,
               w.miss_ratio_margin, "")]
    for name, was, is_, ratio, margin, unit in checks:
        if was is not None and is_ is not None and is_ > was * ratio + margin:
            return (f"{name} {is_:g} {unit} over the baseline {was:g} {unit} x {ratio:g} + "
                    f"{margin:g}").replace("  ", " ")
    return None


def _write(path: Path, record: WatchRecord) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def record(store: BundleStore, run_dir: str, rec: WatchRecord) -> None:
    """The watch's record, in the store (it outlives restarts) and the run dir (status)."""
    _write(store.root / PENDING, rec)
    try:
        _write(Path(run_dir) / endpoints.WATCH_REPORT, rec)
    except OSError:
        pass  # no run dir (nothing runs): the store's copy is the record


def arm(store: BundleStore, cfg: DuetConfig, version: str, previous: str | None,
        base: Health | None) -> WatchRecord:
    """The pending watch for `version`, just activated over `previous`."""
    rec: WatchRecord = {
        "state": "armed", "version": version, "previous": previous, "baseline": base,
        "window_s": cfg.bundle.watch.window_s, "armed_unix_s": round(time.time(), 3),
        "reason": None}
    record(store, cfg.run_dir, rec)
    return rec


def pending(store: BundleStore) -> WatchRecord | None:
    try:
        rec = json.loads((store.root / PENDING).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("state") not in ("armed", "watching") \
            or not isinstance(rec.get("version"), str):
        return None
    return WatchRecord(**rec)


def watch(store: BundleStore, cfg: DuetConfig, stop: Callable[[], bool] = lambda: False
          ) -> WatchRecord | None:
    """Watch the pending activation, if any, and roll back on a regression; the record (None:
    nothing to watch)."""
    rec = pending(store)
    if rec is None:
        return None
    version, w = rec["version"], cfg.bundle.watch
    current = store.current_version()
    if current != version:
        rec.update({"state": "superseded", "reason": f"{current} is current, not {version}"})
        record(store, cfg.run_dir, rec)
        return rec
    rec["state"] = "watching"
    record(store, cfg.run_dir, rec)
    log.info("watching %s for %g s after its first plan (baseline: %s)", version, w.window_s,
             rec.get("baseline"))
    sub = TelemetrySubscriber(cfg.run_dir)
    runs = lambda t: t.get("bundle") == version  # noqa: E731
    why: str | None = None
    try:
        first = Sampler()  # the restart and the load, up to its first plan
        clock = RunningClock(version)
        while not (stop() or first.plans or first.faulted) \
                and clock.tick(first) < w.start_timeout_s:
            sample(sub, first, 0.5, runs, stop)
        if first.faulted or not (first.plans or stop()):
            why = first.faulted or f"{version} made no plan within " \
                f"bundle.watch.start_timeout_s {w.start_timeout_s:g} s"
        elif not stop():
            window = Sampler()
            clock = RunningClock(version)
            while not (stop() or window.faulted) and clock.tick(window) < w.window_s:
                sample(sub, window, 0.5, runs, stop)
            rec["health"] = window.health()
            why = regression(rec.get("baseline"), rec["health"], w)
    finally:
        sub.close()
    if stop() and why is None:
        rec["state"] = "armed"  # stopped before the end: watched again at the next start
        record(store, cfg.run_dir, rec)
        return rec
    if why is None:
        rec["state"] = "passed"
        log.info("activation of %s passed its watch: %s", version, rec.get("health"))
    else:
        back = store.rollback()
        rec.update({"state": "rolled_back", "reason": why, "current": back,
                    "rolled_back_unix_s": round(time.time(), 3)})
        log.error("automatic rollback: %s -> %s: %s", version, back, why)
    record(store, cfg.run_dir, rec)
    return rec


def restart_services() -> None:
    """Under systemd (the watch runs as root): the follower and the planner load the bundle
    now current."""
    subprocess.run(SYSTEMD_RESTART, check=False, timeout=120)
