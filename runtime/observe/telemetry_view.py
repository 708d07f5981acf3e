"""Turn telemetry messages into plain data (for --json) and one rich screen (status, top)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from runtime.follower.records import FollowerTelemetry
from runtime.ipc.messages import MessageError, unpack_array
from runtime.observe.reasons import summarize
from runtime.observe.rollout import rollout_table
from runtime.planner.records import PlannerTelemetry

MODE_STYLE = {"TRACK": "bold green", "HOLD": "bold yellow", "INIT": "bold cyan",
              "FAULT": "bold white on red", "ESTOP": "bold white on red"}
_ARRAY_KEYS = {"dtype", "shape", "data"}


def to_jsonable(obj: Any) -> Any:
    """Packed arrays -> nested lists, bytes -> length note; everything else as is."""
    if isinstance(obj, dict):
        if set(obj) == _ARRAY_KEYS:
            try:
                return unpack_array(obj, "array").tolist()
            except MessageError:
                return None
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return obj


def _num(value: Any, fmt: str = "{:.1f}") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "-"
    return fmt.format(value)


def _get(d: Mapping[str, Any] | None, *path: str) -> Any:
    node: Any = d
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _kv_table(title: str) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim", no_wrap=True, min_width=12)
    table.add_column(overflow="fold")
    return table


def follower_table(t: FollowerTelemetry | None, age_s: float | None) -> Table:
    table = _kv_table("follower")
    if t is None:
        table.add_row("state", Text("no telemetry (not running?)", style="bold red"))
        return table
    mode = str(t.get("mode", "?"))
    # one row: the reason in full is below (top, status) or in --json, never a dozen rows here
    mode_text = Text(mode, style=MODE_STYLE.get(mode, "bold"), no_wrap=True,
                     overflow="ellipsis")
    if t.get("fault_reason"):
        mode_text.append(f"  {summarize(str(t['fault_reason']))}", style="red")
    table.add_row("mode", mode_text)
    rate = f"{_num(t.get('achieved_hz'))} / {_num(t.get('target_hz'), '{:.0f}')} Hz"
    table.add_row("loop rate", rate)
    table.add_row("ticks/misses", f"{_num(t.get('ticks'), '{:d}')} / "
                  f"{_num(t.get('deadline_misses'), '{:d}')}")
    for key, label in (("period_jitter_us", "jitter us"), ("tick_compute_us", "compute us")):
        table.add_row(label, "p50 {} p99 {} max {}".format(
            *(_num(_get(t, key, p), "{:.0f}") for p in ("p50", "p99", "max"))))
    table.add_row("plan age", f"{_num(t.get('plan_age_ms'))} ms")
    table.add_row("delivery us", "p50 {}  p99 {}".format(
        *(_num(_get(t, "plan_delivery_us", p)) for p in ("p50", "p99"))))
    bus = t.get("bus") or {}
    table.add_row("bus", "  ".join(f"{label} {_num(bus.get(k), '{:d}')}" for k, label in
                                   (("errors", "err"), ("retries", "retry"),
                                    ("crc_errors", "crc"), ("timeouts", "timeout"))))
    safety = t.get("safety") or {}
    table.add_row("safety", "  ".join(f"{label} {_num(safety.get(k), '{:d}')}" for k, label in
                                      (("faults", "faults"), ("clamped_commands", "clamped"),
                                       ("estops", "estops"))))
    if age_s is not None:
        table.add_row("sample age", f"{age_s:.1f} s")
    return table


def joints_table(t: FollowerTelemetry | None) -> Table | None:
    if t is None:
        return None
    names = t.get("joint_names") or []
    q = to_jsonable(t.get("q")) or []
    err = to_jsonable(t.get("tracking_error")) or []
    table = Table(title="joints", title_justify="left", box=None, pad_edge=False)
    for col in ("joint", "q rad", "track err mrad"):
        table.add_column(col, justify="right" if col != "joint" else "left")
    for i, name in enumerate(names):
        qi = q[i] if i < len(q) else None
        ei = err[i] * 1000.0 if i < len(err) and isinstance(err[i], (int, float)) else None
        style = "red" if ei is not None and abs(ei) > 50.0 else ""
        table.add_row(str(name), _num(qi, "{:+.3f}"), Text(_num(ei, "{:+.1f}"), style=style))
    return table


def planner_table(t: PlannerTelemetry | None, age_s: float | None) -> Table:
    table = _kv_table("planner")
    if t is None:
        table.add_row("state", Text("no telemetry (not running?)", style="bold red"))
        return table
    status = str(t.get("status", "?"))
    table.add_row("status", Text(status, style="green" if status == "planning" else "yellow"))
    table.add_row("plans / rate", f"{_num(t.get('plans'), '{:d}')} / "
                  f"{_num(t.get('achieved_hz'))} Hz")
    table.add_row("latency ms", "p50 {}  p99 {}".format(
        *(_num(_get(t, "latency_ms", p)) for p in ("p50", "p99"))))
    ages = t.get("camera_age_ms")  # per camera: {name: ms or None}
    table.add_row("camera age", ", ".join(f"{name} {_num(ms)} ms" for name, ms in ages.items())
                  if isinstance(ages, dict) and ages else "-")
    table.add_row("instruction", str(t.get("instruction") or "-"))
    if age_s is not None:
        table.add_row("sample age", f"{age_s:.1f} s")
    return table


def render(
    latest: dict[str, dict[str, Any]], ages: dict[str, float] | None = None, title: str = "duet"
) -> RenderableType:
    ages = ages or {}
    # what each process publishes, as decoded off the wire: the tables read every key with a
    # default, since a frame may carry anything
    follower = cast("FollowerTelemetry | None", latest.get("follower"))
    planner = cast("PlannerTelemetry | None", latest.get("planner"))
    parts: list[RenderableType] = [Text(title, style="bold")]
    parts.append(follower_table(follower, ages.get("follower")))
    joints = joints_table(follower)
    if joints is not None:
        parts.append(joints)
    parts.append(planner_table(planner, ages.get("planner")))
    rollout = rollout_table(latest.get("shadow"), latest.get("watch"))
    if rollout is not None:
        parts.append(rollout)
    return Group(*parts)
