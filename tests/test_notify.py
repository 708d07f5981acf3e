"""runtime.ipc.notify: the sd_notify datagrams reach a path or an abstract socket, and a receiver
that does not drain never blocks the sender. (The follower's whole READY/WATCHDOG/STOPPING
sequence under a real NOTIFY_SOCKET: tests/test_systemd_notify.py.)"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from runtime.ipc.notify import Notifier, notifier


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


def test_path_socket_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rx = _receiver(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    n = notifier()
    assert n.notify("READY=1") and n.notify("STATUS=HOLD at 500 Hz")
    assert rx.recv(4096) == b"READY=1"
    assert rx.recv(4096) == b"STATUS=HOLD at 500 Hz"


def test_abstract_socket() -> None:
    name = f"duet-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    rx = _receiver("\0" + name)
    assert Notifier("@" + name).notify("WATCHDOG=1")
    assert rx.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = notifier()
    assert n.socket is None and not n.notify("READY=1")


def test_a_full_or_missing_receiver_never_blocks(tmp_path: Path) -> None:
    rx = _receiver(str(tmp_path / "notify"))  # bound, never read
    n = Notifier(str(tmp_path / "notify"))
    sent = [n.notify("WATCHDOG=1") for _ in range(100_000)]
    assert sent[0] and not sent[-1]  # the queue filled; the rest were dropped, not waited on
    rx.close()
    assert not Notifier(str(tmp_path / "gone")).notify("READY=1")
