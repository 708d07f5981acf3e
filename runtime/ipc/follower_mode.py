"""The follower's mode as the other processes see it: the names its telemetry and its
`status` reply carry (runtime/follower/safety.py `Mode`, which the follower core keeps free of
ipc), and the one question that asks for it."""

from __future__ import annotations

from runtime.ipc import endpoints
from runtime.ipc.rpc import request_at

# the latched modes: only `duet reset` leaves them; a recording or a session that meets one
# has met an alarm
LATCHED_MODES = ("FAULT", "ESTOP")


def reset_command(mode: str, robot: bool) -> str:
    """What the reader types to leave a latched `mode`: an operator may reset out of ESTOP;
    out of FAULT (a cause to fix first) it takes an admin, root or the follower's own user,
    which is `sudo` on a robot and the user who ran `duet run` on a workstation."""
    return "sudo duet reset" if robot and mode == "FAULT" else "duet reset"


def follower_mode(run_dir: str, timeout_s: float = 5.0) -> str | None:
    """The follower's mode from its control socket's `status` (None where it refuses);
    ControlError when it does not answer."""
    reply = request_at(endpoints.control(run_dir), "status", {}, timeout_s)
    mode = reply["result"].get("mode") if reply["ok"] else None
    return mode if isinstance(mode, str) else None
