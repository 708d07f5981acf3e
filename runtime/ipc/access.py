"""Who may talk to duet's sockets: ZAP with the kernel's peer credentials on ipc.

For an ipc connection libzmq hands the ZAP handler the peer's uid, gid and pid (SO_PEERCRED,
as "localhost:UID:GID:PID"): the kernel's word, which a local process cannot forge. So no key
files are needed on one host, and the checks are:

- `plan`: only the planner's user (`access.planner_user`; by default the follower's own user)
  may connect a plan publisher. A process that merely can reach the run dir cannot steer the arm.
  On a robot the planner runs as its own user (`duet-planner`), so not even another duet
  service (the recorder, `duet-recorder`) can send plans.
- `state`: the planner's state subscriber takes the joint state only from a publisher running
  as the follower's user (`access.follower_user`), so nothing else bound in the run dir while
  the follower is down can feed the planner a made-up arm.
- `control`: the service user and root are `admin` (reset, set, everything); members of
  `access.operator_group` are `operator` (status, estop, task). Anyone else is refused.

The role travels on every message as its ZMQ "User-Id" property (see runtime/ipc/rpc.py).
TCP peers are refused by these domains. Off-board traffic (the planner server's socket) is
domain `remote`: CURVE, and only robots whose public key is in the server's allow-list
(`RemoteAccess`); their User-Id is the robot's name. Plaintext peers only with `insecure`.
Refusals are counted and logged once a second at most, never raised.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.utils.z85

from runtime.ipc.endpoints import MAX_REQUEST_BYTES
from runtime.ipc.sockets import open_socket

log = logging.getLogger("duet.access")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ADMIN, OPERATOR = "admin", "operator"
REMOTE = "remote"  # the domain of the planner server's TCP socket


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int


def parse_ipc_peer(address: bytes) -> Peer | None:
    """'localhost:UID:GID:PID' (or ':UID:GID:PID') -> Peer; None for anything else (TCP)."""
    parts = address.decode("ascii", "replace").rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return Peer(int(parts[1]), int(parts[2]), int(parts[3]))


def uid_of(user: str | None) -> int:
    """A user name (or None: this process's own user) -> uid; KeyError names it."""
    if user is None:
        return os.geteuid()
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise KeyError(f"access: no such user {user!r}") from None


def in_group(uid: int, gid: int, group: str | None) -> bool:
    if group is None:
        return False
    try:
        target = grp.getgrnam(group).gr_gid
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return gid == target or target in os.getgrouplist(name, gid)


@dataclass
class Policy:
    """Domain -> role of a peer (None: refused)."""

    planner_uid: int
    operator_group: str | None = "duet"
    service_uid: int = field(default_factory=os.geteuid)
    follower_uid: int | None = None  # None: no `state` peer is admitted

    def role(self, domain: str, peer: Peer) -> str | None:
        if domain == "plan":
            return "planner" if peer.uid == self.planner_uid else None
        if domain == "state":
            return "follower" if peer.uid == self.follower_uid else None
        if domain == "control":
            if peer.uid in (0, self.service_uid):
                return ADMIN
            return OPERATOR if in_group(peer.uid, peer.gid, self.operator_group) else None
        return None


@dataclass
class RemoteAccess:
    """Domain `remote`: CURVE peers whose public key (Z85) is allowed, named by robot; NULL
    (plaintext) peers only when `insecure`, named by their address."""

    allowed: dict[bytes, str]
    insecure: bool = False

    def name(self, mechanism: bytes, credentials: list[bytes], address: str
             ) -> tuple[str | None, str]:
        """(the peer's User-Id, or None and the refusal's counter key)."""
        if mechanism == b"CURVE" and credentials and len(credentials[0]) == 32:
            name = self.allowed.get(zmq.utils.z85.encode(credentials[0]))
            return (name, "") if name is not None else (None, "unknown key")
        if mechanism == b"NULL":
            return (f"insecure:{address}", "") if self.insecure else (None, "plaintext")
        return None, "mechanism"


class ZapHandler:
    """The process's ZAP handler (one per zmq context), on a daemon thread.

    Sockets opt in with `protect(sock, domain)`; connections to them are admitted or refused
    here, once per connection, never per message.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], policy: Policy | None,
                 clock: Callable[[], float] = time.monotonic,
                 remote: RemoteAccess | None = None) -> None:
        """`policy`: the ipc domains (None: none served); `remote`: domain `remote`."""
        self.policy = policy
        self.remote = remote
        self.refused: Counter[str] = Counter()
        self.admitted: Counter[str] = Counter()
        self._clock = clock
        self._last_log = 0.0
        self._sock = open_socket(ctx, zmq.REP, MAX_REQUEST_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(ZAP_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="duet-zap", daemon=True)
        self._thread.start()

    @staticmethod
    def protect(sock: zmq.Socket[bytes], domain: str) -> None:
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(200):
                continue
            try:
                frames = self._sock.recv_multipart()
            except zmq.ZMQError:
                return
            version = frames[0] if frames else b"1.0"
            request_id = frames[1] if len(frames) > 1 else b""
            role = self._decide(frames)
            status, text = (b"200", b"OK") if role else (b"400", b"refused")
            try:
                self._sock.send_multipart([version, request_id, status, text,
                                           (role or "").encode(), b""])
            except zmq.ZMQError:
                return

    def _decide(self, frames: list[bytes]) -> str | None:
        # RFC 27: version, request id, domain, address, identity, mechanism, credentials...
        if len(frames) < 6 or frames[0] != b"1.0":
            self._refuse("malformed", "malformed ZAP request")
            return None
        domain = frames[2].decode("ascii", "replace")
        if domain == REMOTE:
            return self._decide_remote(frames)
        peer = parse_ipc_peer(frames[3])
        if peer is None or self.policy is None:
            self._refuse(domain, f"{domain}: peer {frames[3]!r} is not a local ipc peer")
            return None
        role = self.policy.role(domain, peer)
        if role is None:
            self._refuse(domain, f"{domain}: refused uid {peer.uid} gid {peer.gid} "
                                 f"pid {peer.pid}")
        else:
            self.admitted[domain] += 1
        return role

    def _decide_remote(self, frames: list[bytes]) -> str | None:
        address = frames[3].decode("ascii", "replace")
        if self.remote is None:
            self._refuse(REMOTE, f"remote: {address}: this process serves no remote peers")
            return None
        name, why = self.remote.name(frames[5], frames[6:], address)
        if name is None:
            key = zmq.utils.z85.encode(frames[6]).decode() if len(frames) > 6 \
                and len(frames[6]) == 32 else "-"
            self._refuse(f"{REMOTE} {why}", f"remote: {why} from {address} (key {key})")
        else:
            self.admitted[REMOTE] += 1
        return name

    def _refuse(self, key: str, text: str) -> None:
        self.refused[key] += 1
        now = self._clock()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning("access refused: %s (%d refused so far)", text,
                        sum(self.refused.values()))

    def close(self) -> None:
        self._stop.set()
        # its poll returns within 200 ms (later on a loaded host): the socket is the thread's
        # until then, and a context cannot end while it is open
        self._thread.join()
        self._sock.close(linger=0)


class GuardedSubscriber:
    """A SUB on `endpoint` admitted through ZAP `domain`, opened again after each refusal.

    After ZAP refused a peer, libzmq can end that connection attempt for good (seen: the
    subscriber never asked ZAP about the rightful publisher bound at the same path later).
    On the robot that is a forger binding the follower's state path while the follower is
    down, then a planner that never hears the restarted follower. `check` (once per cycle)
    reopens the socket when a refusal was counted since the last check."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], zap: ZapHandler, domain: str,
                 endpoint: str, max_bytes: int, hwm: int) -> None:
        self._ctx, self._zap, self._domain = ctx, zap, domain
        self._endpoint, self._max_bytes, self._hwm = endpoint, max_bytes, hwm
        self.reopened = 0
        self.sock = self._open()

    def _open(self) -> zmq.Socket[bytes]:
        self._refused = self._zap.refused[self._domain]
        sock = open_socket(self._ctx, zmq.SUB, self._max_bytes)
        sock.setsockopt(zmq.RCVHWM, self._hwm)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        ZapHandler.protect(sock, self._domain)
        sock.connect(self._endpoint)
        return sock

    def check(self) -> bool:
        """Reopen when ZAP refused a peer of this domain since the last check."""
        if self._zap.refused[self._domain] == self._refused:
            return False
        self.sock.close(linger=0)
        self.sock = self._open()
        self.reopened += 1
        return True

    def close(self) -> None:
        self.sock.close(linger=0)


def caller() -> str:
    """Who ran this command, from the kernel's uid (not $USER, which anyone can set): the
    invoking user under sudo (SUDO_UID is only trusted when we really run as root)."""
    import pwd

    uid = os.getuid()
    sudo_uid = os.environ.get("SUDO_UID", "")
    if uid == 0 and sudo_uid.isdigit():
        uid = int(sudo_uid)
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
