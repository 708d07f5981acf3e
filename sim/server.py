"""`duet sim`: the simulated robot as a real-time process.

Threads:
- physics: steps `SimWorld` at sim.physics_hz on absolute monotonic deadlines (sleeps, never
  spins: the follower and the planner share the cores), catches up when late (counting the
  overruns), drops the backlog past `MAX_CATCH_UP_S`, and runs the episode loop (touch
  checks at `TASK_HZ`);
- the device emulator (Dynamixel on a pty, or MIT-mode CAN), from sim/;
- main: renders the scene camera at sim.camera_hz and owns the PUB socket at
  ipc://RUN_DIR/sim: `frame` (image, capture_t_ns, episode), `task` (episode, instruction;
  at each episode start and every `TASK_RESEND_S`) and `episode` (the result of each one).

The first line on stdout is the device the follower opens (pty path or CAN channel; with
per-limb buses the channels, comma-separated).
SIGTERM/SIGINT: stop, write RUN_DIR/sim-summary.json, exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import zmq

from drivers.bus_family import resolve
from drivers.families import FAMILIES, family_of
from runtime.config import ConfigError, DuetConfig, SimConfig
from runtime.follower.buses import bus_sections
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, pack_array
from runtime.ipc.signals import stop_with_supervisor
from runtime.ipc.sockets import open_socket
from runtime.stack.summary import SimSummary
from sim.actuators import Actuators
from sim.camera import SceneCamera
from sim.faults import FaultInjector, LinkGroup, MotorLink
from sim.robot import describe
from sim.task import RUNNING, SUCCESS, Episode, TaskTracker, episode_seed
from sim.world import SimWorld

TASK_HZ = 100.0  # touch checks per simulated second
TASK_RESEND_S = 0.2  # a late subscriber (a restarted planner) learns the task within 0.2 s
MAX_CATCH_UP_S = 0.1  # further behind than this, the backlog is dropped, not replayed
SEND_HWM = 16


def _open_link(cfg: DuetConfig, actuators: Actuators) -> MotorLink:
    """Start the emulated motors behind the configured transport (one link per bus): each
    bus family names its emulator (drivers/families.py)."""
    transport = (cfg.sim or SimConfig()).transport
    joints = list(cfg.robot.joints)
    links: list[MotorLink] = []
    try:
        for bus, names in bus_sections(cfg):
            fam = family_of(bus)
            if fam.sim_transport != transport:
                kinds = " or ".join(repr(k) for k, f in FAMILIES.items()
                                    if f.sim_transport == transport)
                raise ConfigError(f"sim.transport is {transport!r} but a bus is not {kinds}")
            serve = resolve(fam.emulator)
            links.append(serve(actuators, bus, [joints.index(n) for n in names], cfg))
    except BaseException:
        for link in links:
            link.stop()
        raise
    return links[0] if len(links) == 1 else LinkGroup(links)


class PhysicsLoop:
    """The physics thread: real-time stepping plus the episode loop. Results go to
    `events` as (type, body) for the publisher."""

    def __init__(self, world: SimWorld, sim_cfg: SimConfig) -> None:
        self.world = world
        self.cfg = sim_cfg
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.stop_event = threading.Event()
        self.steps = 0
        self.overruns = 0  # steps run more than one period after their deadline
        self.dropped_steps = 0  # steps skipped after falling MAX_CATCH_UP_S behind
        self.episodes = 0
        self.successes = 0
        self.episode_index = -1
        self.tracker: TaskTracker | None = None
        self._task_every = max(1, round(sim_cfg.physics_hz / TASK_HZ))
        self._thread = threading.Thread(target=self._run, name="sim-physics", daemon=True)

    def start(self) -> None:
        self._next_episode()
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self._thread.join(timeout=5.0)

    def _next_episode(self) -> None:
        self.episode_index += 1
        episode = Episode(episode_seed(self.cfg.seed, self.episode_index),
                          self.cfg.two_step_fraction, self.cfg.phrasing,
                          self.cfg.robot.workspace)
        self.tracker = TaskTracker(episode, self.cfg.episode_timeout_s)
        self.tracker.start(self.world, self.world.time)  # the arm stays where it is
        self.events.put(("task", self.task_body()))

    def task_body(self) -> dict[str, Any]:
        assert self.tracker is not None
        return {"episode": self.episode_index, "instruction": self.tracker.episode.instruction}

    def _check_task(self) -> None:
        tracker = self.tracker
        assert tracker is not None
        status = tracker.update(self.world, self.world.time)
        if status == RUNNING:
            return
        self.episodes += 1
        self.successes += status == SUCCESS
        self.events.put(("episode", {
            "episode": self.episode_index,
            "instruction": tracker.episode.instruction,
            "success": status == SUCCESS,
            "reason": status,
            "touched": list(tracker.touched),
            "duration_s": round(tracker.duration_s, 3),
        }))
        self._next_episode()

    def _run(self) -> None:
        if self.cfg.rt_priority > 1:
            # The physics thread holds the actuator lock the servos need for every reply:
            # it must not be preempted by ordinary work while holding it (priority inversion).
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.cfg.rt_priority - 1))
        period = round(1e9 / self.cfg.physics_hz)
        max_behind = round(MAX_CATCH_UP_S * 1e9)
        deadline = time.monotonic_ns() + period
        while not self.stop_event.is_set():
            now = time.monotonic_ns()
            if now < deadline:
                time.sleep((deadline - now) / 1e9)
                continue
            if now - deadline > max_behind:
                skipped = (now - deadline) // period
                self.dropped_steps += skipped
                deadline += skipped * period
            while deadline <= now:  # every step that is due, late ones included
                if now - deadline > period:
                    self.overruns += 1
                self.world.step(1)
                self.steps += 1
                deadline += period
                if self.steps % self._task_every == 0:
                    self._check_task()


class Publisher:
    """Frames, task announcements and episode results on one PUB socket."""

    def __init__(self, run_dir: str) -> None:
        self.ctx = zmq.Context()
        self.sock = open_socket(self.ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoints.sim(run_dir))
        self.encoder = Encoder()

    def send(self, type_: str, body: dict[str, Any]) -> None:
        try:
            self.sock.send(self.encoder.encode(type_, body), zmq.NOBLOCK)
        except zmq.Again:
            pass  # a PUB socket drops for slow subscribers; never block the sim

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def _serve_camera(loop: PhysicsLoop, publisher: Publisher,
                  cameras: dict[str, SceneCamera], camera_hz: float,
                  stop: threading.Event) -> dict[str, float]:
    """Main-thread loop: render and publish each camera's frames, forward the physics
    thread's events, re-announce the task. Returns render timing figures (ms)."""
    world = loop.world
    period = 1.0 / camera_hz
    next_frame = time.monotonic()
    next_task = next_frame + TASK_RESEND_S
    render_ms: list[float] = []
    while not stop.is_set():
        timeout = max(0.0, min(next_frame, next_task) - time.monotonic())
        try:
            type_, body = loop.events.get(timeout=timeout)
            publisher.send(type_, body)
            if type_ == "task":
                next_task = time.monotonic() + TASK_RESEND_S
            continue
        except queue.Empty:
            pass
        now = time.monotonic()
        if now >= next_task:
            publisher.send("task", loop.task_body())
            next_task = now + TASK_RESEND_S
        if now >= next_frame:
            for name, camera in cameras.items():
                capture_t_ns = time.monotonic_ns()
                world.snapshot(camera.shadow)
                episode = loop.episode_index
                image = camera.render(camera.shadow)  # releases the GIL while OpenGL draws
                render_ms.append((time.monotonic_ns() - capture_t_ns) / 1e6)
                publisher.send("frame", {"camera": name, "image": pack_array(image),
                                         "capture_t_ns": capture_t_ns, "episode": episode})
            next_frame += period
            if next_frame < now:  # fell behind (slow render): skip, do not burst
                next_frame = now + period
    if not render_ms:
        return {}
    return {"render_ms_p50": round(float(np.median(render_ms)), 2),
            "render_ms_p99": round(float(np.percentile(render_ms, 99)), 2),
            "frames": len(render_ms)}


def run_sim(cfg: DuetConfig, ready_line: bool = True) -> int:
    """Run the sim until SIGTERM/SIGINT; write RUN_DIR/sim-summary.json; return 0."""
    sim_cfg = cfg.sim or SimConfig()
    robot = describe(cfg)  # the MJCF and the config, checked against each other
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Physics and the renderer share one interpreter: hand the GIL over every 100 µs instead
    # of every 5 ms, so a physics step never waits long behind a frame (the motors answer
    # from child processes of their own: sim/faults.py).
    sys.setswitchinterval(1e-4)

    stop = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    stop_with_supervisor()

    # shared actuators: the servos are served from a child process (sim/faults.py)
    world = SimWorld(seed=sim_cfg.seed, physics_hz=sim_cfg.physics_hz,
                     actuators=Actuators.shared(robot.n), robot=robot)
    # The robot starts homed: servos enabled and holding its home pose, as after homing,
    # so the follower's INIT reads a meaningful pose rather than an arm slumped on the table.
    world.actuators.torque_enabled[:] = True
    # The motors first: their child process is forked before any GL state exists, and the
    # follower opens its bus while the cameras set up.
    publisher = Publisher(str(run_dir))
    loop = PhysicsLoop(world, sim_cfg)
    link = _open_link(cfg, world.actuators)
    faults = FaultInjector(endpoints.sim_control(str(run_dir)), link, world.actuators)
    cpu0, wall0 = time.process_time(), time.monotonic()
    loop.start()
    if ready_line:
        print(link.device, flush=True)
    cameras: dict[str, SceneCamera] = {}
    try:
        # The GL contexts belong to this (the main) thread. Only the cameras the config names
        # are rendered.
        for name, cam in cfg.planner.cameras.items():
            if cam.kind == "sim":
                cameras[name] = SceneCamera(world.model, cam.width, cam.height, camera=name)
        render = _serve_camera(loop, publisher, cameras, sim_cfg.camera_hz, stop)
    finally:
        loop.stop()
        faults.close()
        reply_us = link.reply_us().summary(("p50", "p99", "max"))
        link.stop()
        publisher.close()
        for camera in cameras.values():
            camera.close()
    wall = time.monotonic() - wall0
    summary: SimSummary = {
        "episodes": loop.episodes, "successes": loop.successes,
        "success_rate": loop.successes / loop.episodes if loop.episodes else 0.0,
        "motor_reply_us": reply_us}
    (run_dir / endpoints.SIM_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    stats = {"wall_s": round(wall, 2), "cpu_percent": round(100 * (time.process_time() - cpu0)
                                                          / max(wall, 1e-9), 1),
             "steps": loop.steps, "achieved_hz": round(loop.steps / max(wall, 1e-9), 1),
             "overruns": loop.overruns, "dropped_steps": loop.dropped_steps,
             "motor_reply_us": reply_us, **render}
    print(f"sim: {json.dumps(stats)}", file=sys.stderr, flush=True)
    return 0
