"""One question to one authoritative server, over UDP (with 0x20) or TCP: iterative mode's edge.

Theory of operation: ``udp_exchange`` opens a fresh connected socket (a kernel-chosen random
source port) per question, sends it with a random ID, RD=0 and EDNS0 (DO=1, our payload size),
and waits for the first datagram that comes from the address and port asked, carries our ID
and QR=1, and echoes the question *byte for byte* — with 0x20 the name was sent in random
letter case (core.randomise_case), so a forger must guess that too. A datagram equal in
everything but the case is ignored (a forgery, or a server that does not keep the case); if
no exact echo comes before the timeout and such a datagram was seen, ``CaseMismatch`` tells
the caller to ask over TCP instead. ``tcp_exchange`` is the same over one TCP connection
(used for TC=1 and for servers that do not echo case). Both put the caller's letter case back
into the question before parsing, so names compressed against it come out as asked.

Network errors and timeouts become ``Unreachable`` here, once; nothing else leaves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import struct
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from resolver.iterate.infra import Address
from resolver.upstream import tcp as dnstcp
from resolver.wire.parse import parse_response


class Unreachable(Exception):
    """One server did not answer usably (timeout, network error); try the next one."""


class CaseMismatch(Exception):
    """A reply matched in everything but the letter case of the question (no 0x20 echo)."""


@dataclass(slots=True)
class IterStats:
    """Counters for tests, the benchmark and debugging."""

    sent_udp: int = 0
    sent_tcp: int = 0
    timeouts: int = 0
    lame: int = 0
    referrals: int = 0
    ns_lookups: int = 0
    case_mismatch: int = 0
    ignored: int = 0  # datagrams that did not match the question we asked
    coalesced: int = 0
    primed: int = 0


def make_query(sent: dns.name.Name, rdtype: dns.rdatatype.RdataType, payload: int
               ) -> dns.message.Message:
    """An iterative query: random ID, RD=0, EDNS0 with DO=1."""
    q = dns.message.make_query(sent, rdtype, use_edns=0, want_dnssec=True, payload=payload)
    q.flags = 0  # RD=0: we ask authorities, not recursive servers
    q.id = secrets.randbelow(65536)
    return q


def wire(name: dns.name.Name) -> bytes:
    """The uncompressed wire form of a name."""
    data = name.to_wire()
    assert data is not None  # to_wire() without a file returns the bytes
    return data


class _Waiter(asyncio.DatagramProtocol):
    """Waits on one connected socket for the reply to our question, compared byte for byte."""

    def __init__(self, server: Address, qid: int, sent: bytes, original: bytes,
                 type_class: bytes, stats: IterStats, *, glue: bool) -> None:
        self.server, self.qid, self.glue = server, qid, glue
        self.sent, self.original, self.type_class = sent, original, type_class
        self.stats = stats
        self.case_mismatch = False
        self.result: asyncio.Future[dns.message.Message] = (
            asyncio.get_running_loop().create_future())

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.result.done() or not _same_address(addr, self.server) or len(data) < 12:
            self.stats.ignored += 1
            return
        qid, flags, qdcount = struct.unpack_from("!HHH", data)
        end = 12 + len(self.sent)
        if qid != self.qid or not flags & dns.flags.QR or qdcount != 1 \
                or data[end:end + 4] != self.type_class:
            self.stats.ignored += 1
            return
        got = data[12:end]
        if got != self.sent:
            if got.lower() == self.sent.lower():
                self.case_mismatch = True
            self.stats.ignored += 1
            return
        head = data[:12]
        answer = not self.glue and data[6:8] != b"\0\0"
        if answer:
            # An answer: its additional section (glue, OPT) is never used, and parsing it
            # was a third of the CPU time of a lookup. ARCOUNT=0 and the rest ignored.
            head = data[:10] + b"\0\0"
        try:
            # The question back in the caller's case; pointers into it follow. An answer
            # (ARCOUNT zeroed above) is read by wire/parse, the same message for a third of
            # from_wire's cost; anything else keeps from_wire (a referral, for its glue).
            wire = head + self.original + data[end:]
            reply = (parse_response(wire) if answer
                     else dns.message.from_wire(wire, ignore_trailing=True))
        except (dns.exception.DNSException, ValueError, UnicodeError, IndexError,
                struct.error):
            self.stats.ignored += 1  # our ID and question but not DNS: keep waiting
            return
        self.result.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        if not self.result.done():
            self.result.set_exception(Unreachable(f"{self.server[0]}: {exc}"))


def _same_address(addr: tuple[str | int, ...], server: Address) -> bool:
    try:
        return addr[1] == server[1] and ipaddress.ip_address(str(addr[0])) == \
            ipaddress.ip_address(server[0])
    except ValueError:
        return False


async def udp_exchange(addr: Address, name: dns.name.Name, sent: dns.name.Name,
                       rdtype: dns.rdatatype.RdataType, timeout: float, payload: int,
                       stats: IterStats) -> dns.message.Message:
    """Ask ``sent`` (``name`` in 0x20 case) over UDP; the reply in ``name``'s case.

    Raises:
        Unreachable: timeout or network error.
        CaseMismatch: only replies with the wrong letter case came.
    """
    q = make_query(sent, rdtype, payload)
    type_class = struct.pack("!HH", rdtype, dns.rdataclass.IN)
    loop = asyncio.get_running_loop()
    stats.sent_udp += 1
    try:
        transport, waiter = await loop.create_datagram_endpoint(
            lambda: _Waiter(addr, q.id, wire(sent), wire(name), type_class, stats,
                            glue=rdtype == dns.rdatatype.NS),
            remote_addr=addr)
    except OSError as e:
        raise Unreachable(f"{addr[0]}: {e.strerror or e}") from None
    try:
        transport.sendto(q.to_wire())
        return await asyncio.wait_for(waiter.result, timeout)
    except TimeoutError:
        if waiter.case_mismatch:
            raise CaseMismatch from None
        raise Unreachable(f"{addr[0]}: timeout after {timeout:.2f} s") from None
    finally:
        transport.close()


async def tcp_exchange(addr: Address, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                       timeout: float, payload: int, stats: IterStats) -> dns.message.Message:
    """Ask ``name`` over one TCP connection (no 0x20: the handshake already binds the reply).

    Raises:
        Unreachable: timeout, network error, or a reply that is not ours.
    """
    q = make_query(name, rdtype, payload)
    stats.sent_tcp += 1
    try:
        reply = await dnstcp.exchange(str(addr[0]), int(addr[1]), q.to_wire(), timeout)
    except dnstcp.TcpFailed as e:
        raise Unreachable(f"{addr[0]}: {e}") from None
    q0 = reply.question[0] if len(reply.question) == 1 else None
    if reply.id != q.id or q0 is None or q0.name != name or q0.rdtype != rdtype:
        raise Unreachable(f"{addr[0]}: TCP reply does not match the question")
    return reply
