"""The ceiling of a CPython UDP server on this machine: receive a datagram, send it back.

bench_resolver.py --echo runs this beside the resolvers (pinned to the same core) in the cached
passes. It does exactly the system calls our cached path does (recvfrom, sendto on a
non-blocking socket drained from loop.add_reader, 64 datagrams per wake-up, as
resolver/server.py) and nothing else: the reply is the query with the QR bit set (dnsperf
counts it as an answer). Whatever our cached answers cost beyond it is our Python work; what
it costs is CPython's one system call per datagram and the event loop.

Usage: python bench/udp_echo.py HOST PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys


async def serve(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    recvfrom, sendto = sock.recvfrom, sock.sendto

    def readable() -> None:
        for _ in range(64):
            try:
                data, addr = recvfrom(65535)
            except BlockingIOError:
                return
            if len(data) >= 12:
                sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)

    asyncio.get_running_loop().add_reader(sock.fileno(), readable)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
