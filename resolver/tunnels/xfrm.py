"""Kernel drop shunts as XFRM policies over netlink (pyroute2), for InstallShunt / RemoveShunt.

Theory of operation. A shunt for destination D is a small set of outbound XFRM policies:

    ALLOW  udp dport 500  -> D/32     priority ALLOW_PRIORITY   (IKE must still get through)
    ALLOW  udp dport 4500 -> D/32     priority ALLOW_PRIORITY   (IKE/NAT-T and ESP-in-UDP)
    ALLOW  icmpv6 type 135/136 -> D   priority ALLOW_PRIORITY   (IPv6 only: neighbour discovery)
    BLOCK  any -> D/32                priority BLOCK_PRIORITY   (everything else: EPERM)

The ALLOW entries exist because a BLOCK for D also catches the IKE daemon's own packets to D
(measured: with kernel-libipsec charon sets no per-socket bypass, and initiate then times out);
lower priority numbers win in XFRM. The applications' packets get EPERM on send/connect.

Ownership: we only ever touch policies whose priority is ALLOW_PRIORITY or BLOCK_PRIORITY and
whose selector is a single host, so dump/flush never disturb charon's or anyone else's policies.

pyroute2 0.9.7 has the NETLINK_XFRM socket but no message classes, so the structures of
<linux/xfrm.h> are declared below, flat and with explicit padding (pyroute2 packs each field on
its own, so C alignment must be spelled out): xfrm_selector 56 bytes, xfrm_userpolicy_info 168,
xfrm_userpolicy_id 64. A pyroute2 socket must be used from the thread that created it, so every
netlink call runs on one dedicated thread.

Speed (the install and removal are on the path of a first answer): pyroute2 0.9's synchronous
API runs a private event loop per request (measured ~0.6 ms per message, 3 ms to install an IPv6
shunt, 4 ms to remove it). Installs and removals therefore bypass it: the messages are packed
with `struct` (`encode_update`, `encode_delete`, checked byte for byte against pyroute2's
encoding in the unit tests) and sent on a plain netlink socket, *all pending intents in one
send* (the kernel processes a multi-message datagram in order, so ALLOWs still precede their
BLOCK), then the ACKs are read back by sequence number. While one batch is in the kernel the
next intents queue, so 200 concurrent shunts cost a few round trips, not 1000. pyroute2 stays
for dumps (reconcile, tests), which are rare.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeVar

from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from resolver.errors import ProvisioningError
from resolver.tunnels.intents import (
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveShunt,
    RemoveTunnel,
)

Address = IPv4Address | IPv6Address
T = TypeVar("T")

NETLINK_XFRM: Final = 6
XFRM_MSG_NEWPOLICY: Final = 0x13
XFRM_MSG_DELPOLICY: Final = 0x14
XFRM_MSG_GETPOLICY: Final = 0x15
XFRM_MSG_UPDPOLICY: Final = 0x19
XFRM_POLICY_OUT: Final = 1
XFRM_POLICY_ALLOW: Final = 0
XFRM_POLICY_BLOCK: Final = 1
XFRM_INF: Final = 0xFFFF_FFFF_FFFF_FFFF

# Ours, by priority (lower wins). Above charon's IPsec policies (kernel-netlink uses large
# values), so while a shunt is in place nothing leaves for D but IKE.
ALLOW_PRIORITY: Final = 0x15C0
BLOCK_PRIORITY: Final = 0x15C1
OUR_PRIORITIES: Final = frozenset((ALLOW_PRIORITY, BLOCK_PRIORITY))

_SELECTOR = (
    ("daddr", "16s"),
    ("saddr", "16s"),
    ("dport", ">H"),
    ("dport_mask", ">H"),
    ("sport", ">H"),
    ("sport_mask", ">H"),
    ("family", "H"),
    ("prefixlen_d", "B"),
    ("prefixlen_s", "B"),
    ("proto", "B"),
    ("__pad_sel", "3x"),
    ("ifindex", "i"),
    ("user", "I"),
)  # struct xfrm_selector: 56 bytes

_LIFETIME_CFG = tuple((n, "Q") for n in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))  # 64 bytes
_LIFETIME_CUR = tuple((n, "Q") for n in ("bytes", "packets", "add_time", "use_time"))  # 32


# pyroute2 is untyped (nlmsg is Any to mypy); the class names are the kernel's, as pyroute2 does.
class xfrm_userpolicy_info(nlmsg):  # type: ignore[misc]
    """struct xfrm_userpolicy_info (168 bytes): NEWPOLICY/UPDPOLICY body and dump entries."""

    fields = (
        *_SELECTOR,
        *_LIFETIME_CFG,
        *_LIFETIME_CUR,
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
        ("__pad_info", "4x"),
    )


class xfrm_userpolicy_id(nlmsg):  # type: ignore[misc]
    """struct xfrm_userpolicy_id (64 bytes): DELPOLICY/GETPOLICY body."""

    fields = (*_SELECTOR, ("index", "I"), ("dir", "B"), ("__pad_id", "3x"))


@dataclass(frozen=True, slots=True)
class Rule:
    """One outbound host policy of ours (or found in a dump)."""

    destination: Address
    action: int  # XFRM_POLICY_ALLOW / XFRM_POLICY_BLOCK
    priority: int
    proto: int = 0
    sport: int = 0  # for ICMP: the type
    dport: int = 0


def shunt_rules(destination: Address) -> list[Rule]:
    """The policies of one shunt, ALLOWs first (so IKE is never blocked in between)."""
    rules = [Rule(destination, XFRM_POLICY_ALLOW, ALLOW_PRIORITY, socket.IPPROTO_UDP, 0, port)
             for port in (500, 4500)]
    if destination.version == 6:
        rules += [Rule(destination, XFRM_POLICY_ALLOW, ALLOW_PRIORITY, socket.IPPROTO_ICMPV6,
                       icmp_type, 0) for icmp_type in (135, 136)]
    rules.append(Rule(destination, XFRM_POLICY_BLOCK, BLOCK_PRIORITY))
    return rules


def _selector(rule: Rule) -> dict[str, Any]:
    d = rule.destination
    return {
        "daddr": d.packed.ljust(16, b"\0"),
        "saddr": b"\0" * 16,
        "dport": rule.dport,
        "dport_mask": 0xFFFF if rule.dport else 0,
        "sport": rule.sport,
        "sport_mask": 0xFFFF if rule.sport else 0,
        "family": socket.AF_INET if d.version == 4 else socket.AF_INET6,
        "prefixlen_d": d.max_prefixlen,
        "prefixlen_s": 0,
        "proto": rule.proto,
        "ifindex": 0,
        "user": 0,
    }


def _rule_of(msg: Any) -> Rule | None:
    """The Rule of a dumped policy if it is one of ours, else None."""
    if msg.get("priority") not in OUR_PRIORITIES or msg.get("dir") != XFRM_POLICY_OUT:
        return None
    family, plen = msg.get("family"), msg.get("prefixlen_d")
    raw = msg.get("daddr")
    if family == socket.AF_INET and plen == 32:
        dest: Address = IPv4Address(raw[:4])
    elif family == socket.AF_INET6 and plen == 128:
        dest = IPv6Address(raw[:16])
    else:
        return None
    return Rule(dest, msg.get("action"), msg.get("priority"), msg.get("proto"),
                msg.get("sport") if msg.get("sport_mask") else 0,
                msg.get("dport") if msg.get("dport_mask") else 0)


class XfrmPolicies:
    """Blocking netlink access to XFRM policies of one network namespace. Thread-confined."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = NetlinkSocket(family=NETLINK_XFRM, netns=netns)
        self.sock.marshal.msg_map[XFRM_MSG_NEWPOLICY] = xfrm_userpolicy_info

    def close(self) -> None:
        self.sock.close()

    def add(self, rule: Rule) -> None:
        """Create or update (UPDPOLICY) one outbound policy."""
        msg = xfrm_userpolicy_info()
        msg.update(_selector(rule))
        for name, _ in _LIFETIME_CFG:
            msg[name] = XFRM_INF if name.endswith("limit") else 0
        for name, _ in _LIFETIME_CUR:
            msg[name] = 0
        msg.update({"priority": rule.priority, "index": 0, "dir": XFRM_POLICY_OUT,
                    "action": rule.action, "flags": 0, "share": 0})
        self._request(msg, XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK)

    def delete(self, rule: Rule) -> bool:
        """Delete one outbound policy by selector; False if there was none."""
        msg = xfrm_userpolicy_id()
        msg.update(_selector(rule))
        msg.update({"index": 0, "dir": XFRM_POLICY_OUT})
        try:
            self._request(msg, XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK)
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return False
            raise
        return True

    def dump(self) -> Iterator[Any]:
        """Every policy of the namespace, as parsed xfrm_userpolicy_info messages."""
        msg = xfrm_userpolicy_id()
        msg.update(_selector(Rule(IPv4Address(0), 0, 0)))
        msg.update({"index": 0, "dir": 0})
        for reply in self.sock.nlm_request(msg, XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP):
            if reply["header"]["type"] == XFRM_MSG_NEWPOLICY:
                yield reply

    def ours(self) -> list[Rule]:
        """Our policies (by priority and host selector)."""
        return [r for r in (_rule_of(m) for m in self.dump()) if r is not None]

    def flush_ours(self) -> int:
        """Delete all our policies; returns how many."""
        rules = self.ours()
        for r in rules:
            self.delete(r)
        return len(rules)

    def _request(self, msg: nlmsg, msg_type: int, flags: int) -> None:
        for _ in self.sock.nlm_request(msg, msg_type, flags):
            pass  # the ACK; errors are raised as NetlinkError by pyroute2


NLMSG_ERROR: Final = 2
SOL_NETLINK: Final = 270
NETLINK_CAP_ACK: Final = 10
_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_PORTS: Final = struct.Struct(">HHHH")  # dport, dport_mask, sport, sport_mask (network order)
_SEL_TAIL: Final = struct.Struct("=HBBB3xiI")  # family, prefixlen_d/s, proto, pad, ifindex, user
_LIFETIMES: Final = struct.Struct("=12Q")  # lifetime_cfg (8) + lifetime_cur (4)
_INFO_TAIL: Final = struct.Struct("=IIBBBB4x")  # priority, index, dir, action, flags, share
_ID_TAIL: Final = struct.Struct("=IB3x")  # index, dir
_NO_LIMITS: Final = _LIFETIMES.pack(*([XFRM_INF] * 4 + [0] * 8))


def _packed_selector(rule: Rule) -> bytes:
    d = rule.destination
    return (d.packed.ljust(16, b"\0") + b"\0" * 16
            + _PORTS.pack(rule.dport, 0xFFFF if rule.dport else 0,
                          rule.sport, 0xFFFF if rule.sport else 0)
            + _SEL_TAIL.pack(socket.AF_INET if d.version == 4 else socket.AF_INET6,
                             d.max_prefixlen, 0, rule.proto, 0, 0))


def encode_update(rule: Rule, seq: int) -> bytes:
    """XFRM_MSG_UPDPOLICY (create or replace) for one outbound rule, with nlmsghdr."""
    body = (_packed_selector(rule) + _NO_LIMITS
            + _INFO_TAIL.pack(rule.priority, 0, XFRM_POLICY_OUT, rule.action, 0, 0))
    return _NLMSGHDR.pack(16 + len(body), XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK,
                          seq, 0) + body


def encode_delete(rule: Rule, seq: int) -> bytes:
    """XFRM_MSG_DELPOLICY by selector for one outbound rule, with nlmsghdr."""
    body = _packed_selector(rule) + _ID_TAIL.pack(0, XFRM_POLICY_OUT)
    return _NLMSGHDR.pack(16 + len(body), XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK,
                          seq, 0) + body


class XfrmBatchSocket:
    """A plain NETLINK_XFRM socket that sends many requests at once. Thread-confined."""

    def __init__(self, netns: str | None = None) -> None:
        # flags=0: never create the namespace (pyroute2's default would).
        self.sock = pyroute2_netns.create_socket(netns=netns, family=socket.AF_NETLINK,
                                                 socket_type=socket.SOCK_DGRAM,
                                                 proto=NETLINK_XFRM, flags=0)
        self.sock.bind((0, 0))
        # ACKs without a copy of the request (NETLINK_CAP_ACK): 36 bytes each, not ~200.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.settimeout(5.0)  # the kernel answers at once; this only bounds a bug
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFF_FFFF or 1
        return self.seq

    def send(self, messages: list[bytes]) -> dict[int, int]:
        """Send `messages` (each with NLM_F_ACK), CHUNK per datagram; return seq -> errno.

        Chunked so that neither a datagram nor its ACKs overflow the socket buffers
        (measured: 1000 messages in one send got ENOBUFS).
        """
        result: dict[int, int] = {}
        for i in range(0, len(messages), self.CHUNK):
            result |= self._send_chunk(messages[i:i + self.CHUNK])
        return result

    CHUNK: Final = 100

    def _send_chunk(self, messages: list[bytes]) -> dict[int, int]:
        wanted = {_NLMSGHDR.unpack_from(m)[3] for m in messages}
        self.sock.send(b"".join(messages))
        result: dict[int, int] = {}
        while len(result) < len(wanted):
            data = self.sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if mtype == NLMSG_ERROR and seq in wanted:
                    (err,) = struct.unpack_from("=i", data, offset + 16)
                    result[seq] = -err
                offset += max(16, (length + 3) & ~3)
        return result


class XfrmBackend:
    """ProvisioningBackend for shunts. All netlink work on one thread (pyroute2's rule)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfrm")
        self._policies: XfrmPolicies | None = None
        self._batch_sock: XfrmBatchSocket | None = None
        # intents waiting for the next batch, and the task sending batches (one at a time)
        self._queue: list[tuple[Intent, asyncio.Future[None]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def apply(self, intent: Intent) -> None:
        """Raises ProvisioningError only."""
        if isinstance(intent, InstallTunnel | RemoveTunnel):
            raise ProvisioningError(f"{type(intent).__name__} is not an XFRM intent")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((intent, done))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_batches())
        await done

    async def _send_batches(self) -> None:
        """Send everything queued, one batch at a time, until the queue stays empty."""
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                errors = await self._run(self._apply_batch, [i for i, _ in batch])
            except ProvisioningError as exc:
                errors = [exc] * len(batch)
            except BaseException as exc:  # cancellation: nobody may wait forever
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(ProvisioningError(f"XFRM batch aborted: {exc!r}"))
                raise
            for (_, fut), err in zip(batch, errors, strict=True):
                if fut.done():
                    continue
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    async def installed(self) -> frozenset[PolicyKey]:
        """A destination counts as shunted when our BLOCK policy for it is there."""
        rules = await self._run(lambda: self._xfrm().ours())
        return frozenset(PolicyKey.shunt(r.destination) for r in rules
                         if r.action == XFRM_POLICY_BLOCK)

    async def flush(self) -> int:
        """Remove every policy of ours (tests, shutdown)."""
        return await self._run(lambda: self._xfrm().flush_ours())

    async def aclose(self) -> None:
        def close() -> None:
            if self._policies is not None:
                self._policies.close()
                self._policies = None
            if self._batch_sock is not None:
                self._batch_sock.close()
                self._batch_sock = None

        await self._run(close)
        self._thread.shutdown(wait=False)

    def _apply_batch(self, intents: list[Intent]) -> list[ProvisioningError | None]:
        """One send for all `intents`; the error of each (None: done). On the xfrm thread."""
        if self._batch_sock is None:
            self._batch_sock = XfrmBatchSocket(self.netns)
        sock = self._batch_sock
        messages: list[bytes] = []
        seqs: list[list[tuple[int, bool]]] = []  # per intent: (seq, ENOENT is fine)
        for intent in intents:
            mine: list[tuple[int, bool]] = []
            if isinstance(intent, InstallShunt):
                for rule in shunt_rules(intent.destination):  # ALLOWs first, BLOCK last
                    seq = sock.next_seq()
                    messages.append(encode_update(rule, seq))
                    mine.append((seq, False))
            elif isinstance(intent, RemoveShunt):
                for rule in reversed(shunt_rules(intent.destination)):  # BLOCK first
                    seq = sock.next_seq()
                    messages.append(encode_delete(rule, seq))
                    mine.append((seq, True))
            seqs.append(mine)
        try:
            acks = sock.send(messages) if messages else {}
        except OSError:
            self._batch_sock = None  # a new socket for the next batch
            sock.close()
            raise
        out: list[ProvisioningError | None] = []
        for intent, mine in zip(intents, seqs, strict=True):
            bad = [acks.get(seq, errno.EIO) for seq, enoent_ok in mine
                   if acks.get(seq, errno.EIO) not in ((0, errno.ENOENT) if enoent_ok else (0,))]
            out.append(None if not bad else ProvisioningError(
                f"XFRM netlink: {type(intent).__name__} {intent.destination}: "  # type: ignore[union-attr]
                f"{errno.errorcode.get(bad[0], bad[0])}"))
        return out

    def _xfrm(self) -> XfrmPolicies:
        if self._policies is None:
            self._policies = XfrmPolicies(self.netns)
        return self._policies

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, lambda: fn(*args))
        except NetlinkError as exc:
            raise ProvisioningError(f"XFRM netlink: {exc}") from None
        except OSError as exc:
            raise ProvisioningError(f"XFRM netlink socket: {exc}") from None

