"""A fault-injecting TCP proxy for the off-board planner's network tests (this machine has
no netem qdisc). It accepts on a listening socket it inherits (so the socket can live in
another network namespace than the proxy's upstream side) and forwards to HOST:PORT.

    python tests/fault_proxy.py --listen-fd FD --upstream HOST:PORT

Commands on stdin, one a line, each answered `ok` on stdout once in force:
    pass        forward as it comes
    delay MS    hold every chunk MS milliseconds, each direction, order kept
    stall       move nothing (connections stay open, bytes wait in the kernel's buffers)
    reset       abort every open connection with a TCP RST
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import threading


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.delay_s = 0.0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), 2.0)
        except (OSError, asyncio.TimeoutError):
            down_w.close()  # upstream unreachable (a partition): the client redials
            return
        pair = (down_w, up_w)
        self.conns.add(pair)
        pumps = [asyncio.create_task(self.pump(down_r, up_w)),
                 asyncio.create_task(self.pump(up_r, down_w))]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        self.conns.discard(pair)
        for w in pair:
            w.close()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def read() -> None:
            while True:
                await self.flowing.wait()
                data = await reader.read(65536)
                await queue.put((loop.time(), data) if data else None)
                if not data:
                    return

        async def write() -> None:
            while (item := await queue.get()) is not None:
                t, data = item
                wait = t + self.delay_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()

        reading = asyncio.create_task(read())
        try:
            await write()
        finally:
            reading.cancel()

    def command(self, line: str) -> None:
        words = line.split()
        if words[:1] == ["pass"]:
            self.delay_s = 0.0
            self.flowing.set()
        elif words[:1] == ["delay"]:
            self.delay_s = float(words[1]) / 1e3
            self.flowing.set()
        elif words[:1] == ["stall"]:
            self.flowing.clear()
        elif words[:1] == ["reset"]:
            for pair in list(self.conns):
                for w in pair:
                    sock = w.get_extra_info("socket")
                    if sock is not None:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    w.transport.abort()
        else:
            print(f"unknown command {line!r}", file=sys.stderr)
        print("ok", flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    loop = asyncio.get_running_loop()
    listener = socket.socket(fileno=args.listen_fd)
    server = await asyncio.start_server(proxy.handle, sock=listener)
    done = asyncio.Event()

    def commands() -> None:  # stdin on a thread; each command applied on the loop
        for line in sys.stdin:
            loop.call_soon_threadsafe(proxy.command, line.strip())
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=commands, daemon=True).start()
    print("ok", flush=True)
    async with server:
        await done.wait()


if __name__ == "__main__":
    asyncio.run(main())
