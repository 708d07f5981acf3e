"""`duet bundle activate VERSION --if-shadow-ok`: VERSION is activated only when the shadow
report (runtime/remote/shadow.py, in the run dir) says it was compared with the bundle current
now, over enough plans, within the thresholds of `bundle.shadow`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.model.timing import Latency, timing_checks


def _num(d: Any, *path: str) -> float | None:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def refusals(report: dict[str, Any] | None, version: str, current: str | None,
             cfg: DuetConfig) -> list[str]:
    """Why the shadow report does not let `version` replace `current` (empty: it does)."""
    gate, path = cfg.bundle.shadow, Path(cfg.run_dir) / endpoints.SHADOW_REPORT
    if report is None:
        return [f"no shadow report in {path}: run `duet bundle shadow {version}` beside the "
                "live robot first"]
    if report.get("candidate") != version:
        return [f"{path} is about {report.get('candidate')!r}, not {version}: run "
                f"`duet bundle shadow {version}`"]
    why = []
    if current is not None and report.get("active") != current:
        why.append(f"it was compared with {report.get('active')!r}, but {current} is current")
    plans = int(_num(report, "plans") or 0)
    if plans < gate.min_plans:
        why.append(f"{plans} plans compared, fewer than bundle.shadow.min_plans "
                   f"{gate.min_plans}")
    joints = (report.get("divergence_rad") or {}).get("per_joint") or {}
    p95 = {name: _num(s, "p95") for name, s in joints.items()}
    worst = max(p95, key=lambda name: p95[name] or 0.0, default=None)
    if worst is not None and (p95[worst] or 0.0) > gate.max_p95_rad:
        why.append(f"joint {worst} diverges by {p95[worst]:.4f} rad at p95, over "
                   f"bundle.shadow.max_p95_rad {gate.max_p95_rad:g}")
    mean = _num(report, "divergence_rad", "mean")
    if mean is not None and mean > gate.max_mean_rad:
        why.append(f"the mean divergence {mean:.4f} rad is over bundle.shadow.max_mean_rad "
                   f"{gate.max_mean_rad:g}")
    p50, p99 = _num(report, "latency_ms", "p50"), _num(report, "latency_ms", "p99")
    active99 = _num(report, "active_latency_ms", "p99")
    if gate.max_latency_ratio is not None and p99 and active99 \
            and p99 > gate.max_latency_ratio * active99:
        why.append(f"its latency p99 {p99:g} ms is over bundle.shadow.max_latency_ratio "
                   f"{gate.max_latency_ratio:g} x the active planner's {active99:g} ms")
    horizon, dt_s = int(_num(report, "horizon") or 0), _num(report, "dt_s") or 0.0
    if p50 is not None and p99 is not None and horizon and dt_s:
        lat = Latency(p50, p99, f"the shadow's, over {plans} plans")
        why += [f"timing: {text}" for level, text in timing_checks(lat, horizon, dt_s, cfg)
                if level == "fail"]
    return why
