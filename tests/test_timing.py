"""Latency-aware timing: a planner's latency against `horizon x dt_s`, the plan timeout and
the planner period -- declared by the bundle, benched here, measured live -- and a stop that
interrupts a plan in progress instead of waiting for it (or being killed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from onnx_bundle import make_bundle, respin
from stack import REPO, Stack

from runtime.ipc import endpoints
from runtime.ipc.messages import decode
from runtime.model.bundle import BundleError
from runtime.model.robot_bundle import robot_bundle
from runtime.model.timing import Latency, timing_checks
from runtime.stack.supervisor import STOP_TIMEOUT_S

SLOW = 60_000  # Loop steps of the slow planner: ~0.4 s a plan on a quiet 2-core host
TOLERANT = "follower.deadline_storm.misses=400"  # as tests/stack.py: behaviour, not timing


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("slow") / "b", slow_iterations=SLOW)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_rules_say_what_breaks_with_the_numbers(sim_config) -> None:  # type: ignore[no-untyped-def]
    sim_config.follower.plan_timeout_ms = 400
    slow_one = timing_checks(Latency(832, 900, "measured"), 10, 0.1, sim_config)
    fails = [why for level, why in slow_one if level == "fail"]
    assert len(fails) == 1 and "832 ms" in fails[0] and "plan_timeout_ms 400" in fails[0]
    warns = [why for level, why in slow_one if level == "warn"]
    assert any("planner.hz 5" in w and "back to back" in w for w in warns), warns
    assert any("runs out" in w for w in warns), warns  # 900 + 900 > 1000 ms of chunk
    # a chunk shorter than the latency is over before it arrives
    short = timing_checks(Latency(150, 180, "measured"), 2, 0.05, sim_config)
    assert [level for level, _ in short] == ["fail"] and "100 ms" in short[0][1]
    assert timing_checks(Latency(40, 60, "measured"), 10, 0.1, sim_config) == []


def test_a_declared_latency_over_the_plan_timeout_refuses_start_and_validate(
        tmp_path: Path, sim_config) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle(tmp_path / "b", latency={"p50_ms": 832, "p99_ms": 900,
                                                  "measured_on": "a laptop CPU"})
    sim_config.bundle.path = str(bundle)
    with pytest.raises(BundleError, match=r"planner.latency: .*832 ms.*plan_timeout_ms 400"):
        robot_bundle(sim_config)  # what the follower and the planner start with
    out = _cli("config", "validate", "--config", str(REPO / "configs/sim.yaml"),
               "--set", f"bundle.path={bundle}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL planner.latency: planner latency (p50 832 ms / p99 900 ms, declared by the " \
           "bundle on a laptop CPU) >= follower.plan_timeout_ms 400" in out.stdout
    ok = _cli("config", "validate", "--config", str(REPO / "configs/sim.yaml"), "--json",
              "--set", f"bundle.path={bundle}", "--set", "follower.plan_timeout_ms=2000",
              "--set", "planner.hz=1")
    report = json.loads(ok.stdout)
    assert ok.returncode == 0 and report["ok"], ok.stdout
    assert any("the next plan arrives" in w for w in report["warnings"]), report


def test_validate_benches_the_planner_here(slow: Path) -> None:
    out = _cli("config", "validate", "--config", str(REPO / "configs/sim.yaml"),
               "--set", f"bundle.path={slow}", "--set", "follower.plan_timeout_ms=50",
               "--bench", "2", "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 1 and not report["ok"]
    assert report["latency_ms"]["p50"] > 50
    assert any(p.startswith("bench: planner latency (p50 ") and
               ">= follower.plan_timeout_ms 50" in p for p in report["problems"]), report


@pytest.mark.system
def test_a_planner_slower_than_the_plan_timeout_is_logged_and_not_ok(slow: Path,
                                                                     tmp_path: Path) -> None:
    """34 stale plans and `outcome.ok: true` was the bug: now the follower says why it holds
    (rate-limited), the planner says it is slower than planner.hz, and the run is not ok."""
    summary = tmp_path / "s.json"
    proc = _cli("run", "--config", str(REPO / "configs/sim.yaml"), "--set", TOLERANT,
                "--set", f"run_dir={tmp_path / 'run'}", "--set", f"bundle.path={slow}",
                "--set", "follower.plan_timeout_ms=100", "--duration", "8",
                "--summary-json", str(summary))
    s = json.loads(summary.read_text())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert s["planner"]["plans"] >= 2 and s["follower"]["mode_counts"]["TRACK"] == 0
    stale = s["follower"]["dropped_messages"]["stale"]
    assert not s["outcome"]["ok"] and s["outcome"]["final_mode"] == "HOLD"
    assert s["outcome"]["reason"].startswith("the follower never tracked a plan") and \
        f"{stale} dropped as stale (older than follower.plan_timeout_ms 100" in \
        s["outcome"]["reason"], s["outcome"]
    lines = [ln for ln in proc.stderr.splitlines() if "dropped as stale" in ln]
    assert lines and "ms old, follower.plan_timeout_ms is 100" in lines[0], proc.stderr[-3000:]
    assert len(lines) <= 8 / 5 + 1  # rate-limited: one line per 5 s at most
    assert proc.stderr.count("planner slower than planner.hz 5") == 1, proc.stderr[-3000:]


@pytest.mark.system
def test_stop_interrupts_a_plan_in_progress(tmp_path: Path,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    """A plan of hours: stop interrupts it (ONNX Runtime's terminate flag, set by a signal
    watcher while the main thread is inside the engine) and the planner exits 0, in time."""
    endless = respin(make_bundle(tmp_path / "endless", slow_iterations=10), 10**10)
    with Stack(tmp_path, endless) as stack:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoints.telemetry(stack.run_dir, "planner"))
        deadline = time.monotonic() + 60
        while True:  # the planner says when a plan begins
            assert time.monotonic() < deadline, "the planner never started a plan"
            if sub.poll(100) and decode(sub.recv())["in_plan_s"] is not None:
                break
        sub.close(linger=0)
        assert stack.sup.children["planner"].poll() is None
        t0 = time.monotonic()
        stack.signal("planner", 15)
        code = stack.sup.children["planner"].wait(STOP_TIMEOUT_S)
        took = time.monotonic() - t0
    assert code == 0 and took < STOP_TIMEOUT_S / 2, (code, took)
    assert "the plan in progress was interrupted" in capfd.readouterr().err
