"""The planner process is one shell composed with one plan source: each is built and tested
alone here, with real sockets in a temporary run dir (no stack, no sim)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import zmq

from runtime.config import DuetConfig, load_config
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, decode, decode_plan, pack_array
from runtime.model.bundle import load_bundle
from runtime.planner.local import PipelineSource
from runtime.planner.records import SourceFigures
from runtime.planner.shell import PlannerShell, PlanSource
from runtime.planner.tasks import TaskError
from tests.onnx_bundle import make_bundle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _config(run_dir: Path, bundle: Path) -> DuetConfig:
    return load_config(REPO / "configs/sim.yaml", None, [
        f"run_dir={run_dir}", f"bundle.path={bundle}", "planner.task_source=operator",
        "planner.instruction=touch the red block"])


class Scripted(PlanSource):
    """A source that plans a fixed chunk on the shell's observation: the shell's side of the
    PlanSource protocol, nothing else."""

    def __init__(self, n: int) -> None:
        self.n, self.cycles, self.closed = n, 0, False

    def camera_names(self) -> Sequence[str]:
        return ()

    def check_instruction(self, text: str) -> None:
        if "forbidden" in text:
            raise TaskError("the scripted source refuses 'forbidden'")

    def cycle(self, shell: PlannerShell) -> None:
        self.cycles += 1
        got = shell.observe()
        if got is not None:
            shell.publish(np.full((4, self.n), 0.25), 0.1, got[1], shell.episode)

    def figures(self, last: int | None) -> SourceFigures:
        return {"inference_ms": {"p50": 1.0, "p99": 2.0}}

    def close(self) -> None:
        self.closed = True


def test_the_shell_publishes_what_its_source_plans_on_fresh_state(
        tmp_path: Path, bundle_dir: Path) -> None:
    cfg = _config(tmp_path, bundle_dir)
    n = len(cfg.robot.joints)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    state_pub = ctx.socket(zmq.PUB)  # the follower's side: it binds state and plan
    state_pub.bind(endpoints.state(cfg.run_dir))
    plan_sub = ctx.socket(zmq.SUB)
    plan_sub.setsockopt(zmq.SUBSCRIBE, b"")
    plan_sub.bind(endpoints.plan(cfg.run_dir))
    source = Scripted(n)
    shell = PlannerShell(cfg, "test-bundle", source)
    source_as_protocol: PlanSource = source  # the protocol is all a shell needs
    assert source_as_protocol is shell.source
    try:
        source.cycle(shell)
        assert shell.status == "no_state"  # nothing to plan on: nothing published
        enc = Encoder()
        deadline = time.monotonic() + 10
        got: bytes | None = None
        while got is None and time.monotonic() < deadline:
            zeros = pack_array(np.zeros(n, np.float32))
            state_pub.send(enc.encode("state", {
                "q": zeros, "dq": zeros, "effort": zeros, "mode": "HOLD",
                "t_read_ns": time.monotonic_ns()}))
            source.cycle(shell)
            if plan_sub.poll(50):
                got = plan_sub.recv()
        assert got is not None, shell.status
        msg, waypoints = decode_plan(got)
        assert msg["dt_s"] == 0.1
        assert waypoints.shape == (4, n) and np.allclose(waypoints, 0.25)
        assert shell.status == "planning" and shell.plans >= 1
        tel = shell.telemetry()
        assert tel["inference_ms"] == {"p50": 1.0, "p99": 2.0}  # the source's own figures
        assert shell.summary()["plans"] == shell.plans
        with pytest.raises(TaskError):  # the task store asks the source
            shell.tasks.set("a forbidden word", None, "operator")
    finally:
        shell.close()
        state_pub.close(linger=0)
        plan_sub.close(linger=0)
    assert source.closed  # closing the shell closes its source


def test_the_pipeline_source_stands_alone(bundle_dir: Path, tmp_path: Path) -> None:
    """Built from a bundle and a config, before any shell or socket exists."""
    cfg = _config(tmp_path, bundle_dir)
    bundle = load_bundle(bundle_dir, None, cfg.robot.joints)
    source = PipelineSource(cfg, bundle)
    assert list(source.camera_names()) == bundle.contract.camera_names()
    source.check_instruction("touch the red block")
    with pytest.raises(TaskError):
        source.check_instruction("zxqv plonk")  # not in the model's vocabulary
    figures = source.figures(None)
    assert "total" in figures["stage_ms"] and set(figures["inference_ms"]) == {"p50", "p99"}
    assert list(source.sockets()) == []


def test_shell_telemetry_decodes_as_published(tmp_path: Path, bundle_dir: Path) -> None:
    """What `duet status` receives is the shell's own telemetry record."""
    cfg = _config(tmp_path, bundle_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoints.telemetry(cfg.run_dir, "planner"))
    shell = PlannerShell(cfg, "test-bundle", Scripted(len(cfg.robot.joints)))
    try:
        msg = None
        deadline = time.monotonic() + 10
        while msg is None and time.monotonic() < deadline:
            shell.tel_pub.send(shell.enc_tel.encode("telemetry", shell.telemetry()))
            if sub.poll(50):
                msg = decode(sub.recv(), "telemetry")
        assert msg is not None
        assert set(shell.telemetry()) <= set(msg)
        assert msg["bundle"] == "test-bundle" and msg["instruction"] == "touch the red block"
    finally:
        shell.close()
        sub.close(linger=0)


def test_a_refused_task_is_logged_with_its_words_once(tmp_path: Path, bundle_dir: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A sim whose task the model cannot read: the robot holds, and the log says which task
    and why (once, though the sim announces it again and again), not only a drop counter."""
    from runtime.ipc.rpc import RequestError

    cfg = _config(tmp_path, bundle_dir)
    shell = PlannerShell(cfg, "test-bundle", Scripted(len(cfg.robot.joints)))
    try:
        with caplog.at_level("WARNING", logger="duet.planner"):
            for episode in (1, 1, 2):
                with pytest.raises(RequestError):
                    shell._sim_task("touch the forbidden block", episode)
            with pytest.raises(RequestError, match="task refused"):
                shell._cmd_task({"instruction": "go forbidden"})
        lines = [r.getMessage() for r in caplog.records if "task refused" in r.getMessage()]
        assert lines == [
            "sim task refused: 'touch the forbidden block': the scripted source refuses "
            "'forbidden'",
            "operator task refused: 'go forbidden': the scripted source refuses 'forbidden'"]
    finally:
        shell.close()


class Flipping(PlanSource):
    """A planner under load: camera_stale and planning by turns each cycle, then idle for
    good after `flip_s`."""

    def __init__(self, flip_s: float) -> None:
        self.until = time.monotonic() + flip_s
        self.cycles = 0

    def camera_names(self) -> Sequence[str]:
        return ()

    def check_instruction(self, text: str) -> None:
        pass

    def cycle(self, shell: PlannerShell) -> None:
        self.cycles += 1
        if time.monotonic() >= self.until:
            shell.status = "idle"
        else:
            shell.status = "planning" if self.cycles % 2 else "camera_stale (scene)"


def test_a_flipping_status_is_logged_once_it_settles_not_per_flip(
        tmp_path: Path, bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """It logged every flip (36 lines a minute on a loaded robot): now a status is said once
    it held 2 s, with the count of the briefer ones before it."""
    cfg = _config(tmp_path, bundle_dir)
    cfg.planner.hz = 50.0
    source = Flipping(flip_s=3.0)
    shell = PlannerShell(cfg, "test-bundle", source)
    try:
        with caplog.at_level("INFO", logger="duet.planner"):
            running = threading.Thread(target=shell.run, args=(90.0,))
            running.start()
            deadline = time.monotonic() + 90  # the idle status must hold 2 s, on any load
            while time.monotonic() < deadline and not any(
                    "planner status: idle" in r.getMessage() for r in caplog.records):
                time.sleep(0.1)
            shell.stop_requested = True
            running.join(timeout=30)
    finally:
        shell.close()
    said = [r.getMessage() for r in caplog.records if "planner status" in r.getMessage()]
    assert source.cycles > 20, source.cycles  # it did flip, many times
    assert len(said) == 1, said
    assert re.fullmatch(r"planner status: idle \(after \d+ briefer changes in \d+ s\)",
                        said[0]), said
