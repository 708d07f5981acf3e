"""The follower loop's figures: per-tick samples and counters, and the records made of them
(its health, telemetry and summary; types in runtime/follower/records.py).

The process shell adds a sample per tick (`add_*`: a ring write, no allocation); records are
built only in the tick's slack (telemetry) or at exit (summary). Given the same core and
samples, what a test or a bench builds here is exactly what the robot publishes.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Mapping

import numpy as np

from drivers.bus import BusStats
from runtime.config import DuetConfig
from runtime.follower.core import FollowerCore
from runtime.follower.records import FollowerHealth, FollowerSummary, FollowerTelemetry
from runtime.follower.safety import Mode
from runtime.ipc.messages import pack_array
from runtime.ipc.stats import Ring, summarize

RING_CAPACITY = 1 << 21  # ~35 min at 1 kHz of per-tick samples for the exit summary


class LoopFigures:
    def __init__(self, cfg: DuetConfig) -> None:
        self.cfg = cfg
        self.hz = cfg.follower.hz
        self.period_us = round(1e9 / cfg.follower.hz) / 1000.0
        self.ticks = 0
        self.deadline_misses = 0
        self.plans_received = 0
        self.dropped: dict[str, int] = {}  # the shell's own drops, by reason
        self.periods = Ring(RING_CAPACITY)  # wake to wake, µs
        self.compute = Ring(RING_CAPACITY)  # wake to the tick's end, µs
        self.missed = Ring(1 << 12)  # 1.0 per late tick, for the health window
        self.delivery = Ring(1 << 16)  # planner send -> follower take, µs
        self.read_us = Ring(RING_CAPACITY)  # bus read (the wire + the motors' reply)
        self.write_us = Ring(RING_CAPACITY)
        self.logic_us = Ring(RING_CAPACITY)  # everything between read and write (no bus I/O)

    def tick(self, period_us: float, compute_us: float, missed: bool) -> None:
        self.periods.add(period_us)
        self.compute.add(compute_us)
        self.missed.add(1.0 if missed else 0.0)
        self.ticks += 1
        if missed:
            self.deadline_misses += 1

    def plan_taken(self, delivery_us: float) -> None:
        self.delivery.add(delivery_us)
        self.plans_received += 1

    def drop(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1

    def dropped_messages(self, *counters: Mapping[str, int]) -> dict[str, int]:
        """The shell's drops plus those counted elsewhere (the core's plan refusals, the
        control server's, the access checks'), by reason."""
        out = dict(self.dropped)
        for source in counters:
            for k, v in source.items():
                out[k] = out.get(k, 0) + v
        return out

    def health(self, core: FollowerCore) -> FollowerHealth:
        """The last second against the configured thresholds; `problems` says why not ok."""
        window = max(1, int(self.hz))
        periods = self.periods.values(window)
        missed = self.missed.values(window)
        hz = float(1e6 / periods.mean()) if periods.size else 0.0
        miss_ratio = float(missed.mean()) if missed.size else 0.0
        h = self.cfg.follower.health
        problems = []
        if core.latched:
            problems.append(f"{core.mode.name}: {core.reason}")
        if periods.size and hz < h.min_rate_ratio * self.hz:
            problems.append(f"loop at {hz:.0f} Hz, below {h.min_rate_ratio:.0%} of "
                            f"{self.hz:g} Hz")
        if miss_ratio > h.max_miss_ratio:
            problems.append(f"{miss_ratio:.1%} of ticks missed their deadline in the last "
                            f"second (limit {h.max_miss_ratio:.1%})")
        return {"ok": not problems, "problems": problems, "achieved_hz": round(hz, 2),
                "miss_ratio": round(miss_ratio, 5)}

    def telemetry(self, core: FollowerCore, bus: BusStats, q: np.ndarray, torque_on: bool,
                  dropped: dict[str, int]) -> FollowerTelemetry:
        window = int(self.hz)
        periods = self.periods.values(window)
        health = self.health(core)
        return {
            "source": "follower",
            "mode": core.mode.name,
            "fault_reason": core.reason if core.latched else None,
            "health": health,
            "target_hz": self.hz,
            "achieved_hz": health["achieved_hz"],
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "period_jitter_us": summarize(np.abs(periods - self.period_us)),
            "tick_compute_us": summarize(self.compute.values(window)),
            "plan_age_ms": round((time.monotonic_ns() - core.newest_t_obs_ns) / 1e6, 1)
            if core.newest_t_obs_ns else None,
            "plan_delivery_us": summarize(self.delivery.values(100), ("p50", "p99")),
            "plans": self.plans_received,
            "dropped_messages": dropped,
            "torque_on": torque_on,
            "bus": {"reads": bus.reads, "writes": bus.writes, "errors": bus.errors,
                    "retries": bus.retries, "crc_errors": bus.crc_errors,
                    "timeouts": bus.timeouts, "dropped_frames": dict(bus.dropped_frames)},
            "safety": {"faults": core.faults, "clamped_commands": core.filter.clamped,
                       "estops": core.estops},
            "joint_names": list(self.cfg.robot.joints),
            "q": pack_array(q),
            "tracking_error": pack_array(core.tracker.ref_now - q),
        }

    def summary(self, core: FollowerCore, bus: BusStats,
                dropped: dict[str, int]) -> FollowerSummary:
        periods = self.periods.values()
        elapsed = periods.sum() / 1e6 if periods.size else 0.0
        return {
            "final_mode": core.mode.name,
            "final_reason": core.reason if core.latched else None,
            "target_hz": self.hz,
            "achieved_hz": round(periods.size / elapsed, 2) if elapsed else 0.0,
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "period_jitter_us": summarize(np.abs(periods - self.period_us),
                                          ("p50", "p99", "p999", "max")),
            "tick_compute_us": summarize(self.compute.values()),
            "bus_read_us": summarize(self.read_us.values(), ("p50", "p99")),
            "bus_write_us": summarize(self.write_us.values(), ("p50", "p99")),
            "logic_us": summarize(self.logic_us.values(), ("p50", "p99")),
            "mode_counts": {m.name: int(core.mode_ticks[m]) for m in Mode},
            "first_track_ns": core.first_track_ns,
            "plan_delivery_us": summarize(self.delivery.values(), ("p50", "p99")),
            "plans_received": self.plans_received,
            "dropped_messages": dropped,
            "bus": {"errors": bus.errors, "reads": bus.reads, "writes": bus.writes},
            "safety": {"faults": core.faults, "clamped_commands": core.filter.clamped,
                       "estops": core.estops, "last_reason": core.reason},
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
