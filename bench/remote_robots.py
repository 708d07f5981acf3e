"""Simulated robots for the planner server, and the server as a separate process: what the
remote benchmark and the off-board planner tests drive.

A `SimulatedRobot` speaks the relay's own wire and checks (`ServerLink`, runtime/remote/relay.py):
it stamps a joint state now, sends the observation the bundle's contract reads (fixed frames
as JPEG, its own q) and takes the plans that answer it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from runtime.config import RemoteConfig
from runtime.ipc import endpoints, keys
from runtime.ipc.messages import decode
from runtime.model.bundle import Bundle
from runtime.model.plan import PlanBounds
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import state_times_ns
from runtime.remote import jpeg
from runtime.remote.relay import Answer, ServerLink
from runtime.remote.wire import bundle_id, encode_observation

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "touch the red block"


@dataclass
class Keys:
    server_public: Path
    server_secret: Path
    allow: Path  # the server's allow-list directory
    robots: dict[str, Path]  # name -> secret file (admitted robots and intruders alike)


def make_keys(root: Path, admitted: list[str], intruders: tuple[str, ...] = ()) -> Keys:
    server_public, server_secret = keys.generate("server", root / "server")
    allow = root / "allow"
    allow.mkdir(parents=True, exist_ok=True)
    robots = {}
    for name in [*admitted, *intruders]:
        public, secret = keys.generate(name, root / "robots")
        if name in admitted:
            (allow / public.name).write_bytes(public.read_bytes())
        robots[name] = secret
    return Keys(server_public, server_secret, allow, robots)


def remote_config(endpoint: str, k: Keys | None, robot: str) -> RemoteConfig:
    if k is None:
        return RemoteConfig(endpoint=endpoint, insecure=True)
    return RemoteConfig(endpoint=endpoint, server_key=str(k.server_public),
                        robot_key=str(k.robots[robot]))


class PlannerServerProcess:
    """`duet planner --listen` in a subprocess; the port is the one the OS picked."""

    def __init__(self, run_dir: Path, bundle: Path, k: Keys | None, listen: str =
                 "tcp://127.0.0.1:0", sets: list[str] | None = None,
                 prefix: list[str] | None = None, config: Path = ROOT / "configs/sim.yaml",
                 start_timeout_s: float = 60.0) -> None:
        args = [*(prefix or []), sys.executable, "-m", "runtime.cli", "planner", "--config",
                str(config), "--site", "/nonexistent", "--set", f"run_dir={run_dir}",
                "--set", f"bundle.path={bundle}", "--listen", listen]
        if k is None:
            args += ["--set", "planner.serve.insecure=true"]
        else:
            args += ["--set", f"planner.serve.key={k.server_secret}",
                     "--set", f"planner.serve.allow={k.allow}"]
        for item in sets or []:
            args += ["--set", item]
        self.run_dir = run_dir
        self.proc = subprocess.Popen(args, cwd=ROOT)
        self.sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(endpoints.telemetry(str(run_dir), "planner-server"))
        try:
            self.endpoint = str(self.telemetry(timeout_s=start_timeout_s)["endpoint"])
        except BaseException:
            self.stop()  # never leak a server (and its Ray cluster) out of a failed start
            raise

    def telemetry(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """A telemetry sample published from now on (every 0.5 s); older ones are skipped."""
        while self.sub.poll(0):
            self.sub.recv()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"planner server exited with {self.proc.returncode}")
            if self.sub.poll(100):
                return decode(self.sub.recv())
        raise TimeoutError("no telemetry from the planner server")

    def stop(self) -> int:
        self.sub.close(linger=0)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class SimulatedRobot:
    def __init__(self, remote: RemoteConfig, bundle: Bundle, joints: list[str],
                 q: np.ndarray, frame: np.ndarray, instruction: str = INSTRUCTION,
                 jpeg_quality: int = 90) -> None:
        self.link = ServerLink(remote, PlanBounds.joints_only(len(joints)))
        self.contract, self.bundle = bundle.contract, bundle_id(bundle)
        self.q = np.asarray(q, dtype=np.float64)
        self.history = StateHistory(len(joints))
        self.jpegs = {c.camera: jpeg.encode(frame, jpeg_quality) for c in
                      self.contract.cameras()}
        self.instruction = instruction
        self.answers: list[Answer] = []

    def observe(self, bundle: str | None = None) -> bool:
        """A state read now and the observation from it; False when not connected."""
        t = time.monotonic_ns()
        self.history.add(t, q=self.q, dq=np.zeros_like(self.q))
        body = encode_observation(
            self.link.enc, bundle=bundle or self.bundle, t_obs_ns=t,
            states=self.history.rows_at(state_times_ns(self.contract, t)), jpegs=self.jpegs,
            instruction=self.instruction, episode=None, previous=None,
            previous_waypoints=None, expected_s=0.0)
        return self.link.send(body, t, None)

    def receive(self, timeout_ms: int = 0) -> list[Answer]:
        if timeout_ms:
            self.link.sock.poll(timeout_ms)
        got = self.link.receive()
        self.answers += got
        return got

    def close(self) -> None:
        self.link.close()
