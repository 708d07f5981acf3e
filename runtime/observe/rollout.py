"""What `duet status` and `duet top` show of a rollout, read from the run dir: the shadow
planner's report (typed by its writer, runtime/remote/shadow.py) and the activation watch's
record (typed here; written by runtime/deploy/watch.py, a layer above)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TypedDict

from rich.table import Table
from rich.text import Text

from runtime.ipc import endpoints


class WatchRecord(TypedDict, total=False):
    state: str  # armed, watching, passed, rolled_back, superseded
    version: str  # the bundle activated
    previous: str | None  # the one it replaced (the rollback's target)
    baseline: Any  # runtime/deploy/watch.py Health, before the switch (None: no live robot)
    health: Any  # the same figures over the watch window
    window_s: float
    armed_unix_s: float
    reason: str | None  # why it was rolled back
    current: str  # after a rollback
    rolled_back_unix_s: float


def _read(run_dir: str, name: str) -> dict[str, Any] | None:
    try:
        got = json.loads((Path(run_dir) / name).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) else None


def shadow_report(run_dir: str) -> dict[str, Any] | None:
    """The shadow report (runtime/remote/shadow.py ShadowReport) as read (None: none)."""
    return _read(run_dir, endpoints.SHADOW_REPORT)


def watch_record(run_dir: str) -> dict[str, Any] | None:
    """The activation watch's record (a WatchRecord) as read (None: none)."""
    return _read(run_dir, endpoints.WATCH_REPORT)


def _f(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "-"


def rollout_table(shadow: dict[str, Any] | None, watch: dict[str, Any] | None) -> Table | None:
    """The shadow's divergence and latency, and the last activation's watch (None: neither)."""
    if shadow is None and watch is None:
        return None
    table = Table(title="rollout", title_justify="left", show_header=False, box=None,
                  pad_edge=False)
    table.add_column(style="dim", no_wrap=True, min_width=12)
    table.add_column(overflow="fold")
    if shadow is not None:
        div = shadow.get("divergence_rad") or {}
        age = time.time() - shadow["updated_unix_s"] \
            if isinstance(shadow.get("updated_unix_s"), (int, float)) else None
        table.add_row("shadow", f"{shadow.get('candidate')} beside {shadow.get('active')}: "
                      f"{_f(shadow.get('plans'), '{:d}')} plans (updated {_f(age, '{:.0f}')} s "
                      "ago)")
        table.add_row("divergence", f"mean {_f(div.get('mean'), '{:.4f}')}  p95 "
                      f"{_f(div.get('p95'), '{:.4f}')}  max {_f(div.get('max'), '{:.4f}')} rad")
        per_joint = div.get("per_joint") or {}
        if per_joint:
            worst = max(per_joint, key=lambda j: (per_joint[j] or {}).get("p95") or 0.0)
            table.add_row("worst joint", f"{worst} p95 "
                          f"{_f((per_joint[worst] or {}).get('p95'), '{:.4f}')} rad")
        lat, act = shadow.get("latency_ms") or {}, shadow.get("active_latency_ms") or {}
        table.add_row("shadow ms", f"p50 {_f(lat.get('p50'), '{:.1f}')}  p99 "
                      f"{_f(lat.get('p99'), '{:.1f}')} (active p99 "
                      f"{_f(act.get('p99'), '{:.1f}')})")
    if watch is not None:
        state = str(watch.get("state"))
        style = {"rolled_back": "bold red", "passed": "green"}.get(state, "yellow")
        text = Text(f"{state} ", style=style)
        text.append(f"{watch.get('version')}")
        if state == "rolled_back":
            text.append(f" -> {watch.get('current')}: {watch.get('reason')}", style="red")
        table.add_row("activation", text)
    return table
