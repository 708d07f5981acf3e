"""The follower process (System 1): an I/O shell around the follower core (core.py).

The core decides; this process reads and writes the bus, receives plans, publishes state and
telemetry, serves the control socket, talks to systemd and keeps the latch file. Per tick:
read -> core.step -> write (nothing else between them) -> publish state -> account the
deadline. Absolute deadlines on the monotonic clock, a wait on the plan socket's fd then a
spin, a frozen GC, preallocated buffers.
What the core decided (mode changes) is applied after the bus write: logged once with its
reason, announced to systemd, latched across restarts. Telemetry, control requests and GC run
only in the tick's slack.

Bus lifecycle (ros2_control style): this process owns the bus -- open, read the goal the
motors already hold, enable, read/write, disable, close -- except while a `reset` reopens it
on a worker thread; the loop then skips bus traffic (the motors hold or stay torque-off) and
keeps its deadlines.

One class on purpose (over 400 lines): the loop, its bus I/O and the control handlers that run
in its slack share the bus, the core and the tick's timing. What stands alone lives beside it:
the figures and records it publishes (figures.py), the latch (latch.py), the reset's worker
(reset.py), the bus from the config (buses.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import zmq

from drivers.bus import BusError, CommandError, MotorBus, MotorFault, MotorState
from drivers.camera import CameraError
from runtime.config import TUNABLES, DuetConfig
from runtime.follower.buses import open_bus
from runtime.follower.core import CoreSettings, FollowerCore, PlanRejected
from runtime.follower.cores import claim_core
from runtime.follower.figures import LoopFigures
from runtime.follower.latch import Latch
from runtime.follower.realtime import apply_realtime, collect_if_slack, freeze_gc
from runtime.follower.records import FollowerSummary, FollowerTelemetry
from runtime.follower.reset import ResetJob
from runtime.follower.safety import LATCHED, Mode
from runtime.ipc import endpoints, rundir
from runtime.ipc.access import OPERATOR, Policy, ZapHandler, uid_of
from runtime.ipc.follower_mode import reset_command
from runtime.ipc.iothreads import realtime_io_threads
from runtime.ipc.logs import key_values
from runtime.ipc.messages import Encoder, FrameTemplate, MessageError, decode_plan
from runtime.ipc.notify import notifier
from runtime.ipc.rpc import Command, Deferred, RequestError, bind_server
from runtime.ipc.signals import SUPERVISOR_ENV, stop_on_signals
from runtime.ipc.sockets import open_socket
from runtime.model.bundle import BundleError
from runtime.model.engines import EngineError, engine_options
from runtime.model.residual import residual_model
from runtime.model.robot_bundle import robot_bundle

log = logging.getLogger("duet.follower")

SLACK_FOR_TELEMETRY_NS = 400_000  # publish telemetry only with this much time to the deadline
STALE_LOG_EVERY_NS = 5_000_000_000  # plans dropped as stale: one log line per 5 s at most
EXIT_FAULT, EXIT_ESTOP = 3, 4  # the follower ended latched: shown by systemd and `duet run`


class Follower:
    def __init__(self, cfg: DuetConfig, bus: MotorBus | None = None) -> None:
        self.cfg = cfg
        fc = cfg.follower
        self.n = len(cfg.robot.joints)
        self.period_ns = round(1e9 / fc.hz)
        self.run_dir = rundir.prepare(cfg.run_dir)
        # One stack per run dir: taken before any socket is bound (binding an ipc path
        # replaces a live one).
        self.lock = rundir.RunLock(self.run_dir, endpoints.FOLLOWER_LOCK).acquire()
        try:
            bundle = robot_bundle(cfg)
            model = residual_model(bundle, list(cfg.robot.joints), cfg.bundle.engine,
                                   **engine_options(cfg.bundle, "follower"))
        except BaseException:
            self.lock.release()
            raise
        self.core = FollowerCore(CoreSettings.from_config(cfg), model)
        self.bus = bus if bus is not None else open_bus(cfg)
        self.state = MotorState(self.n)
        self._goal = np.zeros(self.n)
        self.torque_on = False
        self.reset_job: ResetJob | None = None
        state = None if cfg.state_dir is None else Path(cfg.state_dir) / endpoints.LATCH
        self.latch = Latch(self.run_dir / endpoints.LATCH, state)
        self.stop_requested = False
        self.estop_signal = False

        self.figures = LoopFigures(cfg)  # counters and per-tick samples
        self._state_countdown = 0  # ticks to the next state message
        self._stale_logged = 0  # stale drops already told in the log
        self._next_stale_log_ns = 0

        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # before the first socket: the I/O threads start with it
        self.io_report = realtime_io_threads(self.ctx, fc.realtime.sched_fifo_priority - 1)
        policy = Policy(planner_uid=uid_of(cfg.access.planner_user),
                        operator_group=cfg.access.operator_group)
        self.zap = ZapHandler(self.ctx, policy)
        self._setup_sockets()
        self.enc_tel = Encoder()
        self.notifier = notifier()
        # a systemd service (not `duet run`'s child, which may inherit a service's variables):
        # who reads its journal is an operator, not the follower's own user
        self.under_systemd = "INVOCATION_ID" in os.environ and SUPERVISOR_ENV not in os.environ
        wd_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        # ping four times per watchdog period (a late tick still leaves margin), else ten
        # times a second; by the clock, not by ticks (a loop that skips periods under load
        # is alive and must not look stalled)
        self.watchdog_ns = wd_usec * 250 if wd_usec else 100_000_000
        self.next_watchdog_ns = 0

    # ---------------------------------------------------------------- sockets
    def _setup_sockets(self) -> None:
        run_dir = str(self.run_dir)
        self.plan_sub = open_socket(self.ctx, zmq.SUB, endpoints.MAX_PLAN_BYTES)
        self.plan_sub.setsockopt(zmq.RCVHWM, 4)
        self.plan_sub.setsockopt(zmq.SUBSCRIBE, b"")
        ZapHandler.protect(self.plan_sub, "plan")
        # The follower owns the plan endpoint: a planner connects to it, nobody can take it.
        self.plan_sub.bind(endpoints.plan(run_dir))
        self._plan_fd = [int(self.plan_sub.getsockopt(zmq.FD))]
        self.state_pub = open_socket(self.ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.state_pub.setsockopt(zmq.SNDHWM, 4)
        self.state_pub.bind(endpoints.state(run_dir))
        self.tel_pub = open_socket(self.ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.tel_pub.setsockopt(zmq.SNDHWM, 16)
        self.tel_pub.bind(endpoints.telemetry(run_dir, "follower"))
        self.control = bind_server(self.ctx, endpoints.control(run_dir), {
            "status": Command(self._cmd_status, OPERATOR, "mode, rates, counters"),
            "estop": Command(self._cmd_estop, OPERATOR, "torque off until reset"),
            "reset": Command(self._cmd_reset, OPERATOR,
                             "leave ESTOP (operators) or FAULT (admin), hold",
                             admin_if=self._reset_needs_admin),
            "set": Command(self._cmd_set, help="change a live tunable"),
            "get": Command(self._cmd_get, help="the running config"),
        }, zap_domain="control")
        like = np.zeros(self.n)
        self.state_frames = {mode: FrameTemplate(
            "state", ("t_read_ns",), {"q": like, "dq": like, "effort": like, "q_cmd": like},
            {"mode": mode.name}) for mode in Mode}

    def close(self) -> None:
        for sock in (self.plan_sub, self.state_pub, self.tel_pub, self.control.sock):
            sock.close(linger=0)
        self.zap.close()
        self.bus.close()
        self.lock.release()

    # ---------------------------------------------------------------- start-up
    def start(self) -> None:
        """INIT: open the bus, read the motors and what they hold; the first command is
        that goal (never a jump), then torque as the core wants it."""
        latched = self.latch.read()
        self.bus.open()
        self.bus.read(self.state)
        torque_on = self.bus.present_goal(self._goal)
        self.torque_on = torque_on
        t0 = time.monotonic_ns()
        self.core.start(t0, self.state.q, self._goal if torque_on else None, latched)
        if self.core.torque_wanted and not torque_on:
            self.bus.write(self.core.command)
        self._apply_transitions()
        self._sync_torque()
        self.notifier.notify("READY=1")
        self._notify_status()

    # ---------------------------------------------------------------- the loop
    def run(self, duration_s: float | None = None) -> None:
        fc = self.cfg.follower
        spin_ns = int(fc.spin_us * 1000)
        tel_every_ns = round(1e9 / fc.telemetry_hz)
        t_start = time.monotonic_ns()
        t_stop = t_start + int(duration_s * 1e9) if duration_s else None
        deadline = t_start + self.period_ns
        last_wake = t_start
        next_tel = t_start
        freeze_gc()
        while not self.stop_requested:
            wake = self._wait(deadline, spin_ns)
            self._tick(wake)
            done = time.monotonic_ns()
            self._take_plans()  # one that came during the spin or the tick, before the rest
            missed = done > deadline + self.period_ns
            self.figures.tick((wake - last_wake) / 1000.0, (done - wake) / 1000.0, missed)
            last_wake = wake
            self.core.account_deadline(missed)
            if self.core.transitions:
                self._apply_transitions()
            if self.reset_job is not None and self.reset_job.done.is_set():
                self._finish_reset()
            if self.estop_signal:
                self.estop_signal = False
                self._estop("SIGUSR1")
            deadline += self.period_ns
            now = time.monotonic_ns()
            if now >= self.next_watchdog_ns:
                self.notifier.notify("WATCHDOG=1")
                self.next_watchdog_ns = now + self.watchdog_ns
            if now > deadline:  # fell more than a period behind: resynchronise, don't burst
                deadline += ((now - deadline) // self.period_ns + 1) * self.period_ns
            if deadline - now > SLACK_FOR_TELEMETRY_NS:
                self.core.slack()
                if self.figures.fold_due:
                    self.figures.fold()
                elif now >= next_tel:
                    next_tel = now + tel_every_ns
                    self._publish_telemetry()
                    if now >= self._next_stale_log_ns:
                        self._log_stale(now)
                self._take_plans()  # the slack's work takes up to a few hundred µs
            if int(self.control.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self.control.serve_pending(limit=1)
            collect_if_slack(deadline - time.monotonic_ns())
            if t_stop is not None and now >= t_stop:
                break
        self._controlled_stop()

    def _tick(self, now_ns: int) -> None:
        """Bus read, core.step, bus write -- and nothing else between them (`logic_us` is
        exactly the core's step). Figures and the state message come after the write."""
        core = self.core
        if core.bus_dead or self.reset_job is not None:
            core.idle_tick()  # no bus traffic: the motors hold on their own
            return
        try:
            self.bus.read(self.state)
        except MotorFault as exc:
            core.idle_tick()
            core.fault(f"motor fault: {exc}")
            return
        except BusError as exc:
            core.idle_tick()
            core.bus_failed(str(exc))
            return
        core.bus_ok()
        t_read = time.monotonic_ns()
        if core.step(now_ns, self.state.q, self.state.dq) and self.torque_on:
            t_write = time.monotonic_ns()
            try:
                self.bus.write(core.command)
                self.figures.write_us.add((time.monotonic_ns() - t_write) / 1000.0)
            except CommandError as exc:  # the driver refused it (e.g. outside a servo's limits)
                core.fault(f"command refused by the driver: {exc}")
            except BusError as exc:
                core.bus_failed(str(exc))
            self.figures.logic_us.add((t_write - t_read) / 1000.0)
        self.figures.read_us.add((t_read - now_ns) / 1000.0)
        self._state_countdown -= 1
        if self._state_countdown <= 0:
            self._state_countdown = self.cfg.follower.state_pub_every
            self._publish_state()

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
            if self._take_plans():
                continue
            select.select(self._plan_fd, (), (), remaining / 1e9)
        while True:
            now = time.monotonic_ns()
            if now >= deadline:
                return now

    def _take_plans(self) -> bool:
        """Receive the plans waiting, if any (one getsockopt when none is): called between
        the loop's steps, so a plan waits for at most one of them (the tick's read, step and
        write stay together; a plan arriving in the last `spin_us` waits for the tick)."""
        if int(self.plan_sub.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self._receive_plans()
            return True
        return False

    def _receive_plans(self) -> None:
        """Drain the plan socket into the core (it keeps the newest valid one); count and drop
        the rest by reason. Nothing a plan contains can raise out of here."""
        while True:
            try:
                frame = self.plan_sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            t_recv = time.monotonic_ns()
            try:
                msg, w = decode_plan(frame)
                self.core.offer_plan(w, float(msg["dt_s"]), msg["t_obs_ns"], t_recv)
            except (MessageError, PlanRejected) as exc:
                self.figures.drop(exc.kind)
                continue
            except Exception:  # a decoder bug: still one dropped message, never a crash
                self.figures.drop("internal")
                continue
            self.figures.plan_taken((t_recv - msg["t_ns"]) / 1000.0)

    def _log_stale(self, now: int) -> None:
        """Plans dropped as stale since the last line, in one line with the newest one's age
        and the timeout (rate-limited: a slow planner would otherwise flood the log)."""
        stale = self.figures.dropped.get("stale", 0)
        if stale == self._stale_logged:
            return
        log.warning("%d plan(s) dropped as stale%s: the newest was %.0f ms old, "
                    "follower.plan_timeout_ms is %g (is the planner's latency over it?)",
                    stale - self._stale_logged, " since the last report" if self._stale_logged
                    else "", self.core.last_stale_age_ns / 1e6, self.core.plan_timeout_ns / 1e6)
        self._stale_logged = stale
        self._next_stale_log_ns = now + STALE_LOG_EVERY_NS

    # ---------------------------------------------------------------- mode changes
    def _apply_transitions(self) -> None:
        """Apply what the core decided, outside the tick: one log line per change (error for
        FAULT/ESTOP, with the way out), systemd STATUS, the latch file, torque."""
        for old, new, reason in self.core.transitions:
            if new in LATCHED:
                log.error("%s (was %s): %s. After fixing the cause: %s", new.name, old.name,
                          reason, reset_command(new.name, self.under_systemd))
                self.latch.write(self.core.mode.name, self.core.reason)
            else:
                log.info("%s (was %s): %s", new.name, old.name, reason)
        self.core.transitions.clear()
        self._sync_torque()
        self._notify_status()

    def _sync_torque(self) -> None:
        want = self.core.torque_wanted
        if want == self.torque_on or self.core.bus_dead or self.reset_job is not None:
            if not want and self.core.bus_dead:
                self.torque_on = False  # nothing to tell a dead bus; the motors' own
            return                      # timeouts (or the e-stop chain) take over
        try:
            self.bus.enable_torque(want)
            self.torque_on = want
        except BusError as exc:
            if want:
                self.core.fault(f"torque cannot be enabled: {exc}")
            else:
                log.error("torque off failed on the bus: %s", exc)
                self.torque_on = False

    def _notify_status(self) -> None:
        core = self.core
        why = f": {core.reason}" if core.latched else ""
        self.notifier.notify(f"STATUS={core.mode.name} at {self.cfg.follower.hz:g} Hz{why}")

    def _estop(self, reason: str) -> None:
        if self.core.estop(reason):
            self._apply_transitions()

    # ---------------------------------------------------------------- control requests
    def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in self.telemetry().items() if k not in ("q", "tracking_error")}

    def _cmd_estop(self, args: dict[str, Any]) -> dict[str, Any]:
        reason = args.get("reason", "control")
        self._estop(f"estop from {reason if isinstance(reason, str) else 'control'}"[:200])
        return {"mode": self.core.mode.name}

    def _reset_needs_admin(self, args: dict[str, Any]) -> str | None:
        """An operator may reset out of ESTOP (a person stopped the arm); a FAULT has a cause
        to fix first, and rebooting a motor is a repair: those stay admin."""
        if args.get("reboot"):
            return "rebooting a motor"
        return "a reset out of FAULT" if self.core.mode == Mode.FAULT else None

    def _cmd_reset(self, args: dict[str, Any]) -> dict[str, Any] | Deferred:
        """`reboot`: joints whose latched hardware error is cleared first (`duet reboot`)."""
        reboot = args.get("reboot") or []
        joints = self.cfg.robot.joints
        if not isinstance(reboot, list) or not all(isinstance(m, str) and m in joints
                                                   for m in reboot):
            raise RequestError(f"reboot: a list of joints of {', '.join(joints)}")
        if not self.core.latched:
            return {"mode": self.core.mode.name, "detail": f"already {self.core.mode.name}"}
        if self.reset_job is not None:
            raise RequestError("a reset is already running")
        deferred = Deferred()
        self.reset_job = ResetJob(self.bus, self.state, self.core, deferred, reboot)
        return deferred

    def _finish_reset(self) -> None:
        job = self.reset_job
        assert job is not None
        core = self.core
        if core.estops != job.estops_at_start:  # an estop arrived while the reset ran
            job.error = job.error or "estop during the reset: still ESTOP"
        if job.error is None and job.phase == 1:
            ok, text = core.reset(job.q, job.goal if job.torque_on else None)
            if ok and not job.torque_on:
                job.enable(core.command)  # phase 2 on the worker; the loop keeps skipping I/O
                self._apply_transitions()
                return
        else:
            ok, text = job.error is None, job.error or "HOLD"
        self.reset_job = None
        if ok:
            self.torque_on = job.torque_on
            self.latch.clear()
        else:
            self.torque_on = self.torque_on or job.torque_on  # what phase 2 may have done
            if job.phase == 2:
                core.fault(text)
            elif job.error is not None and core.estops == job.estops_at_start:
                core.still_latched(text)  # status: why it is latched now, not the old fault
        self._apply_transitions()
        self.control.complete(job.deferred, ok, None if ok else text,
                              {"mode": core.mode.name, "detail": text})

    def _cmd_set(self, args: dict[str, Any]) -> dict[str, Any]:
        key, value = args.get("key"), args.get("value")
        if type(key) is not str or key not in TUNABLES:
            raise RequestError(f"{key!r} is not live-tunable: restart needed")
        fc = self.cfg.follower
        name = key.split(".", 1)[1]
        try:
            setattr(fc, name, value)  # validate_assignment checks type and range
        except ValueError as exc:
            raise RequestError(f"{key}: {exc}") from None
        self.core.tune(CoreSettings.from_config(self.cfg))
        log.info("live change: %s = %r", key, getattr(fc, name))
        return {key: getattr(fc, name)}

    def _cmd_get(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"config": self.cfg.model_dump(mode="json")}

    # ---------------------------------------------------------------- stop
    def _controlled_stop(self) -> None:
        """SIGTERM / end of run: brake to rest, then torque per config."""
        core = self.core
        if self.reset_job is not None:
            self.reset_job.done.wait(2.0)
            self.reset_job = None
        if self.torque_on and core.start_brake():
            for _ in range(int(0.3 * self.cfg.follower.hz)):
                try:
                    core.brake_step()
                    self.bus.write(core.command)
                except (BusError, CommandError):
                    break
                time.sleep(self.period_ns / 1e9)
        if self.cfg.follower.stop_action == "torque_off" and not core.bus_dead:
            try:
                self.bus.enable_torque(False)
            except BusError as exc:
                log.error("torque off at stop failed: %s", exc)
        self.notifier.notify("STOPPING=1")

    # ---------------------------------------------------------------- outputs
    def _publish_state(self) -> None:
        st = self.state
        tpl = self.state_frames[self.core.mode]
        a = tpl.arrays
        a["q"][:] = st.q
        a["dq"][:] = st.dq
        a["effort"][:] = st.effort
        a["q_cmd"][:] = self.core.command
        tpl.set_int("t_read_ns", st.t_ns)
        try:
            self.state_pub.send(tpl.stamp(st.t_ns), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def dropped_messages(self) -> dict[str, int]:
        access = {f"access_{domain}": v for domain, v in self.zap.refused.items()}
        return self.figures.dropped_messages(self.core.plans_rejected, self.control.dropped,
                                             access)

    def telemetry(self) -> FollowerTelemetry:
        return self.figures.telemetry(self.core, self.bus.stats, self.state.q, self.torque_on,
                                      self.dropped_messages())

    def _publish_telemetry(self) -> None:
        try:
            self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def summary(self) -> FollowerSummary:
        return self.figures.summary(self.core, self.bus.stats, self.dropped_messages())


def _served(follower: Follower, gate: IO[str]) -> bool:
    """True once `gate` gives a line (`duet run`: the sim serves the motors); False on EOF
    (the supervisor gave up) or when a stop is asked meanwhile."""
    while not follower.stop_requested:
        if select.select([gate], [], [], 0.1)[0]:
            return bool(gate.readline())
    return False


def run_follower(cfg: DuetConfig, duration_s: float | None = None,
                 gate: IO[str] | None = None) -> int:
    """The follower process. Exit 0 after a clean stop, 3/4 when it ended in FAULT/ESTOP,
    2 when it could not start (the reason logged in one line). With `gate`, everything but
    the bus is set up first, and the bus opened after a line on `gate` (see `_served`)."""
    try:
        follower = Follower(cfg)
    except rundir.LockHeld as exc:
        log.error("%s", exc)
        return 2
    except (BundleError, EngineError, BusError, CameraError, KeyError) as exc:
        log.error("%s", exc)
        return 2
    core = claim_core(cfg.follower.realtime.cpu)  # one follower per core on this host
    if core.report:
        log.warning("realtime: %s", core.report)
    for line in apply_realtime(cfg.follower.realtime.sched_fifo_priority, core.cpu,
                               cfg.follower.realtime.mlockall):
        log.info("realtime: %s", line)
    if follower.io_report:
        log.info("realtime: %s", follower.io_report)

    def _estop(signum: int, _frame: Any) -> None:
        follower.estop_signal = True

    stop_on_signals(follower)
    signal.signal(signal.SIGUSR1, _estop)
    try:
        if gate is not None and not _served(follower, gate):
            log.info("follower stopped before its motors were served")
            return 0
        try:
            follower.start()
        except BusError as exc:
            log.error("motors not readable at start: %s", exc)
            return 2
        log.info("follower ready: %s at %g Hz", follower.core.mode.name, cfg.follower.hz)
        follower.run(duration_s)
    finally:
        summary = follower.summary()
        Path(cfg.run_dir, endpoints.FOLLOWER_SUMMARY).write_text(json.dumps(summary, indent=1))
        follower.close()
        core.release()
    final = follower.core.mode
    if final in LATCHED:
        log.error("follower stopped in %s: %s", final.name, follower.core.reason)
        return EXIT_ESTOP if final == Mode.ESTOP else EXIT_FAULT
    log.info("follower stopped: %s", key_values(summary["safety"]))
    return 0
