"""The follower's mode as the other processes see it: the names its telemetry and its
`status` reply carry (runtime/follower/safety.py `Mode`, which the follower core keeps free of
ipc), and the one question that asks for it."""

from __future__ import annotations

from runtime.ipc import endpoints
from runtime.ipc.rpc import request_at

# the latched modes: only `duet reset` leaves them; a recording or a session that meets one
# has met an alarm
LATCHED_MODES = ("FAULT", "ESTOP")


def follower_mode(run_dir: str, timeout_s: float = 5.0) -> str | None:
    """The follower's mode from its control socket's `status` (None where it refuses);
    ControlError when it does not answer."""
    reply = request_at(endpoints.control(run_dir), "status", {}, timeout_s)
    mode = reply["result"].get("mode") if reply["ok"] else None
    return mode if isinstance(mode, str) else None
