"""The server over real sockets on 127.0.0.1: FORMERR/NOTIMP/drop, EDNS and truncation, TCP
pipelining and idle timeout, the wire-cache fast path, SERVFAIL with EDE; plus the fuzz
invariant (any bytes -> a reply or a drop, never an exception), over UDP and byte-wise TCP."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resolver.cache import WireCache
from resolver.config import HostPort, ServerConfig
from resolver.resolve import PlainHandler, Resolution
from resolver.server import Server
from resolver.server_tcp import TcpConnection
from resolver.validator.response import Security, Verdict
from tests.helpers import ede, run, until
from tests.scripted_upstream import Delay, FakeValidator, ScriptedUpstream, answer, resolution

WHEN = 1_800_000_000.0
BIG_TXT = [f"big.example.test. 300 IN TXT \"{'y' * 200} {i}\"" for i in range(10)]


def script(q: dns.message.Message, _t: str) -> Any:
    name = q.question[0].name.to_text().lower()
    if name == "big.example.test.":
        return answer(q, *BIG_TXT)
    if name.startswith("slow"):
        # 1 s: the fast answers must overtake it even on a loaded 2-core machine.
        return Delay(1.0, answer(q, f"{name} 300 IN A 192.0.2.7"))
    return answer(q, f"{name} 300 IN A 192.0.2.1")


class Env:
    def __init__(self, up: ScriptedUpstream, res: Resolution, validator: FakeValidator,
                 server: Server, clock: list[float]) -> None:
        self.up, self.res, self.validator, self.server, self.clock = (
            up, res, validator, server, clock)
        self.host, self.port = server.bound[0]

    async def udp(self, q: dns.message.Message | bytes, timeout: float = 1.0) -> bytes | None:
        wire = q if isinstance(q, bytes) else q.to_wire()
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            await loop.sock_connect(s, (self.host, self.port))
            await loop.sock_sendall(s, wire)
            try:
                return await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)
            except TimeoutError:
                return None
        finally:
            s.close()


def with_server(body: Callable[[Env], Awaitable[None]], **server_kw: Any) -> None:
    async def main() -> None:
        async with ScriptedUpstream(script) as up:
            res, validator = resolution(up, {"bad.example.test.": Verdict(
                Security.BOGUS, "signature expired", dns.edns.EDECode.SIGNATURE_EXPIRED)})
            clock = [WHEN]
            cfg = ServerConfig(listen=(HostPort("127.0.0.1", 0),), **server_kw)
            server = Server(PlainHandler(res), cfg, cache=WireCache(100), clock=lambda: clock[0])
            await server.start(cfg.listen)
            try:
                await body(Env(up, res, validator, server, clock))
            finally:
                await server.stop()

    run(main(), 30)


def q(name: str, rdtype: str = "A", **kw: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


def test_answer_and_fast_path_hit_with_id_patched_and_ttl_aged() -> None:
    async def body(env: Env) -> None:
        first = dns.message.from_wire(await env.udp(q("www.example.test.", want_dnssec=True)))
        assert first.answer[0].ttl == 300 and first.flags & dns.flags.AD
        assert first.edns == 0 and first.payload == 1232
        env.clock[0] += 100
        again = q("WwW.eXample.TEST.", want_dnssec=True)
        again.id = 4242
        raw = await env.udp(again)
        reply = dns.message.from_wire(raw)
        assert reply.id == 4242 and reply.answer[0].ttl == 200
        assert reply.question[0].name.to_text() == "WwW.eXample.TEST."  # case echoed
        assert reply.flags & dns.flags.AD and reply.flags & dns.flags.RD
        assert env.server.cache is not None and env.server.cache.hits == 1
        assert env.up.count() == 1 and len(env.validator.calls) == 1
        # Different client flags are a different cache entry (no DO: no AD, no OPT).
        plain = dns.message.from_wire(await env.udp(q("www.example.test.", use_edns=False)))
        assert not plain.flags & dns.flags.AD and plain.edns == -1
        # RD=0 client: RD copied from the query on the fast path too.
        nord = q("www.example.test.", want_dnssec=True)
        nord.flags &= ~dns.flags.RD
        assert not dns.message.from_wire(await env.udp(nord)).flags & dns.flags.RD

    with_server(body)


def test_servfail_with_ede_for_bogus() -> None:
    async def body(env: Env) -> None:
        r = dns.message.from_wire(await env.udp(q("bad.example.test.", use_edns=0)))
        assert r.rcode() == dns.rcode.SERVFAIL
        assert ede(r) == (dns.edns.EDECode.SIGNATURE_EXPIRED, "signature expired")
        assert len(env.server.cache or []) == 0  # SERVFAIL is never in the wire cache

    with_server(body)


def test_formerr_notimp_and_drops() -> None:
    async def body(env: Env) -> None:
        good = q("www.example.test.").to_wire()
        r = await env.udp(good[:12] + b"\x05abc")  # header fine, body broken
        assert r is not None and r[:2] == good[:2] and r[3] & 0x0F == dns.rcode.FORMERR
        assert r[2] & 0x80  # QR
        assert await env.udp(b"\x12\x34\x01", timeout=0.3) is None  # no header: dropped
        upd = dns.message.make_query("example.test.", "SOA")
        upd.set_opcode(dns.opcode.UPDATE)
        r = await env.udp(upd)
        assert r is not None and r[3] & 0x0F == dns.rcode.NOTIMP
        two = bytearray(good)
        struct.pack_into("!H", two, 4, 0)  # QDCOUNT 0
        r = await env.udp(bytes(two[:12]))
        assert r is not None and r[3] & 0x0F == dns.rcode.FORMERR
        resp = bytearray(good)
        resp[2] |= 0x80  # a response sent to us: dropped (no loops between servers)
        assert await env.udp(bytes(resp), timeout=0.3) is None
        bad_ver = q("www.example.test.", use_edns=1)
        r = await env.udp(bad_ver)
        assert r is not None and dns.message.from_wire(r).rcode() == dns.rcode.BADVERS
        assert env.up.count() == 0

    with_server(body)


def test_udp_truncation_then_tcp() -> None:
    async def body(env: Env) -> None:
        r = dns.message.from_wire(await env.udp(q("big.example.test.", "TXT", use_edns=False)))
        assert r.flags & dns.flags.TC
        r2 = dns.message.from_wire(await env.udp(q("big.example.test.", "TXT", payload=1232)))
        assert r2.flags & dns.flags.TC  # 2 KiB does not fit 1232 either
        full = await dns.asyncquery.tcp(q("big.example.test.", "TXT"), env.host, port=env.port,
                                        timeout=2)
        assert not full.flags & dns.flags.TC and len(full.answer[0]) == 10
        # Now cached: the fast path must not hand the 2 KiB answer to a 512-byte UDP client.
        r3 = dns.message.from_wire(await env.udp(q("big.example.test.", "TXT", use_edns=False)))
        assert r3.flags & dns.flags.TC
        large = await env.udp(q("big.example.test.", "TXT", payload=4096))
        assert large is not None and len(large) <= 1232  # never above our own 1232

    with_server(body)


def test_meta_types_qtype0_and_any_answered_locally(caplog: pytest.LogCaptureFixture) -> None:
    """Question types a resolver never forwards (issue 10): qtype 0 and the meta-types get
    FORMERR with EDE 30 (Unbound's list; RFC 9824 3.5 for NXNAME, 128), zone transfers
    REFUSED over UDP and TCP, ANY the RFC 8482 HINFO. Nothing goes upstream, nothing is
    logged above debug."""
    async def body(env: Env) -> None:
        with caplog.at_level(logging.INFO, logger="resolver"):
            caplog.clear()  # the server's own start-up lines are not what this is about
            for qtype in (0, 41, 128, 200, 248, 249, 250, 253, 254):
                r = dns.message.from_wire(await env.udp(q("www.example.test.", qtype,
                                                          use_edns=0)))
                assert r.rcode() == dns.rcode.FORMERR, qtype
                assert [e.code for e in r.extended_errors()] == [
                    dns.edns.EDECode.INVALID_QUERY_TYPE], qtype
                assert r.question[0].rdtype == qtype
            for qtype in ("AXFR", "IXFR"):
                r = dns.message.from_wire(await env.udp(q("example.test.", qtype)))
                assert r.rcode() == dns.rcode.REFUSED, qtype
                (r,) = await tcp_exchange(env, [q("example.test.", qtype)])
                assert r.rcode() == dns.rcode.REFUSED, qtype
            r = dns.message.from_wire(await env.udp(q("www.example.test.", "ANY")))
            assert r.rcode() == dns.rcode.NOERROR and not r.flags & dns.flags.AD
            assert [rr.to_text() for rr in r.answer] == [
                'www.example.test. 3600 IN HINFO "RFC8482" ""']
        assert env.up.count() == 0
        assert not [rec for rec in caplog.records if rec.levelno >= logging.INFO]

    with_server(body)


def test_malformed_edns_cookie_is_formerr_even_when_cached() -> None:
    """RFC 7873 5.2.2: a COOKIE option that is not 8 bytes (client cookie) or 16-40 (client +
    server cookie) is FORMERR, also for a name whose answer is in the wire cache (the fast
    path used to answer NOERROR without looking at the options)."""
    def with_cookie(n: int) -> dns.message.Message:
        return q("www.example.test.", use_edns=0,
                 options=[dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"c" * n)])

    async def body(env: Env) -> None:
        assert dns.message.from_wire(await env.udp(with_cookie(8))).rcode() == dns.rcode.NOERROR
        assert env.server.cache is not None
        hits = env.server.cache.hits
        for n in (8, 16, 40):  # well-formed: answered from the cache
            r = await env.udp(with_cookie(n))
            assert r is not None and r[3] & 0x0F == dns.rcode.NOERROR, n
        assert env.server.cache.hits == hits + 3
        for n in (0, 5, 7, 9, 12, 15, 41):
            r = await env.udp(with_cookie(n))
            assert r is not None and r[3] & 0x0F == dns.rcode.FORMERR, n
        assert env.up.count() == 1

    with_server(body)


async def tcp_exchange(env: Env, queries: list[dns.message.Message], *, chunk: int = 0
                       ) -> list[dns.message.Message]:
    reader, writer = await asyncio.open_connection(env.host, env.port)
    data = b"".join(len(w).to_bytes(2, "big") + w for w in (m.to_wire() for m in queries))
    if chunk:
        for i in range(0, len(data), chunk):
            writer.write(data[i:i + chunk])
            await writer.drain()
            await asyncio.sleep(0)
    else:
        writer.write(data)
    out = []
    for _ in queries:
        n = int.from_bytes(await reader.readexactly(2), "big")
        out.append(dns.message.from_wire(await reader.readexactly(n)))
    writer.close()
    return out


def test_tcp_pipelined_answers_as_they_complete() -> None:
    async def body(env: Env) -> None:
        slow, a, b = q("slow.example.test."), q("a.example.test."), q("b.example.test.")
        replies = await tcp_exchange(env, [slow, a, b])
        assert [r.id for r in replies][-1] == slow.id  # the slow one came last
        assert {r.id for r in replies} == {slow.id, a.id, b.id}
        one_by_one = await tcp_exchange(env, [q("c.example.test."), q("d.example.test.")],
                                        chunk=1)
        assert [r.answer[0][0].to_text() for r in one_by_one] == ["192.0.2.1"] * 2

    with_server(body)


def test_tcp_idle_timeout_closes_the_connection() -> None:
    async def body(env: Env) -> None:
        reader, writer = await asyncio.open_connection(env.host, env.port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(reader.read(1), 3) == b""  # closed by the server
        assert 0.2 < loop.time() - t0 < 2
        writer.close()

    with_server(body, tcp_idle_timeout=0.3)


def test_tcp_connection_bound_evicts_a_trickling_connection_first() -> None:
    """At the bound a newcomer replaces a connection trickling a frame before one that was
    answered; a connection with a query in progress is never evicted, and when all have one
    the newcomer is refused. (tests/test_server_tcp.py has the rest of the order.)"""
    async def body(env: Env) -> None:
        first = await asyncio.open_connection(env.host, env.port)
        second = await asyncio.open_connection(env.host, env.port)
        await asyncio.sleep(0.05)
        # `first` sends a query (answered) and `second` starts a frame it does not finish.
        wire = q("www.example.test.").to_wire()
        first[1].write(len(wire).to_bytes(2, "big") + wire)
        n = int.from_bytes(await first[0].readexactly(2), "big")
        await first[0].readexactly(n)
        second[1].write((len(wire).to_bytes(2, "big") + wire)[:len(wire) // 2])
        await asyncio.sleep(0.05)
        third = await asyncio.open_connection(env.host, env.port)
        assert await asyncio.wait_for(second[0].read(1), 2) == b""  # evicted
        assert len(env.server.tcp_connections) == 2
        # Both remaining connections get a slow query in progress: a fourth is refused.
        slow = [q(f"slow{i}.example.test.") for i in range(2)]
        for m, (_, w) in zip(slow, (first, third), strict=True):
            wire = m.to_wire()
            w.write(len(wire).to_bytes(2, "big") + wire)
        await asyncio.sleep(0.2)
        fourth = await asyncio.open_connection(env.host, env.port)
        assert await asyncio.wait_for(fourth[0].read(1), 2) == b""
        for m, (r, _) in zip(slow, (first, third), strict=True):  # their replies still come
            n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 3), "big")
            assert dns.message.from_wire(await r.readexactly(n)).id == m.id
        for _, w in (first, second, third, fourth):
            w.close()

    with_server(body, tcp_max_connections=2)


# --- fuzz: any bytes -> a reply or a drop ---------------------------------------------------

class _NullHandler:
    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.answer = []
        return reply


class _FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        ...

    def get_write_buffer_size(self) -> int:
        return 0  # writes land in `written` at once


def _query_like() -> st.SearchStrategy[bytes]:
    base = q("www.example.test.", want_dnssec=True).to_wire()
    return st.one_of(
        st.binary(max_size=300),
        st.binary(min_size=12, max_size=12).map(lambda h: h + base[12:]),
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=6).map(
            lambda edits: bytes(_apply(base, edits))),
    )


def _apply(base: bytes, edits: list[tuple[int, int]]) -> bytearray:
    b = bytearray(base)
    for i, v in edits:
        b[i] = v
    return b


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_query_like())
def test_fuzz_udp_any_bytes_reply_or_drop(data: bytes) -> None:
    server = Server(_NullHandler(), cache=WireCache(10), clock=lambda: WHEN)

    async def main() -> None:
        fast = server.fast_reply(data, WHEN, udp=True)
        reply = fast if fast is not None else await server.slow_reply(data, WHEN, udp=True)
        if reply is not None:
            assert len(reply) >= 12 and reply[2] & 0x80 and reply[:2] == data[:2]
        else:
            assert len(data) < 12 or data[2] & 0x80

    asyncio.run(main())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_query_like(), min_size=1, max_size=3), st.booleans())
def test_fuzz_tcp_bytewise(messages: list[bytes], bytewise: bool) -> None:
    async def main() -> None:
        server = Server(_NullHandler(), cache=WireCache(10), clock=lambda: WHEN)
        proto = TcpConnection(server)
        transport = _FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        stream = b"".join(len(m).to_bytes(2, "big") + m for m in messages)
        if bytewise:
            for i in range(len(stream)):
                proto.data_received(stream[i:i + 1])
        else:
            proto.data_received(stream)
        await until(lambda: not proto.tasks, what="every query answered")
        # Every frame got a reply or a drop; what was written parses as length-prefixed DNS.
        out, pos, n = transport.written, 0, 0
        while pos < len(out):
            length = int.from_bytes(out[pos:pos + 2], "big")
            assert length >= 12 and out[pos + 2 + 2] & 0x80
            pos += 2 + length
            n += 1
        assert pos == len(out) and n <= len(messages)
        proto.connection_lost(None)

    asyncio.run(main())
