"""The floor under a private IPv6 destination's tunnel when ESP runs in charon (kernel-libipsec).

Theory of operation. With kernel-libipsec what sends a destination D's packets into the tunnel
is a route: charon puts `D dev ipsec0` (its TUN device) in its routing table (220), which its
rule `not fwmark 0x42 lookup 220` consults for every packet but charon's own (IKE and the
ESP-in-UDP that carries the tunnel leave from its sockets, which carry the mark). When charon
loses the tunnel (the peer deletes it, charon stops or dies: the TUN device goes with the
process) that route goes at once and the next packet falls through to the main table, in clear,
until the watch's XFRM shunt lands 1-20 ms later (measured: 0-4 datagrams of a 3,000/s blaster).
For IPv6 the floor closes that gap where it opens, for every private destination with a tunnel:

    rule   <charon's priority + 1>  <charon's mark selector>  lookup FLOOR_TABLE
    route  prohibit D  table FLOOR_TABLE   proto static

While charon's route is there its rule, which comes first, sends D's packets into the tunnel;
the moment it goes the same packets meet the prohibit route (the sender gets EACCES, nothing
reaches the wire). Charon's own packets skip our rule exactly as they skip its own, because the
mark selector is copied from its rule, so IKE to D and the ESP-in-UDP of the tunnel pass with no
port exceptions. The rule and the table are ours: charon deleting its rule on a graceful stop,
or coming back with a new TUN device, leaves the floor as it was.

Why routes for IPv6: an XFRM policy can tell the tunnel's packets from the others only by the
output device (the selector's ifindex), and the kernel fills it in before the policy lookup for
IPv4 but not for IPv6 (measured, kernel 6.18: a v6 BLOCK with `dev eth0` never matched a
socket's packets). Why not routes for IPv4 too: the kernel's IPv4 reverse-path filter (even
loose, rp_filter = 2, a common default) looks the *source* of incoming packets up in the same
tables, unmarked, finds the prohibit route while the TUN route is gone, and drops everything
from D, the IKE that would bring the tunnel back included (measured). IPv6 has no such filter
in the kernel; netfilter's `rpfilter` (loose or strict) would do the same, and a strict one
already drops a libipsec peer's IKE while its tunnel is up. So IPv4 is floored by XFRM
(resolver/tunnels/xfrm.py, `floor_rules`), and so is everything with kernel ESP.

Refused (no floor; the caller logs why): a TUN route in a table that no rule with a mark
selector consults, since charon's own packets could not be told apart (such a kernel-libipsec
setup could not carry a host-to-host tunnel anyway: IKE would be routed into the TUN).

Thread-confined like resolver/tunnels/xfrm.py's XfrmPolicies (one socket, one thread); raises
OSError. Ownership: everything in FLOOR_TABLE and every rule that looks it up is ours.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Final

from resolver.tunnels import netlink
from resolver.tunnels.netlink import (
    NETLINK_GET_STRICT_CHK,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    SOL_NETLINK,
    attr,
    attrs,
    error_of,
    message,
    messages,
    open_socket,
)

Address = IPv4Address | IPv6Address

NETLINK_ROUTE: Final = 0
RTM_NEWLINK: Final = 16
RTM_GETLINK: Final = 18
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWRULE: Final = 32
RTM_DELRULE: Final = 33
RTM_GETRULE: Final = 34
RTM_F_LOOKUP_TABLE: Final = 0x1000
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_TABLE: Final = 15
RTN_PROHIBIT: Final = 8
RTPROT_STATIC: Final = 4
RT_SCOPE_UNIVERSE: Final = 0
RT_SCOPE_NOWHERE: Final = 255
FRA_PRIORITY: Final = 6
FRA_FWMARK: Final = 10
FRA_TABLE: Final = 15
FRA_FWMASK: Final = 16
FR_ACT_TO_TBL: Final = 1
FIB_RULE_INVERT: Final = 0x2
IFLA_LINKINFO: Final = 18
IFLA_INFO_KIND: Final = 1

FLOOR_TABLE: Final = 0x15C0  # ours alone (5568); charon's is 220 by default

_RTMSG: Final = struct.Struct("=BBBBBBBBI")  # rtmsg, and fib_rule_hdr (same layout)
_IFINFO: Final = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_U32: Final = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Path:
    """Where an unmarked packet to a destination goes: its routing table and device."""

    table: int
    oif: int
    tun: bool = False  # the device is a TUN (kernel-libipsec's ipsec0)


@dataclass(frozen=True, slots=True)
class RoutingRule:
    """A `lookup TABLE` rule, with the selector we copy (fwmark/mask, inverted or not)."""

    family: int
    priority: int
    table: int
    fwmark: int = 0
    fwmask: int = 0
    invert: bool = False


def _family(d: Address) -> int:
    return socket.AF_INET if d.version == 4 else socket.AF_INET6


def _table_fields(table: int) -> tuple[int, bytes]:
    """(the header's u8 table, the RTA_TABLE/FRA_TABLE attribute): tables above 255 live
    only in the attribute (RT_TABLE_UNSPEC in the header)."""
    return (table if table < 256 else 0), attr(RTA_TABLE, _U32.pack(table))


def encode_route_get(dest: Address, seq: int) -> bytes:
    """RTM_GETROUTE for one destination, as an unmarked local packet would be routed; the
    reply names the table the route came from (IPv4 only with RTM_F_LOOKUP_TABLE, which
    IPv6 refuses under strict checking: it always names the table)."""
    body = _RTMSG.pack(_family(dest), dest.max_prefixlen, 0, 0, 0, 0, 0, 0,
                       RTM_F_LOOKUP_TABLE if dest.version == 4 else 0) + attr(RTA_DST,
                                                                                dest.packed)
    return message(RTM_GETROUTE, NLM_F_REQUEST, seq, body)


def encode_floor_route(dest: Address, seq: int, *, delete: bool = False) -> bytes:
    """RTM_NEWROUTE (create or replace) / RTM_DELROUTE of `prohibit DEST table FLOOR_TABLE`."""
    t8, tattr = _table_fields(FLOOR_TABLE)
    if delete:
        head = _RTMSG.pack(_family(dest), dest.max_prefixlen, 0, 0, t8, 0, RT_SCOPE_NOWHERE,
                           RTN_PROHIBIT, 0)
        return message(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, seq,
                       head + attr(RTA_DST, dest.packed) + tattr)
    head = _RTMSG.pack(_family(dest), dest.max_prefixlen, 0, 0, t8, RTPROT_STATIC,
                       RT_SCOPE_UNIVERSE, RTN_PROHIBIT, 0)
    return message(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, seq,
                   head + attr(RTA_DST, dest.packed) + tattr)


def encode_route_dump(family: int, seq: int) -> bytes:
    """RTM_GETROUTE dump of FLOOR_TABLE (the kernel filters by table under strict checking;
    `decode_floor_route` filters again)."""
    t8, tattr = _table_fields(FLOOR_TABLE)
    body = _RTMSG.pack(family, 0, 0, 0, t8, 0, 0, 0, 0) + tattr
    return message(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def encode_rule(rule: RoutingRule, seq: int, *, delete: bool = False) -> bytes:
    """RTM_NEWRULE (exclusive) / RTM_DELRULE of `priority P [not] fwmark M/MASK lookup T`."""
    t8, tattr = _table_fields(rule.table)
    body = (_RTMSG.pack(rule.family, 0, 0, 0, t8, 0, 0, FR_ACT_TO_TBL,
                        FIB_RULE_INVERT if rule.invert else 0)
            + attr(FRA_PRIORITY, _U32.pack(rule.priority)) + tattr)
    if rule.fwmask:
        body += attr(FRA_FWMARK, _U32.pack(rule.fwmark)) + attr(FRA_FWMASK,
                                                                 _U32.pack(rule.fwmask))
    if delete:
        return message(RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, seq, body)
    return message(RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, seq,
                   body)


def encode_rule_dump(family: int, seq: int) -> bytes:
    return message(RTM_GETRULE, NLM_F_REQUEST | NLM_F_DUMP, seq,
                   _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0))


def encode_link_get(index: int, seq: int) -> bytes:
    return message(RTM_GETLINK, NLM_F_REQUEST, seq,
                   _IFINFO.pack(socket.AF_UNSPEC, 0, index, 0, 0))


def _table_of(head_table: int, a: dict[int, bytes]) -> int:
    return _U32.unpack(a[RTA_TABLE][:4])[0] if len(a.get(RTA_TABLE, b"")) >= 4 else head_table


def decode_route(body: bytes) -> tuple[Path, int, int, Address | None] | None:
    """(path, type, dst_len, destination) of an RTM_NEWROUTE body, None if unreadable."""
    if len(body) < _RTMSG.size:
        return None
    family, dst_len, _, _, t8, _, _, rtype, _ = _RTMSG.unpack_from(body)
    a = attrs(body, _RTMSG.size)
    oif = _U32.unpack(a[RTA_OIF][:4])[0] if len(a.get(RTA_OIF, b"")) >= 4 else 0
    raw = a.get(RTA_DST)
    dest: Address | None = None
    if raw is not None and family in (socket.AF_INET, socket.AF_INET6) and len(raw) in (4, 16):
        dest = ip_address(raw)
    return Path(_table_of(t8, a), oif), rtype, dst_len, dest


def decode_floor_route(body: bytes) -> Address | None:
    """The destination of a dumped route if it is one of our floors, else None."""
    found = decode_route(body)
    if found is None:
        return None
    path, rtype, dst_len, dest = found
    if path.table != FLOOR_TABLE or rtype != RTN_PROHIBIT or dest is None \
            or dst_len != dest.max_prefixlen:
        return None
    return dest


def decode_rule(body: bytes) -> RoutingRule | None:
    """A dumped `lookup TABLE` rule (RTM_NEWRULE body); None for other actions."""
    if len(body) < _RTMSG.size:
        return None
    family, _, _, _, t8, _, _, action, flags = _RTMSG.unpack_from(body)
    if action != FR_ACT_TO_TBL:
        return None
    a = attrs(body, _RTMSG.size)

    def u32(kind: int) -> int:
        raw = a.get(kind, b"")
        return _U32.unpack(raw[:4])[0] if len(raw) >= 4 else 0

    return RoutingRule(family, u32(FRA_PRIORITY), _table_of(t8, a), u32(FRA_FWMARK),
                       u32(FRA_FWMASK), bool(flags & FIB_RULE_INVERT))


def decode_link_kind(body: bytes) -> str:
    """IFLA_INFO_KIND of an RTM_NEWLINK body ("tun", "veth", ...; "" for none)."""
    if len(body) < _IFINFO.size:
        return ""
    info = attrs(body, _IFINFO.size).get(IFLA_LINKINFO)
    kind = attrs(info).get(IFLA_INFO_KIND, b"") if info is not None else b""
    return kind.split(b"\0", 1)[0].decode("ascii", "replace")


def floor_rule(charon: RoutingRule) -> RoutingRule:
    """Our rule for the floor behind `charon`'s rule: right after it, with its selector."""
    return RoutingRule(charon.family, charon.priority + 1, FLOOR_TABLE, charon.fwmark,
                       charon.fwmask, charon.invert)


class RouteFloor:
    """The route floors of one network namespace, over a NETLINK_ROUTE socket (see the module
    docstring). Thread-confined; raises OSError."""

    CHUNK: Final = 100

    def __init__(self, netns: str | None = None) -> None:
        self.sock = open_socket(netns, NETLINK_ROUTE)
        try:  # the kernel filters dumps by table (Linux >= 4.20); we filter again anyway
            self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        except OSError:
            pass
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF_FFFF or 1
        return self.seq

    # -- what the kernel says --------------------------------------------------------------

    def paths(self, dests: Iterable[Address]) -> dict[Address, Path | int]:
        """Destination -> where an unmarked packet to it goes now, or the errno of the
        lookup (ENETUNREACH: no route; EACCES: it meets a prohibit route, e.g. a floor)."""
        seq_of = {d: self.next_seq() for d in dict.fromkeys(dests)}
        replies = self._replies([encode_route_get(d, s) for d, s in seq_of.items()])
        routes: dict[Address, Path | int] = {}
        for dest, seq in seq_of.items():
            mtype, body = replies[seq]
            if mtype == RTM_NEWROUTE and (found := decode_route(body)) is not None:
                routes[dest] = found[0]
            else:
                routes[dest] = (error_of(body) if mtype == NLMSG_ERROR else 0) or errno.EIO
        kinds = self._link_kinds({p.oif for p in routes.values() if isinstance(p, Path)})
        return {d: Path(p.table, p.oif, kinds.get(p.oif) == "tun") if isinstance(p, Path) else p
                for d, p in routes.items()}

    def rules(self, family: int) -> list[RoutingRule]:
        """The `lookup TABLE` rules of one family."""
        return [r for body in self._dump(encode_rule_dump(family, self.next_seq()))
                if (r := decode_rule(body)) is not None]

    def ours(self) -> list[Address]:
        """The destinations with a floor route of ours."""
        return [d for family in (socket.AF_INET, socket.AF_INET6)
                for body in self._dump(encode_route_dump(family, self.next_seq()))
                if (d := decode_floor_route(body)) is not None]

    # -- changing it -----------------------------------------------------------------------

    def install(self, floors: dict[Address, int]) -> dict[Address, str | None]:
        """Floor each destination behind the routing table its TUN route is in (dest ->
        table); returns dest -> why it was not floored (None: floored)."""
        out: dict[Address, str | None] = {}
        by_family: dict[int, dict[Address, int]] = {}
        for dest, table in floors.items():
            by_family.setdefault(_family(dest), {})[dest] = table
        for family, tables in by_family.items():
            table = next(iter(tables.values()))
            why = self._ensure_rule(family, table)
            todo = [d for d, t in tables.items() if t == table and why is None]
            for dest, t in tables.items():
                if why is not None:
                    out[dest] = why
                elif t != table:
                    out[dest] = f"its tunnel route is in table {t}, another's in {table}"
            acks = self._acked([encode_floor_route(d, self.next_seq()) for d in todo])
            for dest, err in zip(todo, acks, strict=True):
                out[dest] = None if err == 0 else f"prohibit route: {os.strerror(err)}"
        return out

    def remove(self, dests: Iterable[Address]) -> dict[Address, int]:
        """Remove the floors of `dests` (errno per destination, 0 also when there was none);
        a family left without floors loses our rule too."""
        todo = list(dict.fromkeys(dests))
        acks = self._acked([encode_floor_route(d, self.next_seq(), delete=True) for d in todo])
        out = {d: 0 if e in (errno.ESRCH, errno.ENOENT) else e
               for d, e in zip(todo, acks, strict=True)}
        left = {_family(d) for d in self.ours()}
        for family in {_family(d) for d in todo} - left:
            self._drop_rules(family)
        return out

    def flush(self) -> int:
        """Remove every floor route and rule of ours; returns how many routes there were."""
        found = self.ours()
        self.remove(found)
        for family in (socket.AF_INET, socket.AF_INET6):
            self._drop_rules(family)
        return len(found)

    def _ensure_rule(self, family: int, table: int) -> str | None:
        """Our rule right after the one that looks `table` up, with its mark selector; None
        when it is in place, else why there can be none."""
        rules = self.rules(family)
        theirs = sorted((r for r in rules if r.table == table and r.table != FLOOR_TABLE),
                        key=lambda r: r.priority)
        if not theirs:
            return f"no routing rule looks up table {table}, the tunnel route's"
        if not theirs[0].fwmask:
            return (f"the rule looking up table {table} (priority {theirs[0].priority}) has no "
                    "fwmark: the IKE daemon's own packets could not be told apart")
        want = floor_rule(theirs[0])
        ours = [r for r in rules if r.table == FLOOR_TABLE]
        if ours == [want]:
            return None
        self._check(self._acked([encode_rule(r, self.next_seq(), delete=True) for r in ours]),
                    "floor rule removal", ok=(errno.ENOENT,))
        self._check(self._acked([encode_rule(want, self.next_seq())]), "floor rule",
                    ok=(errno.EEXIST,))
        return None

    def _drop_rules(self, family: int) -> None:
        ours = [r for r in self.rules(family) if r.table == FLOOR_TABLE]
        self._check(self._acked([encode_rule(r, self.next_seq(), delete=True) for r in ours]),
                    "floor rule removal", ok=(errno.ENOENT,))

    @staticmethod
    def _check(acks: list[int], what: str, ok: tuple[int, ...]) -> None:
        bad = [e for e in acks if e not in (0, *ok)]
        if bad:
            raise OSError(bad[0], f"{what}: {os.strerror(bad[0])}")

    # -- the socket --------------------------------------------------------------------------

    def _link_kinds(self, indexes: set[int]) -> dict[int, str]:
        seq_of = {i: self.next_seq() for i in indexes if i > 0}
        replies = self._replies([encode_link_get(i, s) for i, s in seq_of.items()])
        return {i: decode_link_kind(replies[s][1]) for i, s in seq_of.items()
                if s in replies and replies[s][0] == RTM_NEWLINK}

    def _send(self, batch: list[bytes]) -> set[int]:
        self.sock.send(b"".join(batch))
        return {NLMSGHDR.unpack_from(m)[3] for m in batch}

    def _replies(self, msgs: list[bytes]) -> dict[int, tuple[int, bytes]]:
        """Send requests that each get one reply (a message, or an error); seq -> reply."""
        out: dict[int, tuple[int, bytes]] = {}
        for i in range(0, len(msgs), self.CHUNK):
            wanted = self._send(msgs[i:i + self.CHUNK])
            while not wanted <= out.keys():
                for mtype, seq, body in messages(self.sock.recv(1 << 16)):
                    if seq in wanted:
                        out.setdefault(seq, (mtype, body))
        return out

    def _acked(self, msgs: list[bytes]) -> list[int]:
        """Send requests with NLM_F_ACK; their errnos (0: done), in order."""
        replies = self._replies(msgs)
        return [error_of(body) if mtype == NLMSG_ERROR else 0
                for mtype, body in (replies[NLMSGHDR.unpack_from(m)[3]] for m in msgs)]

    def _dump(self, request: bytes) -> list[bytes]:
        """The bodies of a dump's messages."""
        seq = NLMSGHDR.unpack_from(request)[3]
        return [body for _, body in netlink.dump(self.sock, request, seq, "route")]
