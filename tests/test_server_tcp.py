"""TCP clients that abuse a connection (issue 10, items 6 and 7), over real sockets on 127.0.0.1.

Each test is one behaviour of resolver/server_tcp.py, against the server of tests/test_server.py
(scripted upstream, fake validator) with small [server] limits so a run takes seconds:

* a frame trickled a byte at a time is cut at `tcp_frame_timeout`, although bytes keep coming
  (the idle timer no longer restarts on each byte); a frame too short for DNS ends it at once;
* a busy connection ends at `tcp_max_lifetime`, after the query in progress is answered;
* slow-loris: many more trickling peers than `tcp_max_connections`, reconnecting as soon as
  they are cut, while real clients ask over TCP: every real client is answered;
* a client that pipelines queries and never reads: our buffered output for it stays under
  `tcp_max_buffered`, it is cut off, and other clients are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from resolver import config as configuration
from resolver.errors import ConfigError
from tests.helpers import until
from tests.test_server import Env, q, with_server

WARM = "www.example.test."


async def tcp_ask(env: Env, name: str = WARM, timeout: float = 1.0) -> dns.message.Message:
    """One query over a new TCP connection."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(env.host, env.port)
        try:
            wire = q(name).to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            n = int.from_bytes(await reader.readexactly(2), "big")
            return dns.message.from_wire(await reader.readexactly(n))
        finally:
            writer.close()


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (EOF or reset), at most limit."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
    return loop.time() - t0


def test_trickled_frame_is_cut_at_the_frame_deadline() -> None:
    """A frame sent one byte every 50 ms never completes: cut after tcp_frame_timeout (0.4 s),
    long before the idle timeout (5 s), although a byte arrived every 50 ms."""
    async def body(env: Env) -> None:
        reader, writer = await asyncio.open_connection(env.host, env.port)
        wire = q(WARM).to_wire()
        frame = len(wire).to_bytes(2, "big") + wire

        async def trickle() -> None:
            for b in frame[:-1]:  # never the last byte
                writer.write(bytes((b,)))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        took = await closed_after(reader, 3.0)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()
        assert 0.35 < took < 1.5, took

    with_server(body, tcp_frame_timeout=0.4, tcp_idle_timeout=5.0)


def test_a_frame_shorter_than_a_dns_header_ends_the_connection() -> None:
    """Zero bytes trickled in pairs would be a stream of empty frames, each one "progress":
    the first frame shorter than a DNS header (12 bytes) ends the connection instead."""
    async def body(env: Env) -> None:
        reader, writer = await asyncio.open_connection(env.host, env.port)
        writer.write(b"\x00\x00")
        took = await closed_after(reader, 3.0)
        writer.close()
        assert took < 1.0, took
        assert not env.server.tcp_connections

    with_server(body, tcp_idle_timeout=5.0, tcp_frame_timeout=5.0)


def test_whole_queries_do_not_outlive_the_connection_lifetime() -> None:
    """A client asking every 50 ms is cut at tcp_max_lifetime (0.6 s); the slow query it sent
    just before is still answered first."""
    async def body(env: Env) -> None:
        await tcp_ask(env)  # warm: later queries are answered from the wire cache
        reader, writer = await asyncio.open_connection(env.host, env.port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ids: set[int] = set()
        slow = q("slow.example.test.")
        for i in range(10):
            m = slow if i == 9 else q(WARM)
            wire = m.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            ids.add(m.id)
            await asyncio.sleep(0.05)
        got: set[int] = set()
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                n = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 3), "big")
                got.add(dns.message.from_wire(await reader.readexactly(n)).id)
        took = loop.time() - t0
        writer.close()
        assert slow.id in got and got == ids  # every query answered, the slow one too
        assert 0.9 < took < 3.0, took  # the slow one needs ~1 s upstream (two 0.5 s tries)

    with_server(body, tcp_max_lifetime=0.6, tcp_idle_timeout=5.0, tcp_frame_timeout=5.0)


def test_slow_loris_peers_do_not_starve_real_clients() -> None:
    """24 peers announce a 64-byte frame and trickle it a byte every 100 ms into 8 TCP slots,
    reconnecting at once whenever they are cut. Meanwhile 15 real clients ask over TCP, one
    every 100 ms, each asking once more if its connection is cut (as stub resolvers do): all
    are answered, at most five needed the second try. (When the process stalls, a backlog of
    more new connections than slots is accepted in one turn of the loop, before any of them
    has been read: then one that has sent nothing yet may be cut, and CI saw 1 of 15 lost.)
    (Before issue 10 the first 8 trickling peers kept every slot: no real client got in.)"""
    async def body(env: Env) -> None:
        await tcp_ask(env)
        stop = asyncio.Event()
        peak = 0

        async def loris() -> None:
            while not stop.is_set():
                try:
                    _r, w = await asyncio.open_connection(env.host, env.port)
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                try:
                    w.write(b"\x00\x40")  # a 64-byte frame is announced, then trickled
                    while not stop.is_set() and not w.is_closing():
                        w.write(b"a")
                        await w.drain()
                        await asyncio.sleep(0.1)
                except ConnectionError:
                    pass
                finally:
                    w.close()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, len(env.server.tcp_connections))
                await asyncio.sleep(0.005)

        peers = [asyncio.create_task(loris()) for _ in range(24)]
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.5)  # every slot taken by now
        answered, failures = 0, []
        for _ in range(15):
            for _attempt in range(2):  # a stub resolver asks again when its connection is cut
                try:
                    reply = await tcp_ask(env, timeout=2.0)
                except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
                    failures.append(type(e).__name__)
                    continue
                answered += reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*peers, watcher, return_exceptions=True)
        assert answered == 15, (answered, failures)
        # Cut now and then when the process stalls (measured: 1 first try in 300 with both
        # cores busy; 6-7 in 15 when the loop is stalled 150 ms in every 200), never starved.
        assert len(failures) <= 5, failures
        assert peak <= 8, peak

    with_server(body, tcp_max_connections=8, tcp_frame_timeout=0.5, tcp_idle_timeout=2.0)


def test_a_client_between_connect_and_query_outlives_a_burst_of_trickling_peers() -> None:
    """The race behind a lost client: a real client's connection is accepted in one turn of the
    loop and its query read in a later one. Here 8 trickling peers hold the 8 slots, a client
    connects and waits; 8 more trickling peers arrive, each taking a slot. The client then
    asks and is answered: the trickling peers gave way to each other, not to it. (Evicting by
    age alone cut the client: it was the oldest connection without a query in progress.)"""
    async def body(env: Env) -> None:
        await tcp_ask(env)
        writers: list[asyncio.StreamWriter] = []

        def read_from(w: asyncio.StreamWriter) -> bool:
            port = w.get_extra_info("sockname")[1]
            return any(c.buffer and c.transport is not None
                       and c.transport.get_extra_info("peername")[1] == port
                       for c in env.server.tcp_connections)

        async def trickler() -> None:
            _r, w = await asyncio.open_connection(env.host, env.port)
            w.write(b"\x00\x40a")
            await w.drain()
            writers.append(w)
            await until(lambda: read_from(w), "the server read its bytes: a frame is pending")

        async def held() -> int:
            return sum(1 for c in env.server.tcp_connections if c.buffer)

        for _ in range(8):
            await trickler()
        assert await held() == 8
        reader, client = await asyncio.open_connection(env.host, env.port)
        await until(lambda: len(env.server.tcp_connections) == 8, "the client accepted")
        for _ in range(8):
            await trickler()
        assert len(env.server.tcp_connections) == 8
        wire = q(WARM).to_wire()
        client.write(len(wire).to_bytes(2, "big") + wire)
        async with asyncio.timeout(1.0):
            n = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(n))
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        client.close()
        for w in writers:
            w.close()

    with_server(body, tcp_max_connections=8, tcp_frame_timeout=5.0, tcp_idle_timeout=5.0)


def test_an_answered_idle_client_gives_way_with_its_reply_intact() -> None:
    """At the bound, a client already answered and idle gives way before one that has sent
    nothing yet, and it is closed gracefully: it reads its whole reply, then EOF."""
    async def body(env: Env) -> None:
        await tcp_ask(env)
        fresh = [await asyncio.open_connection(env.host, env.port) for _ in range(7)]
        await until(lambda: len(env.server.tcp_connections) == 7, "7 accepted")
        reader, client = await asyncio.open_connection(env.host, env.port)
        wire = q(WARM).to_wire()
        client.write(len(wire).to_bytes(2, "big") + wire)
        await until(lambda: any(c.served for c in env.server.tcp_connections),
                    "answered; its reply waits unread in our socket")
        assert len(env.server.tcp_connections) == 8
        newcomer = await asyncio.open_connection(env.host, env.port)
        await asyncio.sleep(0.05)
        async with asyncio.timeout(1.0):
            n = int.from_bytes(await reader.readexactly(2), "big")
            reply = dns.message.from_wire(await reader.readexactly(n))
            assert await reader.read() == b""  # then a clean EOF
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        assert len(env.server.tcp_connections) == 8  # the 7 fresh ones and the newcomer
        for _r, w in [*fresh, newcomer]:
            w.close()
        client.close()

    with_server(body, tcp_max_connections=8, tcp_frame_timeout=5.0, tcp_idle_timeout=5.0)


def test_client_that_never_reads_is_cut_off_with_output_bounded() -> None:
    """One client pipelines 40,000 queries for a cached name and never reads (its receive
    buffer shrunk to a few KiB). Our output for it stays under tcp_max_buffered (64 KiB), it
    is cut off within tcp_frame_timeout of filling up, and another client is answered while it
    hangs there. (Before issue 10 the server buffered every reply: megabytes per client.)"""
    bound = 65537

    async def body(env: Env) -> None:
        await tcp_ask(env)
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await loop.sock_connect(s, (env.host, env.port))
        await asyncio.sleep(0.05)
        (conn,) = env.server.tcp_connections
        wire = q(WARM).to_wire()
        frames = (len(wire).to_bytes(2, "big") + wire) * 40_000
        peak = 0

        async def send() -> None:
            with contextlib.suppress(ConnectionError):
                await loop.sock_sendall(s, frames)

        async def watch() -> None:
            nonlocal peak
            while conn.transport is not None and not conn.transport.is_closing():
                peak = max(peak, conn.transport.get_write_buffer_size())
                await asyncio.sleep(0.002)

        sender = asyncio.create_task(send())
        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        other = await tcp_ask(env)  # the stuck client holds nothing another one needs
        assert other.rcode() == dns.rcode.NOERROR and other.answer
        await asyncio.wait_for(watcher, 5)  # the server cut it off
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        s.close()
        assert conn not in env.server.tcp_connections
        assert 0 < peak <= bound, peak

    with_server(body, tcp_max_buffered=bound, tcp_frame_timeout=0.5)


def test_tcp_limits_are_read_from_the_server_table(tmp_path: Path) -> None:
    """The three new [server] keys parse, and a buffer too small for one largest reply is a
    clear configuration error (file, table, key, why)."""
    conf = tmp_path / "resolver.toml"
    conf.write_text('[upstream]\nservers = ["127.0.0.1"]\n[server]\ntcp_frame_timeout = 2\n'
                    "tcp_max_lifetime = 30.5\ntcp_max_buffered = 70000\n", encoding="utf-8")
    server = configuration.load(conf).server
    assert (server.tcp_frame_timeout, server.tcp_max_lifetime, server.tcp_max_buffered) == (
        2.0, 30.5, 70000)
    conf.write_text('[upstream]\nservers = ["127.0.0.1"]\n[server]\ntcp_max_buffered = 4096\n',
                    encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[server\] key 'tcp_max_buffered': must be at "
                                          r"least 65537"):
        configuration.load(conf)


class _Transport(asyncio.Transport):
    """Records whether the connection was closed gracefully or aborted; holds `pending` bytes
    of output (what a peer that does not read leaves in our buffer)."""

    def __init__(self, pending: int) -> None:
        super().__init__()
        self.pending, self.how = pending, ""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def is_closing(self) -> bool:
        return bool(self.how)

    def close(self) -> None:
        self.how = self.how or "close"

    def abort(self) -> None:
        self.how = self.how or "abort"

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        ...

    def get_write_buffer_size(self) -> int:
        return self.pending


@pytest.mark.parametrize(("pending", "how"), [(0, "close"), (4096, "abort")])
def test_an_answered_connection_gives_way_without_lingering(pending: int, how: str) -> None:
    """Giving way at the bound closes gracefully only when nothing waits in our buffer: with
    output the peer has not read, a graceful close would keep the connection alive outside the
    bound for as long as that peer likes, so it is aborted."""
    from resolver.server import Server
    from resolver.server_tcp import TcpConnection

    async def main() -> None:
        server = Server(None, configuration.ServerConfig(tcp_max_connections=1),  # type: ignore[arg-type]
                        clock=lambda: 0.0)
        conn = TcpConnection(server)
        transport = _Transport(pending)
        conn.connection_made(transport)
        conn.served = True  # answered and idle: the second to give way
        assert conn.eviction_rank() == 1 and server.evict_tcp()
        assert transport.how == how and conn not in server.tcp_connections

    asyncio.run(main())


def test_after_a_stall_a_client_whose_query_waits_is_not_cut() -> None:
    """After the loop stalls, the backlog is accepted in one turn, before any newcomer is read.
    8 trickling peers hold the 8 slots; while the loop is stalled, a client connects and sends
    its query, then 8 more trickling peers connect and send the start of a frame (all from
    another thread, as other processes would). Once the loop runs again the client is
    answered: what waits in the kernel tells its connection from the tricklers'. (By age
    alone the client, the oldest connection not read yet, was the one cut.)"""
    async def body(env: Env) -> None:
        await tcp_ask(env)
        held: list[socket.socket] = []

        def trickler() -> socket.socket:
            s = socket.create_connection((env.host, env.port))
            s.sendall(b"\x00\x40a")
            held.append(s)
            return s

        for _ in range(8):
            await asyncio.to_thread(trickler)
        await until(lambda: sum(1 for c in env.server.tcp_connections if c.buffer) == 8)
        wire = q(WARM).to_wire()
        client: list[socket.socket] = []

        def arrive() -> None:
            c = socket.create_connection((env.host, env.port))
            c.sendall(len(wire).to_bytes(2, "big") + wire)
            client.append(c)
            for _ in range(8):
                trickler()

        thread = threading.Thread(target=arrive)
        thread.start()
        thread.join(5)  # the loop does nothing meanwhile: a stall
        assert client and len(held) == 16
        c = client[0]
        c.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(2.0):
            head = await loop.sock_recv(c, 2)
            assert len(head) == 2, "the client's connection was cut"
            reply = dns.message.from_wire(await loop.sock_recv(c, int.from_bytes(head, "big")))
        assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        for s in [c, *held]:
            s.close()

    with_server(body, tcp_max_connections=8, tcp_frame_timeout=5.0, tcp_idle_timeout=5.0)
