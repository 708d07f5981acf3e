"""The serving half of an emulated serial bus: a pseudo-terminal whose master end one thread
serves, shared by every serial servo family (sim/dynamixel_emulator.py, sim/feetech_emulator.py).

The protocol lives in the emulator: `PtyServer` hands it whatever bytes arrived and writes
back what it answers, so a family is a codec and a memory table, not a second serving loop.

The timing is the server's, and like a servo's firmware it does not depend on the host:
- the thread runs SCHED_FIFO at the sim's `rt_priority` (below the follower's) where
  permitted; where not, it says so once (`priority_report`, logged) and runs SCHED_OTHER;
- an answer is built from what the emulator finds at hand: the physics' newest published
  step (Actuators.read_present), never waiting for the step running;
- `reply_us` counts every request's service time (bytes read -> reply written), µs, for the
  sim's summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import select
import threading
import time
import tty
from collections.abc import Callable

from runtime.ipc.iothreads import fifo_permitted
from runtime.ipc.stats import Histogram

log = logging.getLogger("duet.sim")


def flip_byte(packet: bytes, rng: random.Random, at: int | None = None,
              bits: int | None = None) -> bytes:
    """Line noise: one byte of `packet` (at `at`, else anywhere) XORed with `bits`, else with a
    random non-zero value."""
    flipped = bytearray(packet)
    where = at if at is not None else rng.randrange(len(flipped))
    flipped[where % len(flipped)] ^= bits or rng.randrange(1, 256)
    return bytes(flipped)


class PtyServer:
    """A pty whose slave end a serial driver opens; `answer(bytes_in) -> bytes_out` on a thread."""

    def __init__(self, answer: Callable[[bytes], bytes], name: str) -> None:
        self.answer = answer
        self.name = name
        self.rt_priority = 0  # SCHED_FIFO priority of the serving thread, 0 = don't ask
        self.priority_report: str | None = None  # what became of rt_priority (said once)
        self.reply_us = Histogram(lowest=1.0)  # service time per request, µs
        self.path = ""  # the pty slave, set by open()
        self._master: int | None = None
        self._slave: int | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stop = threading.Event()

    def open(self) -> str:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline: bytes pass untouched
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        return self.path

    def start(self) -> None:
        if self._master is None:
            raise RuntimeError("call open() before start()")
        if self.rt_priority and self.priority_report is None:
            self.priority_report = (
                f"{self.name}: serving thread SCHED_FIFO {self.rt_priority}"
                if fifo_permitted(self.rt_priority) else
                f"{self.name}: SCHED_FIFO {self.rt_priority} not permitted: the emulated "
                "motors answer SCHED_OTHER, late when the host is busy")
            log.info("%s", self.priority_report)
        self._stop.clear()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=2.0)
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None

    def _serve(self) -> None:
        if self.rt_priority:
            # a servo answers within its return delay: let the reply preempt ordinary work
            # (best effort; without the privilege it simply runs SCHED_OTHER)
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.rt_priority))
        master = self._master
        assert master is not None
        poller = select.poll()
        poller.register(master, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        reply_us = self.reply_us
        while not self._stop.is_set():
            events = poller.poll()
            if self._stop.is_set():
                return
            for fd, event in events:
                if fd != master:
                    continue
                if event & (select.POLLERR | select.POLLNVAL):
                    return
                t_in = time.monotonic_ns()
                try:
                    data = os.read(master, 4096)
                except OSError:  # no slave open yet (EIO); wait for a client
                    self._stop.wait(0.001)
                    continue
                out = self.answer(data)
                if out:
                    try:
                        os.write(master, out)
                    except OSError:
                        return
                    reply_us.add((time.monotonic_ns() - t_in) / 1000.0)
