"""The sim robot's motor link, and a control socket that breaks it the way hardware breaks.

`SerialLink` serves the emulated serial servos (Dynamixel or Feetech) on a pty behind a stable
symlink (as udev gives a real adapter /dev/ttyDUET0), so a "pulled cable" makes the device
disappear and a "replugged" one brings it back under the same name. `CanLink` does the same
for MIT-mode motors on a CAN channel. Each is served from a forked child process
(`ChildLink`), so no thread of the sim delays a reply. `FaultInjector` answers on
ipc://RUN_DIR/sim-control:

    {"cmd": "cut_line"}                      the device disappears (pty closed / motors gone)
    {"cmd": "restore_line"}                  the device is back
    {"cmd": "corrupt", "probability": p}     flip a byte (anywhere: header, length, data,
                                             CRC) in servo replies (serial); optional
                                             "byte": offset, "joint": i to aim it
    {"cmd": "silence", "joint": i, "on": b}  one motor stops answering
    {"cmd": "overload", "joint": i}          one motor latches an overload error, torque off
    {"cmd": "state"}                         (read-only) the physics' true joint positions
"""

from __future__ import annotations

import atexit
import functools
import gc
import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import zmq

from runtime.config import (
    CanBusConfig,
    ConfigError,
    DuetConfig,
    DynamixelBusConfig,
    FeetechBusConfig,
    SimConfig,
)
from runtime.ipc import endpoints
from runtime.ipc.rpc import Command, RequestError, bind_server
from runtime.ipc.stats import Histogram
from sim.actuators import HW_OVERLOAD, MODE_MIT, Actuators
from sim.serial_servo_emulator import SerialServoEmulator


class MotorLink(Protocol):
    device: str

    def cut(self) -> None: ...

    def restore(self) -> None: ...

    def corrupt(self, probability: float, byte: int | None = None,
                joint: int | None = None) -> None: ...

    def stop(self) -> None: ...

    def reply_us(self) -> Histogram:
        """The motors' service time per request (request in -> reply out), µs."""
        ...


# the emulator of a serial bus config: (shared actuators, the bus section) -> not yet opened
MakeEmulator = Callable[[Actuators, Any], SerialServoEmulator]


class ChildLink:
    """Emulated motors served from a forked child process: its own interpreter lock, so a
    reply never waits behind a physics step, a render or any other sim thread (a real motor
    answers within its return delay). Needs `Actuators.shared` actuators. The child runs
    `serve(*args, conn)` and obeys the parent's link commands on `conn`."""

    def __init__(self, serve: Callable[..., None], args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="duet-sim-motors", daemon=True,
                                 args=(serve, args, child))
        self._proc.start()
        atexit.register(self.stop)  # runs before multiprocessing's own (atexit is LIFO)

    def _call(self, cmd: str, *args: Any) -> Any:
        self._conn.send((cmd, args))
        ok, value = self._conn.recv()
        if not ok:
            raise ValueError(value)
        return value

    def reply_us(self) -> Histogram:
        """The motors' service time per request (request in -> reply out), µs."""
        hist: Histogram = self._call("reply_us")
        return hist

    def stop(self) -> None:
        """Stop the motors; idempotent. The child ignores SIGTERM (the parent stops it in
        order), so one that has not gone in time is killed: multiprocessing's exit handler
        would SIGTERM it and wait for ever, leaving the sim running unsupervised."""
        if self._proc.is_alive():
            try:
                self._call("stop")
            except (OSError, EOFError):
                pass  # it died on its own
        self._proc.join(timeout=5.0)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _child(serve: Callable[..., None], args: tuple[Any, ...], conn: Connection) -> None:
    import ctypes
    import signal

    # die with the sim (even on SIGKILL); leave SIGTERM/SIGINT handling to the parent
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the sim's heap came along with the fork: a collection walking it stalled a reply for
    # milliseconds; only what the child allocates itself is collected
    gc.freeze()
    serve(*args, conn)


def _obey(conn: Connection, commands: dict[str, Callable[..., Any]], stop: Callable[[], None],
          reply_us: Histogram) -> None:
    """The child's loop: each parent command's reply, until `stop`."""
    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "stop":
                stop()
                conn.send((True, None))
                return
            if cmd == "reply_us":
                conn.send((True, reply_us))
            elif cmd in commands:
                conn.send((True, commands[cmd](*args)))
            else:
                raise ValueError(f"unknown link command {cmd!r}")
        except (OSError, ValueError) as exc:
            conn.send((False, str(exc)))


class SerialLink(ChildLink):
    """Serial servos (Dynamixel or Feetech) on a pty, behind the stable name `link`."""

    def __init__(self, actuators: Actuators, bus: DynamixelBusConfig | FeetechBusConfig,
                 link: Path, make: MakeEmulator, rt_priority: int = 0) -> None:
        self.link = link
        self.device = str(link)
        super().__init__(_serve_servos, (actuators, bus, make, rt_priority))
        self._point_link(self._call("open"))

    def _point_link(self, pty: str) -> None:
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        os.symlink(pty, tmp)
        os.replace(tmp, self.link)  # atomic: the name always points at a live pty or none

    def cut(self) -> None:
        self.link.unlink(missing_ok=True)
        self._call("cut")

    def restore(self) -> None:
        self._point_link(self._call("restore"))

    def corrupt(self, probability: float, byte: int | None = None,
                joint: int | None = None) -> None:
        self._call("corrupt", probability, byte, joint)

    def stop(self) -> None:
        super().stop()
        self.link.unlink(missing_ok=True)


def _dynamixel(actuators: Actuators, bus: Any, models: list[str]) -> SerialServoEmulator:
    from sim.dynamixel_emulator import DynamixelEmulator

    return DynamixelEmulator.from_config(actuators, bus, models)


def _feetech(actuators: Actuators, bus: Any) -> SerialServoEmulator:
    from sim.feetech_emulator import FeetechEmulator

    return FeetechEmulator.from_config(actuators, bus)


def _serve_servos(actuators: Actuators, bus: DynamixelBusConfig | FeetechBusConfig,
                  make: MakeEmulator, rt_priority: int, conn: Connection) -> None:
    """Child process: serve the servos on a pty; obey the parent's link commands."""
    corruption: tuple[float, int | None, int | None] = (0.0, None, None)
    reply_us = Histogram(lowest=1.0)  # across restored lines

    def start(powered: bool) -> SerialServoEmulator:
        emu = make(actuators, bus)
        emu.rt_priority = rt_priority
        emu.server.reply_us = reply_us
        aim(emu, *corruption)
        emu.open(powered=powered)
        emu.start()
        return emu

    def aim(emu: SerialServoEmulator, p: float, byte: int | None, joint: int | None) -> None:
        emu.corrupt_probability, emu.corrupt_byte = p, byte
        emu.corrupt_servos = None if joint is None else frozenset((joint,))

    emulator = start(powered=False)

    def restore() -> str:  # the servos kept power: goals and torque continue
        nonlocal emulator
        emulator.stop()
        emulator = start(powered=True)
        return emulator.path

    def corrupt(p: float, byte: int | None, joint: int | None) -> None:
        nonlocal corruption
        corruption = (float(p), byte, joint)
        aim(emulator, *corruption)

    _obey(conn, {"open": lambda: emulator.path, "cut": lambda: emulator.close_line(),
                 "restore": restore, "corrupt": corrupt},
          lambda: emulator.stop(), reply_us)


class CanLink(ChildLink):
    """MIT-mode motors of one CAN bus: the actuators `joints` (default: all), in its dialect."""

    def __init__(self, actuators: Actuators, bus: CanBusConfig, rt_priority: int = 0,
                 joints: list[int] | None = None) -> None:
        self.device = bus.channel
        super().__init__(_serve_can, (actuators, bus, joints, rt_priority))
        self._call("open")  # the bus is up before the follower is told the device

    def cut(self) -> None:
        self._call("cut")

    def restore(self) -> None:
        self._call("restore")

    def corrupt(self, probability: float, byte: int | None = None,
                joint: int | None = None) -> None:
        raise ValueError("byte corruption is a serial-line fault; CAN frames carry a CRC "
                         "checked by the controller")


def _serve_can(actuators: Actuators, bus: CanBusConfig, joints: list[int] | None,
               rt_priority: int, conn: Connection) -> None:
    """Child process: the motors on their CAN channel; obey the parent's link commands."""
    from sim.can_emulator import MitCanEmulator

    reply_us = Histogram(lowest=1.0)  # across restored lines

    def start() -> MitCanEmulator:
        emu = MitCanEmulator.from_config(actuators, bus, joints)
        emu.rt_priority = rt_priority
        emu.reply_us = reply_us
        emu.start()
        return emu

    emulator: MitCanEmulator | None = start()

    def cut() -> None:
        nonlocal emulator
        if emulator is not None:
            emulator.stop(close_bus=True)
            emulator = None

    def restore() -> None:
        nonlocal emulator
        if emulator is None:
            emulator = start()

    _obey(conn, {"open": lambda: None, "cut": cut, "restore": restore}, cut, reply_us)


# The emulators the bus families name (drivers/*_family.py `emulator`): the motor end of one
# configured bus, serving the actuators at `joints` (indices into robot.joints).
def serve_serial(actuators: Actuators, bus: DynamixelBusConfig, joints: list[int],
                 cfg: DuetConfig) -> MotorLink:
    if cfg.buses is not None:
        raise ConfigError("sim: per-limb buses (`buses:`) need sim.transport 'can'")
    from sim.robot import describe

    # each servo reports and behaves as its joint's motor model (sim.robot.motors)
    models = [describe(cfg).motors.models[k].name for k in joints]
    # a stable name, as udev gives a real adapter: a replugged line keeps its path
    return SerialLink(actuators, bus, Path(cfg.run_dir) / endpoints.SIM_TTY,
                      functools.partial(_dynamixel, models=models),
                      (cfg.sim or SimConfig()).rt_priority)


def serve_feetech(actuators: Actuators, bus: FeetechBusConfig, joints: list[int],
                  cfg: DuetConfig) -> MotorLink:
    if cfg.buses is not None:
        raise ConfigError("sim: per-limb buses (`buses:`) need sim.transport 'can'")
    return SerialLink(actuators, bus, Path(cfg.run_dir) / endpoints.SIM_TTY, _feetech,
                      (cfg.sim or SimConfig()).rt_priority)


def serve_can(actuators: Actuators, bus: CanBusConfig, joints: list[int],
              cfg: DuetConfig) -> MotorLink:
    with actuators.lock:  # homed by an earlier session over this bus: its gains
        actuators.mode[joints] = MODE_MIT
        actuators.kp[joints], actuators.kd[joints] = bus.kp, bus.kd
    return CanLink(actuators, bus, (cfg.sim or SimConfig()).rt_priority, joints=joints)


class LinkGroup:
    """Several buses as one link: a cut line cuts them all (the robot's harness)."""

    def __init__(self, links: list[MotorLink]) -> None:
        self.links = links
        self.device = ",".join(link.device for link in links)

    def cut(self) -> None:
        for link in self.links:
            link.cut()

    def restore(self) -> None:
        for link in self.links:
            link.restore()

    def corrupt(self, probability: float, byte: int | None = None,
                joint: int | None = None) -> None:
        for link in self.links:
            link.corrupt(probability, byte, joint)

    def reply_us(self) -> Histogram:
        hist = Histogram(lowest=1.0)
        for link in self.links:
            hist.merge(link.reply_us())
        return hist

    def stop(self) -> None:
        for link in self.links:
            link.stop()


FAULTS = ("cut_line", "restore_line", "corrupt", "silence", "overload", "state")


class FaultInjector:
    """The sim's request socket (runtime.ipc.rpc) on a thread; each request changes the link or
    the actuators."""

    def __init__(self, endpoint: str, link: MotorLink, actuators: Actuators) -> None:
        self.link, self.actuators = link, actuators
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.server = bind_server(self.ctx, endpoint, {
            cmd: Command(functools.partial(self._checked, cmd)) for cmd in FAULTS})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sim-faults", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.server.sock.poll(100):
                self.server.serve_pending()

    def _checked(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.handle(cmd, args)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise RequestError(f"{cmd}: {exc!r}") from None

    def handle(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        act = self.actuators
        if cmd == "cut_line":
            self.link.cut()
        elif cmd == "restore_line":
            self.link.restore()
        elif cmd == "corrupt":
            byte, joint = args.get("byte"), args.get("joint")
            self.link.corrupt(float(args["probability"]), None if byte is None else int(byte),
                              None if joint is None else int(joint))
        elif cmd == "silence":
            with act.lock:
                act.silent[int(args["joint"])] = bool(args.get("on", True))
        elif cmd == "state":  # read-only: the physics' true joint positions (tests)
            with act.lock:
                return {"cmd": cmd, "q": act.q.tolist(), "goal_q": act.goal_q.tolist(),
                        "torque_enabled": act.torque_enabled.tolist()}
        elif cmd == "overload":
            with act.lock:
                j = int(args["joint"])
                act.hw_error[j] |= HW_OVERLOAD
                act.torque_enabled[j] = False  # what the servo does on an overload shutdown
        else:
            raise ValueError(f"unknown sim fault {cmd!r}")
        return {"cmd": cmd, "device": self.link.device}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.server.sock.close(linger=0)
        self.ctx.term()
