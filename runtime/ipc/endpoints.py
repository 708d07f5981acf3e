"""The one place that lists duet's sockets: ipc:// paths in the run dir, who binds each, the
largest message a receiver accepts, and the access domain that guards it (runtime/ipc/access.py).

Every socket has a size cap (ZMQ_MAXMSGSIZE, set by runtime/ipc/sockets.py's `open_socket`,
the only way duet makes a socket): a bigger message drops its connection before it is
buffered. A PUB receives only subscriptions, so its cap is tiny. A connecting socket's session
ends for good on an oversize message (libzmq does not redial after a protocol error), so caps
on connecting sockets are far above what their bound duet peer ever sends: only a bug or an
impostor trips them, and the input then goes stale, which every reader treats as a hold.

| socket             | bound by | pattern     | who may connect          | cap: bound / connecting |
|--------------------|----------|-------------|--------------------------|-------------------------|
| plan               | follower | SUB <- PUB  | the planner's uid (`plan`)   | PLAN / SUBSCR |
| state              | follower | PUB -> SUB  | run dir group            | SUBSCR / STATE    |
| control            | follower | ROUTER<-REQ | admin, operator (`control`) | REQUEST / REPLY      |
| telemetry-follower | follower | PUB -> SUB  | run dir group            | SUBSCR / TELEMETRY |
| task               | planner  | ROUTER<-REQ | as control (`control`)   | REQUEST / REPLY         |
| telemetry-planner  | planner  | PUB -> SUB  | run dir group            | SUBSCR / TELEMETRY |
| recorder           | recorder | ROUTER<-REQ | run dir group            | REQUEST / REPLY         |
| sim                | sim      | PUB -> SUB  | run dir group            | SUBSCR / SIM      |
| sim-control        | sim      | ROUTER<-REQ | run dir group            | REQUEST / REPLY         |
| telemetry-planner-server | planner server | PUB -> SUB | run dir group | SUBSCR / TELEMETRY |
| shadow             | planner  | XPUB -> SUB | run dir group            | SUBSCR / SHADOW    |
| telemetry-shadow   | shadow   | PUB -> SUB  | run dir group            | SUBSCR / TELEMETRY |
| ZAP (inproc)       | each process | REP     | libzmq in the process    | REQUEST (not framed)    |

`shadow`: the observations the planner planned on, with its plans, sent only while a shadow
planner (`duet bundle shadow`) subscribes. (PLAN is MAX_PLAN_BYTES, SUBSCR
MAX_SUBSCRIPTION_BYTES, and so on.) "Run dir group": the run dir's permissions decide;
`control`: root and the service user are admin, members of
`access.operator_group` operators.

Off the host, one TCP socket (runtime/remote/server.py): `duet planner --listen
tcp://HOST:PORT` binds a ROUTER that robots' relays (DEALER) dial, CURVE with the allow-list
(domain `remote`), capped at runtime/remote/wire.py's `max_observation_bytes`; the relay's
DEALER is capped at MAX_PLAN_BYTES.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUN_DIR = "/run/duet"

MAX_PLAN_BYTES = 1 << 18  # 256 KiB: 256 waypoints x 64 joints x 8 bytes, with room
MAX_REQUEST_BYTES = 1 << 16
MAX_REPLY_BYTES = 1 << 22  # `get` returns the whole config
MAX_SUBSCRIPTION_BYTES = 1 << 10  # what a PUB receives: duet subscribes to everything (b"")
MAX_STATE_BYTES = 1 << 16  # four [n] float64 arrays: 64 joints take 2 KiB
MAX_TELEMETRY_BYTES = 1 << 22  # figures, and the planner's plans (MAX_PLAN_BYTES each)
MAX_SIM_BYTES = (1 << 24) + (1 << 16)  # a frame of messages.MAX_ELEMENTS bytes and its keys
MAX_SHADOW_BYTES = 4 * MAX_SIM_BYTES  # raw frames of up to four cameras, states and plans


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


def shadow(run_dir: str) -> str:
    """The observations the planner planned on, with its plans, for a shadow planner."""
    return _ipc(run_dir, "shadow")


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
SHADOW_REPORT = "shadow.json"  # the shadow planner's divergence report (duet bundle shadow)
WATCH_REPORT = "watch.json"  # the activation watch's state and outcome (duet bundle watch)
NOTIFY_SOCKET = "notify"  # `duet run`'s stand-in for systemd's sd_notify socket
# the sim's serial servos: a link to its pty, as udev names a real adapter /dev/ttyDUET0
SIM_TTY = "ttyDUET0"
EFFECTIVE_CONFIG = "effective.yaml"  # the config as `duet run` resolved it, for the processes
