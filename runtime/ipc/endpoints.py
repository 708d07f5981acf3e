"""The one place that lists duet's sockets: ipc:// paths in the run dir, who binds each, the
largest message a receiver accepts, and the access domain that guards it (runtime/ipc/access.py).

Size caps (ZMQ_MAXMSGSIZE: a bigger message drops the connection before it is buffered) sit on
the sockets that bind and face other processes' requests and plans. Never on a connecting
SUB: libzmq ends such a session for good on an oversize message (a protocol error is not
reconnected), so one bad frame would silence a camera forever; what those receive comes from
duet's own bound publishers and is bounded again by the decoders.

| socket               | bound by  | pattern      | peers                          |
|----------------------|-----------|--------------|--------------------------------|
| plan                 | follower  | SUB <- PUB   | the planner (domain `plan`)    |
| state                | follower  | PUB -> SUB   | planner, recorder              |
| control              | follower  | ROUTER<-REQ  | CLI, fleet (domain `control`)  |
| telemetry-follower   | follower  | PUB -> SUB   | status, top, recorder          |
| task                 | planner   | ROUTER<-REQ  | CLI, fleet (domain `control`)  |
| telemetry-planner    | planner   | PUB -> SUB   | status, top, recorder          |
| recorder             | recorder  | ROUTER<-REQ  | CLI (domain `control`)         |
| sim, sim-control     | sim       | PUB / ROUTER | planner cameras, tests         |
| telemetry-planner-server | planner server | PUB -> SUB | status, tests            |

Off the host, one TCP socket (runtime/remote/server.py): `duet planner --listen
tcp://HOST:PORT` binds a ROUTER that robots' relays (DEALER) dial, CURVE with the allow-list
(domain `remote`), capped at runtime/remote/wire.py's `max_observation_bytes`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUN_DIR = "/run/duet"

MAX_PLAN_BYTES = 1 << 18  # 256 KiB: 256 waypoints x 64 joints x 8 bytes, with room
MAX_REQUEST_BYTES = 1 << 16
MAX_REPLY_BYTES = 1 << 22  # `get` returns the whole config


def resolve_run_dir(given: str | None = None) -> str:
    """--run-dir, else $DUET_RUN_DIR, else /run/duet. Never reads a config file, so an estop
    works whatever state the YAML is in."""
    return given or os.environ.get("DUET_RUN_DIR") or DEFAULT_RUN_DIR


def _ipc(run_dir: str, name: str) -> str:
    return f"ipc://{Path(run_dir) / name}"


def plan(run_dir: str) -> str:
    return _ipc(run_dir, "plan")


def state(run_dir: str) -> str:
    return _ipc(run_dir, "state")


def control(run_dir: str) -> str:
    return _ipc(run_dir, "control")


def task(run_dir: str) -> str:
    """The planner's request socket: set or clear the instruction, planner status."""
    return _ipc(run_dir, "task")


def telemetry(run_dir: str, source: str) -> str:
    return _ipc(run_dir, f"telemetry-{source}")


def recorder(run_dir: str) -> str:
    return _ipc(run_dir, "recorder")


def sim(run_dir: str) -> str:
    """Sim camera frames (and task announcements)."""
    return _ipc(run_dir, "sim")


def sim_control(run_dir: str) -> str:
    """The sim robot's fault-injection socket (sim/faults.py)."""
    return _ipc(run_dir, "sim-control")


# Files in the run dir besides the sockets.
FOLLOWER_LOCK = "follower.lock"  # flock held by the live follower; holds its pid
SUPERVISOR_LOCK = "run.lock"  # flock held by `duet run`
LATCH = "follower.latched"  # FAULT/ESTOP survives a follower restart until `duet reset`
TASK_FILE = "task.json"  # the current instruction survives a planner restart
# Each process's figures at its exit, read by `duet run`'s summary (runtime/stack/summary.py)
FOLLOWER_SUMMARY = "follower-summary.json"
PLANNER_SUMMARY = "planner-summary.json"
PLANNER_SERVER_SUMMARY = "planner-server-summary.json"
SIM_SUMMARY = "sim-summary.json"
NOTIFY_SOCKET = "notify"  # `duet run`'s stand-in for systemd's sd_notify socket
EFFECTIVE_CONFIG = "effective.yaml"  # the config as `duet run` resolved it, for the processes
