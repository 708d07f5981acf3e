"""The activation watch against telemetry on the real sockets: an operator's ESTOP inside the
window pauses it (no rollback; the window runs on after the reset), a FAULT rolls back."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from onnx_bundle import make_bundle

from runtime.config import DuetConfig
from runtime.deploy import watch
from runtime.deploy.bundle_store import BundleStore
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder
from runtime.observe.rollout import WatchRecord

WINDOW_S = 1.5


def _bundle(tmp: Path, version: str) -> Path:
    path = make_bundle(tmp / f"src-{version}")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = version
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


class Robot:
    """Follower and planner telemetry at 20 Hz on the run dir's sockets; `mode` is the
    follower's, as the test sets it."""

    def __init__(self, run_dir: Path, version: str) -> None:
        self.mode, self.version, self.plans = "HOLD", version, 0
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socks = {}
        for source in ("follower", "planner"):
            sock = self.ctx.socket(zmq.PUB)
            sock.bind(endpoints.telemetry(str(run_dir), source))
            self.socks[source] = sock
        self.enc = Encoder()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.05):
            self.plans += 1
            follower: dict[str, Any] = {
                "source": "follower", "mode": self.mode, "health": {"miss_ratio": 0.0},
                "fault_reason": "bus: test" if self.mode == "FAULT" else None}
            planner = {"source": "planner", "bundle": self.version, "plans": self.plans,
                       "latency_ms": {"p99": 10.0}}
            self.socks["follower"].send(self.enc.encode("telemetry", follower))
            self.socks["planner"].send(self.enc.encode("telemetry", planner))

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        for sock in self.socks.values():
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def activated(tmp_path: Path, sim_config: DuetConfig) -> Iterator[tuple[BundleStore, DuetConfig]]:
    """A store where b was just activated over a, its watch armed; the config's run dir."""
    store = BundleStore(tmp_path / "bundles")
    for version in ("a", "b"):
        store.add(_bundle(tmp_path, version))
    store.activate("a")
    previous = store.activate("b")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = sim_config.model_copy(update={"run_dir": str(run_dir)})
    cfg.bundle.watch.window_s = WINDOW_S
    cfg.bundle.watch.start_timeout_s = 10.0
    watch.arm(store, cfg, "b", previous, None)
    yield store, cfg


def _watch_in_thread(store: BundleStore, cfg: DuetConfig) -> tuple[threading.Thread,
                                                                   list[WatchRecord | None]]:
    out: list[WatchRecord | None] = []
    thread = threading.Thread(target=lambda: out.append(watch.watch(store, cfg)), daemon=True)
    thread.start()
    return thread, out


def test_an_estop_in_the_window_pauses_the_watch_and_rolls_nothing_back(
        activated: tuple[BundleStore, DuetConfig]) -> None:
    store, cfg = activated
    robot = Robot(Path(cfg.run_dir), "b")
    try:
        thread, out = _watch_in_thread(store, cfg)
        time.sleep(0.5)  # inside the window: the operator stops the arm for longer than it
        robot.mode = "ESTOP"
        time.sleep(WINDOW_S + 1.0)
        assert thread.is_alive(), out  # paused: neither passed nor rolled back meanwhile
        robot.mode = "HOLD"  # duet reset
        thread.join(WINDOW_S + 10.0)
        assert out and out[0] is not None
        assert out[0]["state"] == "passed", out[0]
        assert store.current_version() == "b"
    finally:
        robot.close()


def test_a_fault_in_the_window_rolls_back(activated: tuple[BundleStore, DuetConfig]) -> None:
    store, cfg = activated
    robot = Robot(Path(cfg.run_dir), "b")
    try:
        thread, out = _watch_in_thread(store, cfg)
        time.sleep(0.5)
        robot.mode = "FAULT"
        thread.join(WINDOW_S + 10.0)
        assert out and out[0] is not None
        assert out[0]["state"] == "rolled_back" and "FAULT" in str(out[0]["reason"]), out[0]
        assert store.current_version() == "a"
    finally:
        robot.close()
