"""Motor-bus benchmarks: one tick (sync read of every motor + sync write) per driver.

Each section returns table rows; main() prints them as one table. Sections:
  dynamixel — duet's DynamixelBus vs dynamixel-sdk GroupSyncRead/GroupSyncWrite, the same
              emulated servos (in a child process, behind a pty), same run, blocks interleaved.
  feetech   — duet's FeetechBus vs Feetech's SDK (scservo_sdk GroupSyncRead/GroupSyncWrite) on
              emulated STS3215 the same way, and the wire time of one tick at 1 Mbit/s:
              computed (the config's budget) and measured (the bytes the tick put on the line).
Add a section by writing `def <name>_section(args) -> list[Row]` and listing it in SECTIONS.

    .venv/bin/python -m bench.drivers [--cycles 2000] [--servos 6] [--sections feetech]
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from drivers import dynamixel_protocol as dx
from drivers.bus import MotorState
from drivers.can_loopback import free_channel, peer_channel
from drivers.dynamixel import DynamixelBus
from sim.dynamixel_emulator import EmulatorProcess


@dataclass
class Row:
    section: str
    driver: str
    cycles: int
    median_us: float
    p99_us: float
    note: str = ""

    @property
    def hz(self) -> float:
        return 1e6 / self.median_us


def time_cycles(cycle: Callable[[], None], samples: np.ndarray, start: int, count: int) -> None:
    """Run `cycle` count times, storing each duration (µs) into samples[start:start+count]."""
    clock = time.perf_counter_ns
    for i in range(start, start + count):
        t0 = clock()
        cycle()
        samples[i] = (clock() - t0) / 1e3


def _duet_cycle(path: str, ids: list[int]) -> tuple[Callable[[], None], DynamixelBus]:
    bus = DynamixelBus(path, 4_000_000, ids, [f"j{i}" for i in ids], timeout_ms=100.0)
    bus.open()
    state = MotorState(len(ids))

    def cycle() -> None:
        bus.read(state)
        bus.write(state.q)

    return cycle, bus


def _sdk_cycle(path: str, ids: list[int]) -> tuple[Callable[[], None], Callable[[], None]]:
    import dynamixel_sdk as sdk

    # The SDK's reply timeout is 2 x a 16 ms USB latency timer + 2 ms; a loaded machine can
    # stall the emulator that long. Widen it like duet's (100 ms) so neither side fails.
    sdk.port_handler.LATENCY_TIMER = 50
    port = sdk.PortHandler(path)
    if not (port.openPort() and port.setBaudRate(4_000_000)):
        raise RuntimeError(f"dynamixel-sdk cannot open {path}")
    ph = sdk.PacketHandler(2.0)
    reader = sdk.GroupSyncRead(port, ph, dx.ADDR_PRESENT_CURRENT, 10)
    writer = sdk.GroupSyncWrite(port, ph, dx.ADDR_GOAL_POSITION, 4)
    for dxl_id in ids:
        reader.addParam(dxl_id)
        writer.addParam(dxl_id, [0, 8, 0, 0])

    def cycle() -> None:
        result = reader.txRxPacket()
        if result != sdk.COMM_SUCCESS:
            raise RuntimeError(f"dynamixel-sdk sync read: {ph.getTxRxResult(result)}")
        for dxl_id in ids:  # the same work as duet: take the position, command it back
            ticks = reader.getData(dxl_id, dx.ADDR_PRESENT_POSITION, 4)
            writer.changeParam(dxl_id, list(ticks.to_bytes(4, "little")))
        writer.txPacket()

    return cycle, port.closePort


def dynamixel_section(args: argparse.Namespace) -> list[Row]:
    ids = list(range(1, args.servos + 1))
    q = list(np.linspace(-1.0, 1.0, args.servos))
    with EmulatorProcess(ids, q) as path:
        duet, bus = _duet_cycle(path, ids)
        sdk, sdk_close = _sdk_cycle(path, ids)
        (duet_us, sdk_us), (duet_cpu, sdk_cpu) = _interleaved([duet, sdk], args.cycles)
        wire = bus.wire_time_us()
        errors = bus.stats.errors
        bus.close()
        sdk_close()
    rows = [
        Row("dynamixel", "duet DynamixelBus", len(duet_us), *_stats(duet_us)),
        Row("dynamixel", "dynamixel-sdk Group*", len(sdk_us), *_stats(sdk_us)),
    ]
    ratio = rows[1].median_us / rows[0].median_us
    rows[0].note = (
        f"{ratio:.2f}x SDK (median); client CPU {duet_cpu:.0f} us/tick "
        f"({sdk_cpu / duet_cpu:.1f}x less); wire time at 4 Mbps {wire:.0f} us; errors {errors}"
    )
    rows[1].note = f"client CPU {sdk_cpu:.0f} us/tick (busy-polls the port)"
    return rows


def _interleaved(cycles: list[Callable[[], None]], total: int) -> tuple[list[np.ndarray],
                                                                           list[float]]:
    """Time each cycle `total` times in 8 interleaved blocks (machine load hits all alike);
    the samples (µs) and this process's CPU per tick (µs) of each."""
    blocks = 8
    per_block = max(1, total // blocks)
    samples = [np.zeros(per_block * blocks) for _ in cycles]
    cpu_ns = [0] * len(cycles)
    for _ in range(100):  # warm up (page faults, caches)
        for cycle in cycles:
            cycle()
    gc.collect()
    gc.disable()
    try:
        for b in range(blocks):
            for i, cycle in enumerate(cycles):
                t0 = time.process_time_ns()
                time_cycles(cycle, samples[i], b * per_block, per_block)
                cpu_ns[i] += time.process_time_ns() - t0
    finally:
        gc.enable()
    return samples, [ns / 1e3 / (per_block * blocks) for ns in cpu_ns]


def feetech_section(args: argparse.Namespace) -> list[Row]:
    import scservo_sdk as scs

    from drivers import feetech_protocol as ft
    from drivers.bus_budget import FEETECH_PACKETS
    from drivers.feetech import FeetechBus

    baud = 1_000_000
    ids = list(range(1, args.servos + 1))
    q = list(np.linspace(-1.0, 1.0, args.servos))
    with EmulatorProcess(ids, q, "sim.feetech_emulator:FeetechEmulator") as path:
        bus = FeetechBus(path, baud, ids, [f"j{i}" for i in ids], timeout_ms=100.0)
        bus.open()
        state = MotorState(len(ids))

        def duet() -> None:
            bus.read(state)
            bus.write(state.q)

        scs.port_handler.LATENCY_TIMER = 100  # as duet's timeout: a loaded host fails neither
        port = scs.PortHandler(path)
        if not (port.openPort() and port.setBaudRate(baud)):
            raise RuntimeError(f"scservo_sdk cannot open {path}")
        ph = scs.sms_sts(port)
        reader = scs.GroupSyncRead(ph, ft.ADDR_PRESENT_POSITION, 8)
        writer = scs.GroupSyncWrite(ph, ft.ADDR_GOAL_POSITION, 2)
        for servo_id in ids:
            reader.addParam(servo_id)
            writer.addParam(servo_id, [0, 8])

        sdk_errors = [0]

        def sdk() -> None:
            if reader.txRxPacket() != scs.COMM_SUCCESS:  # a stall past its timeout: counted
                sdk_errors[0] += 1
                return
            for servo_id in ids:  # the same work as duet: take the position, command it back
                ticks = reader.getData(servo_id, ft.ADDR_PRESENT_POSITION, 2)
                writer.changeParam(servo_id, [ph.scs_lobyte(ticks), ph.scs_hibyte(ticks)])
            writer.txPacket()

        (duet_us, sdk_us), (duet_cpu, sdk_cpu) = _interleaved([duet, sdk], args.cycles)
        line_bytes = bus.request_bytes + bus.last_reply_bytes
        measured = line_bytes * 10 * 1e6 / baud + sum(bus.return_delay_us)
        errors = bus.stats.errors
        bus.close()
        port.closePort()
    computed = FEETECH_PACKETS.tick_us(baud, args.servos)
    ratio = float(np.median(sdk_us) / np.median(duet_us))
    return [
        Row("feetech", "duet FeetechBus", len(duet_us), *_stats(duet_us),
            f"{ratio:.2f}x SDK (median); client CPU {duet_cpu:.0f} us/tick; errors {errors}"),
        Row("feetech", "scservo_sdk Group*", len(sdk_us), *_stats(sdk_us),
            f"client CPU {sdk_cpu:.0f} us/tick; failed sync reads {sdk_errors[0]}"),
        Row("feetech", "wire at 1 Mbit/s", 1, computed, computed,
            f"computed (budget) {computed:.0f} us; measured {line_bytes} bytes on the line ="
            f" {measured:.0f} us; max {0.7e6 / measured:.0f} Hz at 70 % (pty: not paced)"),
    ]


def _stats(samples: np.ndarray) -> tuple[float, float]:
    return float(np.median(samples)), float(np.percentile(samples, 99))


SECTIONS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "dynamixel": dynamixel_section,
    "feetech": feetech_section,
}


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'section':<10} {'driver':<22} {'cycles':>6} {'median us':>10} {'p99 us':>9} "
        f"{'Hz':>7}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.section:<10} {r.driver:<22} {r.cycles:>6} {r.median_us:>10.1f} "
            f"{r.p99_us:>9.1f} {r.hz:>7.0f}  {r.note}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=2000, help="timed ticks per driver")
    parser.add_argument("--servos", type=int, default=6)
    parser.add_argument("--sections", nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name in args.sections:
        rows.extend(SECTIONS[name](args))
    print_table(rows)



# -- MIT-mode CAN (duet-udp loopback, emulated motors in a child process) ----------------------

_CAN_PEER = """
import sys, can
from sim.actuators import Actuators
from sim.can_emulator import MitCanEmulator
from drivers.can_mit import MitRanges
channel, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
bus = can.Bus(interface="duet-udp", channel=channel)
if mode == "mit":
    emu = MitCanEmulator(Actuators(n), list(range(1, n + 1)), MitRanges(12.5, 30.0, 10.0), bus)
    emu.start()
    print("ready", flush=True)
    sys.stdin.readline()
    emu.stop()
else:  # echo: the transport floor, one 6-byte answer per frame and no decoding
    print("ready", flush=True)
    while (m := bus.recv(2.0)) is not None:
        bus.send(can.Message(arbitration_id=0, is_extended_id=False, data=m.data[:6]))
    bus.shutdown()
"""


def _can_peer(channel: str, mode: str, n: int) -> subprocess.Popen[str]:
    peer = subprocess.Popen([sys.executable, "-c", _CAN_PEER, channel, mode, str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert peer.stdout is not None
    if peer.stdout.readline().strip() != "ready":
        raise RuntimeError(f"CAN {mode} peer did not start")
    return peer


def _timed_ticks(cycle: Callable[[], None], cycles: int) -> tuple[np.ndarray, np.ndarray]:
    """Wall and thread-CPU time (µs) of each call."""
    wall, cpu = np.zeros(cycles), np.zeros(cycles)
    for _ in range(100):
        cycle()
    gc.collect()
    gc.disable()
    try:
        for i in range(cycles):
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            cycle()
            cpu[i] = (time.thread_time_ns() - c0) / 1e3
            wall[i] = (time.perf_counter_ns() - w0) / 1e3
    finally:
        gc.enable()
    return wall, cpu


def can_section(args: argparse.Namespace) -> list[Row]:
    """One tick = MitCanBus.write (6 commands) + read (6 replies) against emulated motors in
    another process; baseline: the same 6 frames echoed raw by a peer process."""
    import can

    from drivers.can_mit import MitCanBus, MitRanges

    n = args.servos
    ids = list(range(1, n + 1))
    channel = free_channel()
    peer = _can_peer(peer_channel(channel), "mit", n)
    bus = MitCanBus([f"j{i}" for i in ids], ids, MitRanges(12.5, 30.0, 10.0), [20.0] * n,
                    [1.0] * n, interface="duet-udp", channel=channel, timeout_ms=100.0)
    bus.open()
    bus.enable_torque(True)
    state, q = MotorState(n), np.zeros(n)

    def mit_tick() -> None:
        bus.write(q)
        bus.read(state)

    try:
        mit_wall, mit_cpu = _timed_ticks(mit_tick, args.cycles)
        wire, errors = bus.wire_time_us(), bus.stats.errors
    finally:
        bus.close()
        peer.communicate("\n", timeout=10)

    channel = free_channel()
    echo = _can_peer(peer_channel(channel), "echo", n)
    raw = can.Bus(interface="duet-udp", channel=channel)
    frames = [can.Message(arbitration_id=i, is_extended_id=False, data=bytes(8)) for i in ids]

    def raw_tick() -> None:
        for f in frames:
            raw.send(f)
        for _ in frames:
            if raw.recv(0.1) is None:
                raise RuntimeError("echo peer stopped answering")

    try:
        raw_wall, raw_cpu = _timed_ticks(raw_tick, args.cycles)
    finally:
        raw.shutdown()
        echo.wait(timeout=10)
    rows = [
        Row("can", "MitCanBus tick wall", args.cycles, *_stats(mit_wall),
            f"{n} cmd + {n} reply over duet-udp; errors {errors}"),
        Row("can", "MitCanBus tick CPU", args.cycles, *_stats(mit_cpu), "thread CPU time"),
        Row("can", "raw echo tick wall", args.cycles, *_stats(raw_wall),
            "baseline: python-can send/recv only"),
        Row("can", "raw echo tick CPU", args.cycles, *_stats(raw_cpu), "baseline"),
    ]
    rows[0].note += f"; a real 1 Mbit/s bus adds {wire:.0f} us wire time"
    return rows


SECTIONS["can"] = can_section


if __name__ == "__main__":
    main()
