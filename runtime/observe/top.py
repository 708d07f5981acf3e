"""`duet top`: live follower and planner telemetry for an SSH terminal, on textual.

Fits 80x24: first why the robot is not healthy and the next step (runtime/observe/status.py;
a reason summarised to two rows at most, so the next step always shows); below, the follower
on the left, joints and planner on the right (cut at the bottom on a short terminal); `q`
quits. Without a terminal (a pipe, a log) it prints the same screen once a second instead.
"""

from __future__ import annotations

import sys
import textwrap
import time
from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.widgets import Footer, Static

from runtime.observe.reasons import summarize
from runtime.observe.rollout import rollout_table, shadow_report, watch_record
from runtime.observe.status import diagnosis, setting
from runtime.observe.subscriber import TelemetrySubscriber
from runtime.observe.telemetry_view import follower_table, joints_table, planner_table

STALE_S = 2.0  # a source silent this long is shown as gone, not as its last good numbers
SHOWN = 2  # problems on screen (each at most 4 rows); the rest: duet status


def health_text(latest: dict[str, Any], where: str, width: int) -> Text:
    """Why the robot is not healthy and what to do, in at most 2 + 2 rows per problem."""
    found = diagnosis(latest, where)
    if not found:
        return Text("healthy", style="bold green")
    text = Text()
    for why, step in found[:SHOWN]:
        for line in textwrap.wrap(summarize(why), width, max_lines=2, placeholder=" …"):
            text.append(f"{line}\n", style="bold red")
        for line in textwrap.wrap(step, width, initial_indent="  next: ",
                                  subsequent_indent="        ", max_lines=2, placeholder=" …"):
            text.append(f"{line}\n")
    if len(found) > SHOWN:
        text.append(f"and {len(found) - SHOWN} more: duet status\n", style="red")
    text.rstrip()
    return text


class TopApp(App[int]):
    CSS = """
    Screen { layout: vertical; }
    #title { height: 1; background: $boost; }
    #health { height: auto; margin-bottom: 1; }
    #panels { height: 1fr; }
    #follower { width: 1fr; padding-right: 1; }
    #right { width: 1fr; }
    """
    BINDINGS: ClassVar = [("q", "quit", "quit"), ("ctrl+c", "quit", "quit")]

    def __init__(self, run_dir: str, refresh_hz: float, duration_s: float | None) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.refresh_hz = refresh_hz
        self.duration_s = duration_s
        self.sub = TelemetrySubscriber(run_dir)

    def compose(self) -> ComposeResult:
        yield Static(f"duet top  {self.run_dir}", id="title")
        yield Static(id="health")
        with Horizontal(id="panels"):
            yield Static(id="follower")
            yield Static(id="right")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0 / self.refresh_hz, self.refresh_view)
        if self.duration_s is not None:
            self.set_timer(self.duration_s, self.exit)
        self.refresh_view()

    def refresh_view(self) -> None:
        latest, ages = sample(self.sub)
        follower = latest.get("follower")
        self.query_one("#follower", Static).update(follower_table(follower,
                                                                  ages.get("follower")))
        right: list[RenderableType] = []
        joints = joints_table(follower)
        if joints is not None:
            right.append(joints)
        right.append(planner_table(latest.get("planner"), ages.get("planner")))
        rollout = rollout_table(shadow_report(self.run_dir), watch_record(self.run_dir))
        if rollout is not None:
            right.append(rollout)
        self.query_one("#right", Static).update(Group(*right))
        self.query_one("#health", Static).update(health_text(latest, setting(self.run_dir),
                                                             self.size.width))

    def on_unmount(self) -> None:
        self.sub.close()


def sample(sub: TelemetrySubscriber) -> tuple[dict[str, Any], dict[str, float]]:
    sub.poll(0)
    now = time.monotonic()
    ages = {s: now - t for s, t in sub.received_at.items()}
    return {s: m for s, m in sub.latest.items() if ages[s] < STALE_S}, ages


def _print_loop(run_dir: str, refresh_hz: float, duration_s: float | None) -> int:
    from rich.console import Console

    from runtime.observe.telemetry_view import render

    console, sub = Console(), TelemetrySubscriber(run_dir)
    end = None if duration_s is None else time.monotonic() + duration_s
    try:
        while end is None or time.monotonic() < end:
            sub.poll(1.0 / refresh_hz)
            latest, ages = sample(sub)
            latest |= {"shadow": shadow_report(run_dir), "watch": watch_record(run_dir)}
            console.print(render(latest, ages, title=f"duet top  {run_dir}"),
                          health_text(latest, setting(run_dir), console.width))
            time.sleep(max(0.0, 1.0 - 1.0 / refresh_hz))
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0


def run_top(run_dir: str, refresh_hz: float = 4.0, duration_s: float | None = None) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _print_loop(run_dir, refresh_hz, duration_s)
    TopApp(run_dir, refresh_hz, duration_s).run()
    return 0
