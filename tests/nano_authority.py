"""A tiny authoritative DNS server for tests of iterative mode (dnspython's nanonameserver style).

`Authority(host, port, zones)` serves the given zones (zone-file text per origin) over UDP and
TCP on host:port, with the answers an authoritative server gives: referrals (NS in authority,
AA clear, glue from the zone in additional) for names below a delegation (but DS at a cut is
answered from the parent side), AA answers, CNAMEs chased inside the zone, NODATA for empty
non-terminals, NXDOMAIN with the SOA. The question is echoed as received (letter case
included), and answer owners are compressed against it, as BIND does.

Misbehaviour for the tests comes from `behave(query, transport) -> Reply | None`: return a
message, bytes, a list, None (silence) or `DEFAULT` (the normal answer). Every query is
recorded in `queries` as (transport, message).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

DEFAULT: Final = object()
Behave = Callable[[dns.message.Message, str], Any]


class Authority:
    """See the module docstring."""

    def __init__(self, host: str, port: int, zones: dict[str, str],
                 behave: Behave | None = None) -> None:
        self.host, self.port = host, port
        self.zones = {dns.name.from_text(origin): dns.zone.from_text(text, origin,
                                                                    relativize=False)
                      for origin, text in zones.items()}
        self.behave = behave
        self.queries: list[tuple[str, dns.message.Message]] = []
        self._udp: asyncio.BaseTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    def asked(self, qname: str | None = None) -> list[str]:
        """The questions received ("name TYPE", name in lower case), optionally one name."""
        out = [f"{q.question[0].name.to_text().lower()} "
               f"{dns.rdatatype.to_text(q.question[0].rdtype)}" for _t, q in self.queries]
        return [o for o in out if qname is None or o.split()[0] == qname]

    async def start(self) -> Authority:
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(self), local_addr=(self.host, self.port))
        self._tcp = await asyncio.start_server(self._tcp_client, self.host, self.port)
        return self

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    def reply(self, query: dns.message.Message, transport: str) -> Any:
        self.queries.append((transport, query))
        if self.behave is not None:
            special = self.behave(query, transport)
            if special is not DEFAULT:
                return special
        return self.answer(query)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The authoritative answer (see the module docstring)."""
        q = query.question[0]
        r = dns.message.make_response(query)
        r.flags &= ~dns.flags.RA
        zones = [o for o in self.zones if q.name.is_subdomain(o)]
        if not zones:
            r.set_rcode(dns.rcode.REFUSED)
            return r
        origin = max(zones, key=len)
        zone = self.zones[origin]
        for depth in range(len(origin) + 1, len(q.name) + 1):
            cut = q.name.split(depth)[1]
            node = zone.get_node(cut)
            ns = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.NS) if node else None
            if ns is None or (q.rdtype == dns.rdatatype.DS and cut == q.name):
                continue
            r.authority.append(_rrset(cut, ns))
            ds = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.DS) if node else None
            if ds is not None:  # a signed parent sends the DS with the referral
                r.authority.append(_rrset(cut, ds))
            self._glue(zone, ns, r)
            return r
        r.flags |= dns.flags.AA
        name = q.name
        for _ in range(8):
            node = zone.get_node(name)
            if node is None:
                break
            rds = node.get_rdataset(dns.rdataclass.IN, q.rdtype)
            if rds is not None:
                r.answer.append(_rrset(name, rds))
                if q.rdtype == dns.rdatatype.NS:
                    self._glue(zone, rds, r)
                return r
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                break
            r.answer.append(_rrset(name, cname))
            name = next(iter(cname)).target
            if not name.is_subdomain(origin):
                return r  # leaves the zone: the resolver follows it
        soa = zone.get_rdataset(origin, dns.rdatatype.SOA)
        assert soa is not None
        r.authority.append(_rrset(origin, soa))
        exists = zone.get_node(name) is not None or any(
            n.is_subdomain(name) for n in zone.nodes)
        if not exists:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r

    @staticmethod
    def _glue(zone: dns.zone.Zone, ns: dns.rdataset.Rdataset, r: dns.message.Message) -> None:
        for rd in ns:
            node = zone.get_node(rd.target)
            for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                rds = node.get_rdataset(dns.rdataclass.IN, rdtype) if node else None
                if rds is not None:
                    r.additional.append(_rrset(rd.target, rds))

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            n = int.from_bytes(await reader.readexactly(2), "big")
            query = dns.message.from_wire(await reader.readexactly(n))
            for wire in _wires(self.reply(query, "tcp")):
                writer.write(len(wire).to_bytes(2, "big") + wire)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _rrset(name: dns.name.Name, rds: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rds.rdclass, rds.rdtype)
    rrset.update(rds)
    return rrset


def _wires(reply: Any) -> list[bytes]:
    if reply is None:
        return []
    if isinstance(reply, list):
        return [w for r in reply for w in _wires(r)]
    if isinstance(reply, bytes):
        return [reply]
    wire: bytes = reply.to_wire(max_size=65535)
    return [wire]


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, owner: Authority) -> None:
        self.owner = owner
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        query = dns.message.from_wire(data)
        for wire in _wires(self.owner.reply(query, "udp")):
            self.transport.sendto(wire, addr)
