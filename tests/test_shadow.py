"""Shadow mode (a candidate planner beside the active one, never actuating), the gate on its
report, and the activation watch that rolls a regressing bundle back by itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_bundle import DT, H, _planner, _slow_planner, make_bundle
from sim_arm import JOINTS
from stack import REPO, Stack, stop_processes

from runtime.config import load_config
from runtime.deploy.bundle_store import BundleStore
from runtime.deploy.shadow_gate import refusals
from runtime.deploy.watch import Health, regression
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, pack_array
from runtime.model.bundle import MANIFEST, sha256_file
from runtime.observe.status import collect
from runtime.observe.subscriber import TelemetrySubscriber
from runtime.remote.divergence import Divergence, abs_difference

OFFSET = 0.1  # rad: the candidate plans every joint this much above the active one
SPIN = 60_000  # the slow candidate's Loop steps: ~0.4 s a plan on a quiet 2-core host
# the watch, short; a planner at 2 Hz so the slow one leaves the sim CPU on a loaded host, and a
# bus that tolerates a starved emulator (the test is about the bundle, not the host)
LIVE = ["bundle.watch.baseline_s=2", "bundle.watch.window_s=4",
        "bundle.watch.start_timeout_s=120", "planner.hz=2", "bus.timeout_ms=50",
        "bus.retries=3", "follower.bus_error_threshold=50"]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _default_offsets() -> np.ndarray:
    offsets = np.zeros((H, len(JOINTS)))
    offsets[:, 0] = 0.03 * (np.arange(H) + 1)  # make_bundle's default sweep
    return offsets


# ------------------------------------------------------------------ pure parts
def test_divergence_per_joint_and_step_on_the_candidates_grid() -> None:
    active = np.zeros((10, 2))
    active[:, 1] = np.arange(10) * 0.1  # 0.0 .. 0.9 at 0.1 s .. 1.0 s
    same = abs_difference(active + 0.05, 0.1, active, 0.1)
    assert np.allclose(same, 0.05)
    # a candidate on a 0.2 s grid compared where it has points: 0.2, 0.4, .. 2.0 s; the
    # active chunk is held past its end (1.0 s), as the follower holds it
    coarse = abs_difference(np.zeros((10, 2)), 0.2, active, 0.1)
    assert np.allclose(coarse[:5, 1], [0.1, 0.3, 0.5, 0.7, 0.9])
    assert np.allclose(coarse[5:, 1], 0.9)
    div = Divergence(["a", "b"])
    for _ in range(3):
        div.add(same)
    s = div.summary()
    assert div.plans == 3 and len(s["per_step"]) == 10  # type: ignore[arg-type]
    assert s["per_joint"]["b"]["p95"] == pytest.approx(0.05, abs=1e-6)  # type: ignore[index]


def _report(**over: Any) -> dict[str, Any]:
    joint = {"mean": 0.01, "p95": 0.02, "max": 0.03}
    report = {"candidate": "v2", "active": "v1", "plans": 50, "horizon": H, "dt_s": DT,
              "latency_ms": {"p50": 10.0, "p99": 20.0},
              "active_latency_ms": {"p50": 10.0, "p99": 20.0},
              "divergence_rad": {"mean": 0.01, "p95": 0.02, "max": 0.03,
                                 "per_joint": {"j1": joint, "j2": joint}}}
    report.update(over)
    return report


def test_the_gate_names_each_threshold_it_refuses_on(sim_config) -> None:  # type: ignore[no-untyped-def]
    cfg = sim_config
    assert refusals(_report(), "v2", "v1", cfg) == []
    assert "run `duet bundle shadow v2`" in refusals(None, "v2", "v1", cfg)[0]
    assert "is about 'v3'" in refusals(_report(candidate="v3"), "v2", "v1", cfg)[0]
    joint = {"mean": 0.2, "p95": 0.3, "max": 0.4}
    why = refusals(_report(plans=3, active="v0", latency_ms={"p50": 900.0, "p99": 950.0},
                           divergence_rad={"mean": 0.2, "per_joint": {"j1": joint}}),
                   "v2", "v1", cfg)
    text = "\n".join(why)
    assert "compared with 'v0', but v1 is current" in text
    assert "3 plans compared, fewer than bundle.shadow.min_plans 20" in text
    assert "joint j1 diverges by 0.3000 rad at p95, over bundle.shadow.max_p95_rad" in text
    assert "mean divergence 0.2000 rad is over bundle.shadow.max_mean_rad" in text
    assert "max_latency_ratio 1.5 x the active planner's 20 ms" in text
    assert "timing:" in text  # p50 900 ms over the sim's plan timeout


def test_a_regression_is_a_figure_over_baseline_times_ratio_plus_margin(sim_config) -> None:  # type: ignore[no-untyped-def]
    w = sim_config.bundle.watch
    base: Health = {"samples": 20, "miss_ratio": 0.001, "faulted": None,
                    "tracking_p95_rad": 0.01, "latency_p99_ms": 30.0, "plans": 10}
    assert regression(base, base, w) is None
    assert regression(base, {**base, "latency_p99_ms": 79.0}, w) is None  # 30 x 2 + 20 = 80
    assert "planner latency p99 81 ms over the baseline 30 ms" in str(
        regression(base, {**base, "latency_p99_ms": 81.0}, w))
    assert "tracking error p95" in str(regression(base, {**base, "tracking_p95_rad": 0.05}, w))
    assert "deadline-miss ratio" in str(regression(base, {**base, "miss_ratio": 0.05}, w))
    faulted = {**base, "faulted": "the follower entered FAULT: bus"}
    assert regression(None, faulted, w) == "the follower entered FAULT: bus"
    assert regression(None, {**base, "latency_p99_ms": 1e4}, w) is None  # no baseline: faults


@pytest.fixture(scope="module")
def active(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("active") / "a")


def _variant(src: Path, out: Path, suffix: str, planner: onnx.ModelProto) -> Path:
    """`src` with another planner graph (same inputs and outputs) and version: a candidate
    made in milliseconds instead of an export."""
    shutil.copytree(src, out)
    onnx.save(planner, out / "planner.onnx")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["planner.onnx"] = sha256_file(out / "planner.onnx")
    manifest["version"] += f"-{suffix}"
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def shadow_planner(tmp_path_factory: pytest.TempPathFactory, active: Path):  # type: ignore[no-untyped-def]
    from runtime.model.robot_bundle import robot_bundle
    from runtime.remote.shadow import ShadowPlanner

    tmp = tmp_path_factory.mktemp("shadow")
    bundle = active
    (tmp / "run").mkdir(mode=0o700)
    cfg = load_config(REPO / "configs" / "sim.yaml", None,
                      [f"run_dir={tmp / 'run'}", f"bundle.path={bundle}"])
    shadow = ShadowPlanner(cfg, robot_bundle(cfg))
    yield shadow
    shadow.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(["bundle", "t_obs_ns", "state_t_ns", "state",
                                             "frames", "instruction", "prefix", "expected_s",
                                             "active"]),
                            st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1),
                                      st.text(max_size=8),
                                      st.binary(max_size=16),
                                      st.dictionaries(st.text(max_size=6),
                                                      st.binary(max_size=8), max_size=3))),
       raw=st.binary(max_size=64))
def test_hostile_feed_messages_are_counted_never_raised(shadow_planner, body, raw) -> None:  # type: ignore[no-untyped-def]
    before = sum(shadow_planner.errors.values())
    shadow_planner.step(Encoder().encode("observation", body))
    shadow_planner.step(raw)
    assert sum(shadow_planner.errors.values()) == before + 2
    assert shadow_planner.divergence.plans == 0


def test_a_feed_message_is_planned_and_compared(shadow_planner) -> None:  # type: ignore[no-untyped-def]
    """The feed's own message: raw frame, states, the active plan; divergence = q + offsets
    of this bundle minus the active waypoints given."""
    from runtime.remote.wire import encode_observation

    n = len(JOINTS)
    q = np.linspace(-0.2, 0.2, n)
    t = np.array([1_000_000, 2_000_000], dtype=np.int64)
    values = np.zeros((4, 2, n))
    values[0] = q  # q, dq, effort, q_cmd
    values[3] = q
    active = (q + _default_offsets() - 0.05).astype(np.float32)
    body = encode_observation(
        Encoder(), bundle="v1", t_obs_ns=int(t[-1]), states=(t, values),
        jpegs={"scene": pack_array(np.zeros((96, 96, 3), np.uint8))},
        instruction="touch the red block", episode=None, previous=None,
        previous_waypoints=None, expected_s=0.0,
        active={"waypoints": pack_array(active), "dt_s": DT, "latency_ms": 12.0})
    shadow_planner.step(body)
    report = shadow_planner.report()
    assert report["plans"] == 1 and report["active"] == "v1"
    for name in JOINTS:
        assert report["divergence_rad"]["per_joint"][name]["mean"] == pytest.approx(0.05, 1e-4)


# ------------------------------------------------------------------ live, two bundles
def _wait(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout_s} s")


def _planner_bundle(run_dir: str) -> str | None:
    sub = TelemetrySubscriber(run_dir, ("planner",))
    try:
        t = sub.sample(2.0).get("planner") or {}
    finally:
        sub.close()
    return t.get("bundle") if t.get("plans") else None


@pytest.mark.system
def test_shadow_gate_and_rollback_with_real_bundles(tmp_path: Path, active: Path) -> None:
    """Active A; shadow B (every joint OFFSET rad away) records that divergence from the same
    observations; the gate refuses B; C (a slow planner) is activated with the live robot's
    baseline, and after the restart the watch rolls it back to A by itself."""
    root = tmp_path / "store"
    store = BundleStore(root)
    versions = {}
    for name, path in (
            ("a", active),
            ("b", _variant(active, tmp_path / "b", "b", _planner(_default_offsets() + OFFSET))),
            ("c", _variant(active, tmp_path / "c", "c",
                           _slow_planner(_default_offsets(), SPIN)))):
        versions[name] = store.manifest_version(path)
        store.add(path)
    store.activate(versions["a"])
    current = root / "current"
    with Stack(tmp_path / "one", current, LIVE) as stack:
        run = Path(stack.run_dir)
        config = ["--config", str(run / endpoints.EFFECTIVE_CONFIG), "--store", str(root)]
        stack.wait_mode("TRACK", 60)
        shadow = _cli("bundle", "shadow", versions["b"], *config, "--plans", "5", "--json")
        assert shadow.returncode == 0, shadow.stderr
        report = json.loads(shadow.stdout)
        assert report["plans"] >= 5 and report["active"] == versions["a"]
        for name in JOINTS:  # the same observations: exactly the offset, no noise
            assert report["divergence_rad"]["per_joint"][name]["mean"] == \
                pytest.approx(OFFSET, abs=1e-4)
        assert len(report["divergence_rad"]["per_step"]) == H
        assert report["latency_ms"]["p99"] > 0
        assert collect(stack.run_dir, 5.0)["shadow"]["plans"] == report["plans"]  # status

        gated = _cli("bundle", "activate", versions["b"], "--if-shadow-ok", *config)
        assert gated.returncode == 1
        assert "diverges by 0.1000 rad at p95, over bundle.shadow.max_p95_rad 0.05" \
            in gated.stderr
        assert "fewer than bundle.shadow.min_plans 20" in gated.stderr
        assert store.current_version() == versions["a"]

        activated = _cli("bundle", "activate", versions["c"], *config)
        assert activated.returncode == 0, activated.stderr
        assert "baseline: the live robot now" in activated.stdout
        assert store.current_version() == versions["c"]

    # `duet run` again (a workstation's restart): its watch finds the pending activation
    run = tmp_path / "two"
    log = (tmp_path / "run.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "run", *config[:2],
                             "--set", f"run_dir={run}"], cwd=REPO, stderr=log)
    try:
        _wait("the watch's rollback", lambda: store.current_version() == versions["a"], 180)
        rec = json.loads((run / endpoints.WATCH_REPORT).read_text())
        assert rec["state"] == "rolled_back" and rec["version"] == versions["c"]
        # the injected regression is the latency; a loaded host may fault the emulated bus
        # first (also a regression, and the same rollback)
        assert rec["reason"].startswith(("planner latency p99", "the follower entered")), rec
        # duet run restarted the follower and the planner: A plans again
        _wait("planner on A", lambda: _planner_bundle(str(run)) == versions["a"], 120)
        status = json.loads(_cli("status", "--json", "--run-dir", str(run), timeout=60).stdout)
        assert status["watch"]["state"] == "rolled_back"
    finally:
        stop_processes(proc)
    log.seek(0)
    logged = log.read()
    assert logged.count("automatic rollback:") == 1, logged[-3000:]
    assert "restarting the follower and the planner" in logged
