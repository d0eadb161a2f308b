"""A scripted DNS server for tests: UDP and TCP on 127.0.0.1, a random port, in the test's loop.

Each test gives a `script(query, transport)` function that says what to send back:
  - a dns.message.Message: sent as the reply (its ID is whatever the script set);
  - bytes: sent as they are (garbage, a reply with the wrong ID, ...);
  - a list of the above: sent one after another (e.g. a spoofed reply, then the real one);
  - None: nothing (a timeout for the client);
  - Delay(seconds, reply): the reply after a pause.
Every query received is recorded in `queries` as (transport, message), so tests can count
exchanges (coalescing) and check the flags we send (DO, CD).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

import resolver.validator.response
from resolver.config import CacheConfig, HostPort
from resolver.resolve import Fetch, Resolution
from resolver.upstream.forward import Forwarder


@dataclass
class Delay:
    seconds: float
    reply: Reply


Reply = Union[dns.message.Message, bytes, list["Reply"], None, Delay]  # noqa: UP007
Script = Callable[[dns.message.Message, str], Reply]


def answer(query: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR,
           authority: tuple[str, ...] = (), tc: bool = False) -> dns.message.Message:
    """A reply to query with records given as zone-file text ("name ttl IN A 192.0.2.1")."""
    reply = dns.message.make_response(query)
    for text in records:
        rr = dns.rrset.from_text(*text.split(maxsplit=4))
        reply.answer.append(rr)
    for text in authority:
        reply.authority.append(dns.rrset.from_text(*text.split(maxsplit=4)))
    reply.set_rcode(rcode)
    if tc:
        reply.flags |= dns.flags.TC
        reply.answer = []
    return reply


class ScriptedUpstream:
    """A DNS server driven by a script; start() binds 127.0.0.1 on a random port (UDP+TCP)."""

    def __init__(self, script: Script, host: str = "127.0.0.1") -> None:
        self.script = script
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, dns.message.Message]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> HostPort:
        return HostPort(self.host, self.port)

    def count(self, transport: str | None = None) -> int:
        return sum(1 for t, _ in self.queries if transport is None or t == transport)

    async def start(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        # The same port for UDP and TCP: try random UDP ports until TCP can take it too.
        for _ in range(20):
            udp, _proto = await loop.create_datagram_endpoint(
                lambda: _Udp(self), local_addr=(self.host, 0))
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._tcp_client, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise RuntimeError("no free port pair on 127.0.0.1")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> ScriptedUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _play(self, reply: Reply, send: Callable[[bytes], None]) -> None:
        if reply is None:
            return
        if isinstance(reply, Delay):
            await asyncio.sleep(reply.seconds)
            await self._play(reply.reply, send)
        elif isinstance(reply, list):
            for r in reply:
                await self._play(r, send)
        elif isinstance(reply, bytes):
            send(reply)
        else:
            send(reply.to_wire(max_size=65535))

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                          ) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                wire = await reader.readexactly(n)
                query = dns.message.from_wire(wire)
                self.queries.append(("tcp", query))
                await self._play(self.script(query, "tcp"),
                                 lambda b: writer.write(len(b).to_bytes(2, "big") + b))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: ScriptedUpstream) -> None:
        self.owner = owner
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector datagram transport does not subclass DatagramTransport (3.11).
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        query = dns.message.from_wire(data)
        self.owner.queries.append(("udp", query))
        reply = self.owner.script(query, "udp")
        transport = self.transport
        assert transport is not None
        self.owner._spawn(self.owner._play(reply, lambda b: transport.sendto(b, addr)))


class FakeValidator:
    """Stands in for resolver.validator.response.Validator in unit tests of the resolution core.

    Verdicts come from `verdicts` (qname text -> Verdict), SECURE otherwise; the answer is the
    upstream's as it came. `fetches` extra lookups per validation go through the core's fetch,
    as the real validator's DNSKEY/DS lookups do.
    """

    def __init__(self, fetch: object,
                 verdicts: dict[str, resolver.validator.response.Verdict] | None = None,
                 fetches: int = 0) -> None:
        self.fetch = fetch
        self.verdicts = verdicts or {}
        self.fetches = fetches
        self.calls: list[tuple[str, int]] = []
        self.forgot = 0  # forget_bogus() calls (the core's re-check of a bogus verdict)

    def forget_bogus(self) -> None:
        self.forgot += 1

    async def validate(self, qname: dns.name.Name, qtype: int, response: dns.message.Message,
                       now: float) -> object:
        self.calls.append((qname.to_text(), int(qtype)))
        for _ in range(self.fetches):
            try:
                await self.fetch(dns.name.from_text("example.test."), dns.rdatatype.DNSKEY)  # type: ignore[operator]
            except Exception as e:  # the real validator turns fetch failures into verdicts
                return resolver.validator.response.ValidatedAnswer(
                    verdict=resolver.validator.response.Verdict(resolver.validator.response.Security.INDETERMINATE,
                                                      str(e), 22),
                    rcode=2, answer=[], authority=[], ttl=0)
        verdict = self.verdicts.get(qname.to_text(),
                                    resolver.validator.response.Verdict(resolver.validator.response.Security.SECURE))
        ttls = [r.ttl for s in (response.answer, response.authority) for r in s]
        return resolver.validator.response.ValidatedAnswer(
            verdict=verdict, rcode=response.rcode(), answer=list(response.answer),
            authority=list(response.authority), ttl=min(ttls) if ttls else 0)


def resolution(up: ScriptedUpstream,
               verdicts: dict[str, resolver.validator.response.Verdict] | None = None, *,
               fetches: int = 0, cache: CacheConfig | None = None, timeout: float = 0.5,
               attempts: int = 2) -> tuple[Resolution, FakeValidator]:
    """A Resolution forwarding to `up`, validated by a FakeValidator (returned too, so tests
    can count its calls). `timeout`/`attempts` are the Forwarder's."""
    made: list[FakeValidator] = []

    def make(fetch: Fetch) -> Any:  # a FakeValidator: duck-typed, not a Validating
        made.append(FakeValidator(fetch, verdicts, fetches=fetches))
        return made[-1]

    res = Resolution(Forwarder([up.endpoint], timeout=timeout, attempts=attempts), make,
                     cache=cache)
    return res, made[0]
