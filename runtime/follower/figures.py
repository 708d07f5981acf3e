"""The follower loop's figures: per-tick samples and counters, and the records made of them
(its health, telemetry and summary; types in runtime/follower/records.py).

The process shell adds a sample per tick (one store into a preallocated ring), folded into
the run's histograms in batches in the tick's slack: memory is fixed at start, so RSS stays
put for weeks. Records are built only in the tick's slack (telemetry,
from the last second's raw samples) or at exit (summary, from the whole run's histograms).
Given the same core and samples, what a test or a bench builds here is exactly what the robot
publishes.
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
from runtime.ipc.stats import Histogram, Ring, Series, summarize

WINDOW = 1 << 12  # raw per-tick samples kept: the health window (a second up to 4 kHz)
FOLD_EVERY = 512  # ticks between folds of the raw samples into the run's histograms (slack)
FOLD_FORCED = WINDOW - 64  # with no slack for this long, fold in the tick: never lose one
DELIVERY_WINDOW = 100  # the last plans' delivery times, for telemetry


class LoopFigures:
    def __init__(self, cfg: DuetConfig) -> None:
        self.cfg = cfg
        self.hz = cfg.follower.hz
        self.period_us = round(1e9 / cfg.follower.hz) / 1000.0
        self.ticks = 0
        self.deadline_misses = 0
        self.plans_received = 0
        self.dropped: dict[str, int] = {}  # the shell's own drops, by reason
        self.elapsed_us = 0.0  # sum of the periods
        self._folded_at = 0  # `ticks` at the last fold
        # per tick: the last WINDOW raw (health, telemetry), the whole run bucketed (summary)
        self.periods = Series(WINDOW, Histogram(lowest=0.01),  # wake to wake, µs; its
                              lambda p: np.abs(p - self.period_us))  # histogram: the jitter
        self.compute = Series(WINDOW)  # wake to the tick's end, µs
        self.read_us = Series(WINDOW)  # bus read (the wire + the motors' reply)
        self.write_us = Series(WINDOW)
        self.logic_us = Series(WINDOW)  # everything between read and write (no bus I/O)
        self.missed = Ring(WINDOW)  # 1.0 per late tick
        self.delivery = Ring(DELIVERY_WINDOW)  # planner send -> follower take, µs
        self.delivery_hist = Histogram()

    def tick(self, period_us: float, compute_us: float, missed: bool) -> None:
        self.periods.add(period_us)
        self.compute.add(compute_us)
        self.missed.add(1.0 if missed else 0.0)
        self.elapsed_us += period_us
        self.ticks += 1
        if missed:
            self.deadline_misses += 1
        if self.ticks - self._folded_at >= FOLD_FORCED:
            self.fold()

    @property
    def fold_due(self) -> bool:
        return self.ticks - self._folded_at >= FOLD_EVERY

    def fold(self) -> None:
        """Count the raw samples since the last fold in the run's histograms (vectorised:
        tens of µs, in the tick's slack)."""
        for series in (self.periods, self.compute, self.read_us, self.write_us, self.logic_us):
            series.fold()
        self._folded_at = self.ticks

    def plan_taken(self, delivery_us: float) -> None:
        self.delivery.add(delivery_us)
        self.delivery_hist.add(delivery_us)
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
            "plan_delivery_us": summarize(self.delivery.values(), ("p50", "p99")),
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
        self.fold()
        ticks = self.periods.hist.count
        elapsed = self.elapsed_us / 1e6
        return {
            "final_mode": core.mode.name,
            "final_reason": core.reason if core.latched else None,
            "target_hz": self.hz,
            "achieved_hz": round(ticks / elapsed, 2) if elapsed else 0.0,
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "period_jitter_us": self.periods.hist.summary(("p50", "p99", "p999", "max")),
            "tick_compute_us": self.compute.hist.summary(),
            "bus_read_us": self.read_us.hist.summary(("p50", "p99")),
            "bus_write_us": self.write_us.hist.summary(("p50", "p99")),
            "logic_us": self.logic_us.hist.summary(("p50", "p99")),
            "mode_counts": {m.name: int(core.mode_ticks[m]) for m in Mode},
            "first_track_ns": core.first_track_ns,
            "plan_delivery_us": self.delivery_hist.summary(("p50", "p99")),
            "plans_received": self.plans_received,
            "dropped_messages": dropped,
            "bus": {"errors": bus.errors, "reads": bus.reads, "writes": bus.writes},
            "safety": {"faults": core.faults, "clamped_commands": core.filter.clamped,
                       "estops": core.estops, "last_reason": core.reason},
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
