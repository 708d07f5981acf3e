"""Does a planner's latency fit the robot's timing? One set of rules, used with a bundle's
declared latency (the contract's `planner.latency`: start-time checks and `duet config
validate`), with a latency benched on this host (`duet config validate --bench N`) and with
the latency the planner measures while it runs (logged once).

A plan says where the joints go from its observation on, `horizon x dt_s` ahead; the follower
drops a plan whose observation is older than `follower.plan_timeout_ms` when it arrives. So,
with the latency L (observation -> plan at the follower):

- L >= plan_timeout_ms: every plan arrives stale; the robot only holds (refused);
- L >= horizon x dt_s: a plan's chunk is over before it arrives (refused);
- p99 >= plan_timeout_ms: the slow plans are dropped (a warning);
- the next plan arrives max(L, planner period) + L after this one's observation: later than
  horizon x dt_s and the chunk runs out in between, the arm brakes to a hold (a warning);
- L > the planner period: it plans back to back, slower than `planner.hz` (a warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runtime.config import DuetConfig
from runtime.model.contract import Contract

Level = Literal["fail", "warn"]


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    source: str  # where the figures come from: "declared by the bundle (...)", "benched ..."

    def __str__(self) -> str:
        return f"p50 {self.p50_ms:.0f} ms / p99 {self.p99_ms:.0f} ms, {self.source}"


def timing_checks(lat: Latency, horizon: int, dt_s: float, cfg: DuetConfig
                  ) -> list[tuple[Level, str]]:
    """(level, message) for each rule the latency breaks, each with its numbers and a fix."""
    timeout = cfg.follower.plan_timeout_ms
    chunk_ms = horizon * dt_s * 1e3
    period_ms = 1e3 / cfg.planner.hz
    out: list[tuple[Level, str]] = []
    chunk = f"the chunk (horizon {horizon} x dt_s {dt_s:g} s = {chunk_ms:.0f} ms)"
    if lat.p50_ms >= timeout:
        out.append(("fail", f"planner latency ({lat}) >= follower.plan_timeout_ms {timeout:g}: "
                            "the follower would drop every plan as stale and only hold; raise "
                            f"follower.plan_timeout_ms above the p99 ({lat.p99_ms:.0f} ms) or "
                            "use a faster planner"))
    elif lat.p99_ms >= timeout:
        out.append(("warn", f"planner latency p99 {lat.p99_ms:.0f} ms >= follower."
                            f"plan_timeout_ms {timeout:g} ({lat.source}): the slowest plans "
                            "arrive stale and are dropped"))
    if lat.p50_ms >= chunk_ms:
        out.append(("fail", f"planner latency ({lat}) >= {chunk}: a plan is over before it "
                            "arrives; a longer horizon or a faster planner"))
    else:
        gap = max(lat.p99_ms, period_ms) + lat.p99_ms
        if gap > chunk_ms:
            out.append(("warn", f"the next plan arrives up to {gap:.0f} ms after an "
                                f"observation (period {period_ms:.0f} ms + latency p99 "
                                f"{lat.p99_ms:.0f} ms, {lat.source}), after {chunk} runs out: "
                                "the arm brakes to a hold between plans"))
    if lat.p50_ms > period_ms:
        out.append(("warn", f"planner latency p50 {lat.p50_ms:.0f} ms ({lat.source}) is over "
                            f"the planner period ({period_ms:.0f} ms at planner.hz "
                            f"{cfg.planner.hz:g}): it plans back to back at about "
                            f"{1e3 / lat.p50_ms:.2g} Hz"))
    return out


def declared_checks(contract: Contract, cfg: DuetConfig) -> list[tuple[Level, str]]:
    """The rules against the latency the bundle declares (none declared: nothing to check)."""
    d = contract.planner.latency
    if d is None:
        return []
    where = f" on {d.measured_on}" if d.measured_on else ""
    lat = Latency(d.p50_ms, d.p99_ms, f"declared by the bundle{where}")
    a = contract.planner.actions
    return timing_checks(lat, a.horizon, a.dt_s, cfg)
