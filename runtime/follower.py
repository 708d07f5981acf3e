"""The follower process (System 1): the real-time loop between plans and the motor bus.

Per tick: read state -> publish state -> newest plan -> reference + residual -> safety filter
-> write -> account the deadline. Absolute deadlines on the monotonic clock, sleep-then-spin
waits, preallocated buffers, the GC frozen and collected only when there is slack. Nothing in
the tick logs or blocks: messages are counted here and reported by telemetry.
"""

from __future__ import annotations

import json
import logging
import resource
import select
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from drivers.bus import BusError, MotorBus, MotorFault, MotorState
from drivers.camera import CameraError
from runtime import endpoints
from runtime.bundle import BundleError, load_bundle
from runtime.buses import open_bus
from runtime.config import TUNABLES, DuetConfig
from runtime.engines import EngineError, make_engine
from runtime.messages import Encoder, MessageError, decode, decode_plan, pack_array
from runtime.notify import notifier
from runtime.realtime import apply_realtime, collect_if_slack, freeze_gc
from runtime.reference import ReferenceGenerator
from runtime.safety import Mode, NonFiniteCommand, SafetyFilter, SafetyMachine
from runtime.stats import Ring, summarize
from runtime.tracking import Tracker

log = logging.getLogger("duet.follower")

RING_CAPACITY = 1 << 21  # ~35 min at 1 kHz of per-tick samples for the exit summary


class Follower:
    def __init__(self, cfg: DuetConfig, bus: MotorBus | None = None) -> None:
        self.cfg = cfg
        fc = cfg.follower
        self.n = len(cfg.robot.joints)
        self.period_ns = round(1e9 / fc.hz)
        self.dt = self.period_ns / 1e9
        lim = cfg.robot.limits
        self.pos_min = np.array(lim.position_min)
        self.pos_max = np.array(lim.position_max)
        self.state_margin = lim.state_margin
        self.plan_margin = lim.plan_margin

        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
        follower_spec = bundle.manifest.models.follower
        engine = make_engine(follower_spec, bundle, cfg.bundle.engine)
        self.tracker = Tracker(
            self.n, self.dt,
            ReferenceGenerator(self.n, fc.chunk_strategy, fc.blend_ms / 1000.0),
            engine, lookahead=bundle.manifest.lookahead.steps,
            lookahead_dt=bundle.manifest.lookahead.dt_s,
            residual_max=fc.residual_max, residual_filter_s=fc.residual_filter_ms / 1000.0,
            hold_decel=fc.hold_decel)
        self.tracker.use_residual = fc.residual
        self.filter = SafetyFilter(self.pos_min, self.pos_max, np.array(lim.velocity_max),
                                   np.array(lim.accel_max), self.dt)
        self.safety = SafetyMachine(fc.deadline_storm.misses, fc.deadline_storm.window_ticks)
        self.bus = bus if bus is not None else open_bus(cfg)
        self.state = MotorState(self.n)
        self.desired = np.zeros(self.n)
        self.command = np.zeros(self.n)
        self.torque_on = False
        self.bus_failures = 0  # consecutive failed transactions
        self.bus_dead = False  # FAULT because of the bus: no more traffic until reset

        # counters and samples
        self.ticks = 0
        self.deadline_misses = 0
        self.periods = Ring(RING_CAPACITY)
        self.compute = Ring(RING_CAPACITY)
        self.delivery = Ring(1 << 16)
        self.read_us = Ring(RING_CAPACITY)  # bus read (the wire + the motors' reply)
        self.write_us = Ring(RING_CAPACITY)
        self.logic_us = Ring(RING_CAPACITY)  # everything between read and write (no bus I/O)
        self.mode_counts = np.zeros(len(Mode), dtype=np.int64)
        self.dropped: dict[str, int] = {}
        self.plans_received = 0
        self._pending_plan: tuple[dict[str, Any], np.ndarray] | None = None
        self.plan_t_recv_ns = 0
        self.first_track_ns = 0
        self.stop_requested = False
        self.estop_signal = False

        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._setup_sockets()
        self.enc_state, self.enc_tel, self.enc_ctl = Encoder(), Encoder(), Encoder()
        self.notifier = notifier()

    # ---------------------------------------------------------------- sockets
    def _setup_sockets(self) -> None:
        run_dir = self.cfg.run_dir
        self.plan_sub = self.ctx.socket(zmq.SUB)
        self.plan_sub.setsockopt(zmq.RCVHWM, 4)
        self.plan_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.plan_sub.connect(endpoints.plan(run_dir))
        self._plan_fd = [int(self.plan_sub.getsockopt(zmq.FD))]
        self.state_pub = self.ctx.socket(zmq.PUB)
        self.state_pub.setsockopt(zmq.SNDHWM, 4)
        self.state_pub.bind(endpoints.state(run_dir))
        self.tel_pub = self.ctx.socket(zmq.PUB)
        self.tel_pub.setsockopt(zmq.SNDHWM, 16)
        self.tel_pub.bind(endpoints.telemetry(run_dir, "follower"))
        self.control = self.ctx.socket(zmq.REP)
        self.control.bind(endpoints.control(run_dir))

    def close(self) -> None:
        for sock in (self.plan_sub, self.state_pub, self.tel_pub, self.control):
            sock.close(linger=0)
        self.bus.close()

    # ---------------------------------------------------------------- start-up
    def start(self) -> None:
        """INIT: open the bus, read the motors, command exactly the measured position."""
        self._restore_latch()
        self.bus.open()
        self.bus.read(self.state)
        self._check_state()
        self.filter.reset(self.state.q)
        self.command[:] = self.filter.last
        self.tracker.start_hold(self.command, np.zeros(self.n))
        self.bus.write(self.command)
        latched_off = self.safety.latched and (self.safety.mode == Mode.ESTOP or
                                               self.cfg.follower.fault_action == "torque_off")
        self.bus.enable_torque(not latched_off)
        self.torque_on = not latched_off
        if not self.safety.latched:
            self.safety.hold()
        self.notifier.notify("READY=1")
        self.notifier.notify(f"STATUS={self.safety.mode.name} at {self.cfg.follower.hz:g} Hz")

    @property
    def _latch_path(self) -> Path:
        return Path(self.cfg.run_dir) / "follower.latched"

    def _restore_latch(self) -> None:
        """A FAULT/ESTOP survives a restart of the process (watchdog, crash): only an
        explicit reset clears it. The latch file lives in the runtime directory, which
        systemd preserves across restarts (RuntimeDirectoryPreserve) and a reboot clears."""
        try:
            reason = self._latch_path.read_text().strip()
        except OSError:
            return
        self.safety.fault(f"latched before restart: {reason}")

    def _write_latch(self) -> None:
        try:
            self._latch_path.write_text(f"{self.safety.mode.name}: {self.safety.reason}\n")
        except OSError:
            pass  # a read-only run dir must not turn a fault into a crash

    def _check_state(self) -> None:
        q = self.state.q
        if not np.isfinite(q).all() or not np.isfinite(self.state.dq).all():
            self.safety.fault("non-finite state from the bus")
        elif ((q < self.pos_min - self.state_margin)
              | (q > self.pos_max + self.state_margin)).any():
            j = int(np.argmax(np.maximum(self.pos_min - q, q - self.pos_max)))
            self.safety.fault(f"state outside limits: {self.cfg.robot.joints[j]} at {q[j]:.3f} rad")

    # ---------------------------------------------------------------- the loop
    def run(self, duration_s: float | None = None) -> None:
        fc = self.cfg.follower
        spin_ns = int(fc.spin_us * 1000)
        tel_every = max(1, round(fc.hz / fc.telemetry_hz))
        wd_every = max(1, round(fc.hz / 10))
        t_start = time.monotonic_ns()
        t_stop = t_start + int(duration_s * 1e9) if duration_s else None
        self.t_epoch_ns = t_start
        deadline = t_start + self.period_ns
        last_wake = t_start
        last_mode = self.safety.mode
        freeze_gc()
        while not self.stop_requested:
            wake = self._wait(deadline, spin_ns)
            self.periods.add((wake - last_wake) / 1000.0)
            last_wake = wake
            self._tick(wake)
            done = time.monotonic_ns()
            self.compute.add((done - wake) / 1000.0)
            self.ticks += 1
            missed = done > deadline + self.period_ns
            if missed:
                self.deadline_misses += 1
            if self.safety.account_deadline(missed) and self.safety.fault("deadline-miss storm"):
                self._on_fault()
            if self.ticks % tel_every == 0:
                self._publish_telemetry()
            if self.ticks % wd_every == 0:
                self.notifier.notify("WATCHDOG=1")
                if self.safety.mode != last_mode:
                    last_mode = self.safety.mode
                    why = f": {self.safety.reason}" if self.safety.latched else ""
                    self.notifier.notify(f"STATUS={last_mode.name} at {fc.hz:g} Hz{why}")
            self._serve_control()
            deadline += self.period_ns
            now = time.monotonic_ns()
            if now > deadline:  # fell more than a period behind: resynchronise, don't burst
                skipped = (now - deadline) // self.period_ns + 1
                deadline += skipped * self.period_ns
            collect_if_slack(deadline - time.monotonic_ns())
            if t_stop is not None and now >= t_stop:
                break
            if self.estop_signal:
                self.estop_signal = False
                self._estop("signal")
        self._controlled_stop()

    def _tick(self, now_ns: int) -> None:
        mode = self.safety.mode
        self.mode_counts[mode] += 1
        if self.bus_dead:
            return
        try:
            self.bus.read(self.state)
            self.bus_failures = 0
            self.read_us.add((time.monotonic_ns() - now_ns) / 1000.0)
        except MotorFault as exc:
            self._fault(f"motor fault: {exc}", bus_dead=False)
            return
        except BusError as exc:
            self.bus_failures += 1
            if self.bus_failures >= self.cfg.follower.bus_error_threshold:
                self._fault(f"bus: {exc}", bus_dead=True)
            return
        t_logic = time.monotonic_ns()
        if self.ticks % self.cfg.follower.state_pub_every == 0:
            self._publish_state()
        self._check_state()
        if self.safety.latched:
            if self.safety.mode == Mode.FAULT and mode != Mode.FAULT:
                self._on_fault()
            if self.safety.mode == Mode.ESTOP or not self.torque_on:
                return
        t = (now_ns - self.t_epoch_ns) / 1e9
        self._take_plans(now_ns, t)
        try:
            self._compute_command(now_ns, t)
            self.filter.apply(self.desired, self.command)
        except NonFiniteCommand:
            self._fault("non-finite command", bus_dead=False)
            return
        t_write = time.monotonic_ns()
        self.logic_us.add((t_write - t_logic) / 1000.0)
        try:
            self.bus.write(self.command)
            self.write_us.add((time.monotonic_ns() - t_write) / 1000.0)
        except BusError as exc:
            self.bus_failures += 1
            if self.bus_failures >= self.cfg.follower.bus_error_threshold:
                self._fault(f"bus: {exc}", bus_dead=True)
        except ValueError as exc:  # the driver refused the command (e.g. a servo's own limits)
            self._fault(f"command refused by the driver: {exc}", bus_dead=False)

    def _compute_command(self, now_ns: int, t: float) -> None:
        fresh = (self.plan_t_recv_ns > 0
                 and now_ns - self.plan_t_recv_ns < self.cfg.follower.plan_timeout_ms * 1e6
                 and not self.tracker.reference.expired(t))
        mode = self.safety.mode
        if mode == Mode.TRACK and not fresh:
            self.safety.hold()
            self.tracker.start_hold(self.filter.last, self.filter.last_vel)
        elif mode == Mode.HOLD and fresh and self.tracker.reference.has_plan:
            self.safety.track()
            if not self.first_track_ns:
                self.first_track_ns = now_ns
        if self.safety.mode == Mode.TRACK:
            self.tracker.track_command(t, self.state.q, self.state.dq, self.desired)
        else:
            self.desired[:] = self.tracker.hold_command()

    def _wait(self, deadline: int, spin_ns: int) -> int:
        """Sleep until `spin_ns` before the deadline, receiving plans meanwhile, then spin.

        The sleep is a select() on the plan socket's (edge-triggered) notification fd, so a
        plan is taken the moment it arrives and delivery latency is the transport's, not the
        tick period's. ZMQ_EVENTS is checked before each sleep, which re-arms the fd.
        """
        while True:
            remaining = deadline - time.monotonic_ns() - spin_ns
            if remaining <= 0:
                break
            if int(self.plan_sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._receive_plans()
                continue
            select.select(self._plan_fd, (), (), remaining / 1e9)
        while True:
            now = time.monotonic_ns()
            if now >= deadline:
                return now

    def _receive_plans(self) -> None:
        """Drain the plan socket; keep the newest valid plan; count and drop the rest."""
        while True:
            try:
                frame = self.plan_sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            t_recv = time.monotonic_ns()
            try:
                msg, w = decode_plan(frame, self.n)
                if ((w < self.pos_min - self.plan_margin)
                        | (w > self.pos_max + self.plan_margin)).any():
                    raise MessageError("limits", "waypoints outside joint limits")
            except MessageError as exc:
                self.dropped[exc.kind] = self.dropped.get(exc.kind, 0) + 1
                continue
            self.delivery.add((t_recv - msg["t_ns"]) / 1000.0)
            self.plans_received += 1
            self._pending_plan = (msg, w)

    def _take_plans(self, now_ns: int, t: float) -> None:
        """Hand the newest plan received since the last tick to the reference."""
        self._receive_plans()
        if self._pending_plan is None:
            return
        msg, w = self._pending_plan
        self._pending_plan = None
        self.plan_t_recv_ns = now_ns
        if self.safety.mode in (Mode.HOLD, Mode.TRACK):
            t_obs = (msg["t_obs_ns"] - self.t_epoch_ns) / 1e9
            self.tracker.add_plan(w, msg["dt_s"], t_obs, t)

    # ---------------------------------------------------------------- faults
    def _fault(self, reason: str, bus_dead: bool) -> None:
        self.bus_dead = self.bus_dead or bus_dead
        if self.safety.fault(reason):
            self._on_fault()

    def _on_fault(self) -> None:
        """Safe stop as configured: brake to a hold, or torque off."""
        self._write_latch()
        self.notifier.notify(f"STATUS=FAULT: {self.safety.reason}")
        if self.cfg.follower.fault_action == "torque_off":
            self._torque(False)
        else:
            self.tracker.start_hold(self.filter.last, self.filter.last_vel)

    def _estop(self, reason: str) -> None:
        if self.safety.estop(reason):
            self._torque(False)
            self._write_latch()
            self.notifier.notify(f"STATUS=ESTOP: {reason}")

    def _torque(self, on: bool) -> None:
        if self.bus_dead:
            self.torque_on = False if not on else self.torque_on
            return
        try:
            self.bus.enable_torque(on)
            self.torque_on = on
        except BusError:
            self.torque_on = False if not on else self.torque_on

    def reset(self) -> tuple[bool, str]:
        """Leave FAULT/ESTOP: reopen the bus if it died, re-read, hold the measured position."""
        if not self.safety.latched:
            return True, f"already {self.safety.mode.name}"
        try:
            if self.bus_dead:
                self.bus.close()
                self.bus.open()
            self.bus.read(self.state)
        except BusError as exc:
            return False, f"bus not back: {exc}"
        self.bus_dead = False
        self.bus_failures = 0
        self.safety.reset()
        self._latch_path.unlink(missing_ok=True)
        self._check_state()
        if self.safety.latched:
            return False, f"still faulted: {self.safety.reason}"
        self.filter.reset(self.state.q)
        self.command[:] = self.filter.last
        self.tracker.start_hold(self.command, np.zeros(self.n))
        try:
            self.bus.write(self.command)
            self.bus.enable_torque(True)
            self.torque_on = True
        except BusError as exc:
            self._fault(f"bus: {exc}", bus_dead=True)
            return False, str(exc)
        self.plan_t_recv_ns = 0
        self.notifier.notify("STATUS=HOLD (reset)")
        return True, "HOLD"

    def _controlled_stop(self) -> None:
        """SIGTERM / end of run: brake to rest, then torque per config."""
        if not self.bus_dead and not self.safety.latched and self.torque_on:
            self.tracker.start_hold(self.filter.last, self.filter.last_vel)
            for _ in range(int(0.3 / self.dt)):
                try:
                    self.filter.apply(self.tracker.hold_command(), self.command)
                    self.bus.write(self.command)
                except (BusError, NonFiniteCommand):
                    break
                time.sleep(self.dt)
        if self.cfg.follower.stop_action == "torque_off":
            self._torque(False)
        self.notifier.notify("STOPPING=1")

    # ---------------------------------------------------------------- outputs
    def _publish_state(self) -> None:
        st = self.state
        frame = self.enc_state.encode("state", {
            "q": pack_array(st.q), "dq": pack_array(st.dq), "effort": pack_array(st.effort),
            "mode": self.safety.mode.name, "t_read_ns": st.t_ns}, t_ns=st.t_ns or None)
        try:
            self.state_pub.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def telemetry(self) -> dict[str, Any]:
        window = int(self.cfg.follower.hz)
        periods = self.periods.values(window)
        stats = self.bus.stats
        return {
            "source": "follower",
            "mode": self.safety.mode.name,
            "fault_reason": self.safety.reason,
            "target_hz": self.cfg.follower.hz,
            "achieved_hz": round(1e6 / float(periods.mean()), 2) if periods.size else 0.0,
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "period_jitter_us": summarize(np.abs(periods - self.period_ns / 1000.0)),
            "tick_compute_us": summarize(self.compute.values(window)),
            "plan_age_ms": round((time.monotonic_ns() - self.plan_t_recv_ns) / 1e6, 1)
            if self.plan_t_recv_ns else None,
            "plan_delivery_us": summarize(self.delivery.values(100), ("p50", "p99")),
            "plans": self.plans_received,
            "dropped_messages": dict(self.dropped),
            "bus": {"reads": stats.reads, "writes": stats.writes, "errors": stats.errors,
                    "retries": stats.retries, "crc_errors": stats.crc_errors,
                    "timeouts": stats.timeouts},
            "safety": {"faults": self.safety.faults, "clamped_commands": self.filter.clamped,
                       "estops": self.safety.estops},
            "joint_names": list(self.cfg.robot.joints),
            "q": pack_array(self.state.q),
            "tracking_error": pack_array(self.tracker.ref_now - self.state.q),
        }

    def _publish_telemetry(self) -> None:
        try:
            self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _serve_control(self) -> None:
        try:
            frame = self.control.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            req = decode(frame, "request")
            ok, error, result = self._handle(req.get("cmd"), req.get("args") or {})
        except MessageError as exc:
            ok, error, result = False, f"bad request: {exc}", {}
        reply = {"ok": ok, "error": error, "result": result}
        self.control.send(self.enc_ctl.encode("reply", reply))

    def _handle(self, cmd: Any, args: dict[str, Any]) -> tuple[bool, str | None, dict[str, Any]]:
        if cmd == "status":
            tel = self.telemetry()
            tel.pop("q")
            tel.pop("tracking_error")
            return True, None, tel
        if cmd == "estop":
            self._estop(str(args.get("reason", "control")))
            return True, None, {"mode": self.safety.mode.name}
        if cmd == "reset":
            ok, text = self.reset()
            return ok, None if ok else text, {"mode": self.safety.mode.name, "detail": text}
        if cmd == "set":
            return self._set(str(args.get("key")), args.get("value"))
        if cmd == "get":
            return True, None, {"config": self.cfg.model_dump(mode="json")}
        return False, f"unknown command {cmd!r}", {}

    def _set(self, key: str, value: Any) -> tuple[bool, str | None, dict[str, Any]]:
        if key not in TUNABLES:
            return False, f"{key} is not live-tunable: restart needed", {}
        name = key.split(".", 1)[1]
        try:
            setattr(self.cfg.follower, name, value)  # validate_assignment checks type/range
        except ValueError as exc:
            return False, f"{key}: {exc}", {}
        fc = self.cfg.follower
        ref = self.tracker.reference
        ref.blend_s = fc.blend_ms / 1000.0
        if ref.strategy != fc.chunk_strategy:
            ref.strategy = fc.chunk_strategy
            ref.clear()
        self.tracker.use_residual = fc.residual
        self.tracker.residual_max = fc.residual_max
        self.tracker.residual_filter_s = fc.residual_filter_ms / 1000.0
        self.tracker.brake.decel = fc.hold_decel
        return True, None, {key: getattr(fc, name)}

    def summary(self) -> dict[str, Any]:
        periods = self.periods.values()
        elapsed = periods.sum() / 1e6 if periods.size else 0.0
        return {
            "target_hz": self.cfg.follower.hz,
            "achieved_hz": round(periods.size / elapsed, 2) if elapsed else 0.0,
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "period_jitter_us": summarize(np.abs(periods - self.period_ns / 1000.0),
                                          ("p50", "p99", "p999", "max")),
            "tick_compute_us": summarize(self.compute.values()),
            "bus_read_us": summarize(self.read_us.values()),
            "bus_write_us": summarize(self.write_us.values()),
            "logic_us": summarize(self.logic_us.values()),
            "mode_counts": {m.name: int(self.mode_counts[m]) for m in Mode},
            "first_track_ns": self.first_track_ns,
            "plan_delivery_us": summarize(self.delivery.values(), ("p50", "p99")),
            "plans_received": self.plans_received,
            "dropped_messages": dict(self.dropped),
            "bus": {"errors": self.bus.stats.errors, "reads": self.bus.stats.reads,
                    "writes": self.bus.stats.writes},
            "safety": {"faults": self.safety.faults, "clamped_commands": self.filter.clamped,
                       "estops": self.safety.estops, "last_reason": self.safety.reason},
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def run_follower(cfg: DuetConfig, duration_s: float | None = None) -> int:
    try:
        follower = Follower(cfg)
    except (BundleError, EngineError, BusError, CameraError) as exc:
        log.error("%s", exc)
        return 2
    for line in apply_realtime(cfg.follower.realtime.sched_fifo_priority,
                               cfg.follower.realtime.cpu, cfg.follower.realtime.mlockall):
        log.info("realtime: %s", line)

    def _stop(signum: int, _frame: Any) -> None:
        follower.stop_requested = True

    def _estop(signum: int, _frame: Any) -> None:
        follower.estop_signal = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGUSR1, _estop)
    try:
        try:
            follower.start()
        except BusError as exc:
            log.error("motors not readable at start: %s", exc)
            return 2
        log.info("follower ready: %s at %g Hz", follower.safety.mode.name, cfg.follower.hz)
        follower.run(duration_s)
    finally:
        summary = follower.summary()
        Path(cfg.run_dir, "follower-summary.json").write_text(json.dumps(summary, indent=1))
        follower.close()
    log.info("follower stopped: %s", json.dumps(summary["safety"]))
    return 0
