"""ZeroMQ's I/O threads (which carry every plan) at SCHED_FIFO where permitted; refused
without aborting (libzmq aborts when the kernel refuses a policy it was told to set)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from runtime.ipc.iothreads import fifo_permitted, realtime_io_threads

REPO = Path(__file__).resolve().parents[1]


def io_thread_policies() -> dict[str, tuple[int, int]]:
    """(policy, priority) of this process's libzmq I/O threads, by thread id."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        if (task / "comm").read_text().strip().startswith("ZMQbg/IO"):
            tid = int(task.name)
            out[task.name] = (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority)
    return out


def test_io_threads_run_fifo_where_permitted() -> None:
    # contexts earlier tests in this worker left open have their own I/O threads: not ours
    before = set(io_thread_policies())

    def ours() -> set[tuple[int, int]]:
        return {p for tid, p in io_thread_policies().items() if tid not in before}

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = None
    try:
        report = realtime_io_threads(ctx, 7)
        sock = ctx.socket(zmq.PUB)  # the I/O threads start with the first socket
        sock.bind("inproc://iothreads")
        expected = {(os.SCHED_FIFO, 7)} if fifo_permitted(7) else {(os.SCHED_OTHER, 0)}
        # each thread applies its policy as it starts, just after the socket call returns
        deadline = time.monotonic() + 10.0
        while ours() != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ours() == expected
        if expected == {(os.SCHED_FIFO, 7)}:
            assert report == "ZeroMQ I/O threads: SCHED_FIFO priority 7"
        else:
            assert report is not None and "not permitted" in report
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()
    unasked: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    assert realtime_io_threads(unasked, 0) is None  # not asked: nothing set
    unasked.term()


def test_without_the_privilege_the_process_says_so_and_lives() -> None:
    """As an unprivileged user (root drops to nobody in a child): the report names the refusal
    and the sockets work; libzmq would abort had the policy been set anyway."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges in a child")
    code = (  # imports first: nobody may not read the interpreter's files under /root
        "import os, resource, zmq\n"
        "from runtime.ipc.iothreads import realtime_io_threads\n"
        "resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))\n"
        "os.setuid(65534)\n"
        "ctx = zmq.Context()\n"
        "print(realtime_io_threads(ctx, 50))\n"
        "s = ctx.socket(zmq.PAIR); s.bind('inproc://x'); s.close(); ctx.term(); print('alive')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "ZeroMQ I/O threads: SCHED_FIFO 50 not permitted; SCHED_OTHER", "alive"]
