"""Kernel drop shunts as XFRM policies over netlink, for InstallShunt / RemoveShunt, and the
floors under private tunnels, for InstallFloor / RemoveFloor.

Theory of operation. A shunt for destination D is a small set of XFRM policies, both ways:

    out  ALLOW  udp dport 500  -> D/32     priority ALLOW_PRIORITY  (IKE must still get through)
    out  ALLOW  udp dport 4500 -> D/32     priority ALLOW_PRIORITY  (IKE/NAT-T and ESP-in-UDP)
    out  ALLOW  icmpv6 type 135/136 -> D   priority ALLOW_PRIORITY  (IPv6: neighbour discovery)
    out  BLOCK  any -> D/32                priority BLOCK_PRIORITY  (everything else: EPERM)
    in   ALLOW  udp dport 500  <- D/32     priority ALLOW_PRIORITY  (the peer's IKE to us)
    in   ALLOW  udp dport 4500 <- D/32     priority ALLOW_PRIORITY  (its NAT-T IKE, ESP-in-UDP)
    in   ALLOW  icmpv6 type 135/136 <- D   priority ALLOW_PRIORITY  (IPv6: neighbour discovery)
    in   BLOCK  any <- D/32                priority BLOCK_PRIORITY  (cleartext from D: dropped)
    fwd  BLOCK  any <- D/32                priority BLOCK_PRIORITY  (nor forwarded, on a router)

The ALLOW entries exist because a BLOCK for D also catches the IKE daemon's own packets to and
from D (measured: with kernel-libipsec charon sets no per-socket bypass, and initiate then times
out); lower priority numbers win in XFRM. The applications' packets get EPERM on send/connect.
The inbound half is there so that an on-path attacker cannot inject cleartext that appears to
come from a private peer while its tunnel is not up (the kernel counts those drops as
XfrmInPolBlock in /proc/net/xfrm_stat). The in ALLOWs match our port (dport), whatever port a
NAT gave the peer. Once the tunnel is up the shunt is removed (the Provisioner never shunts a
destination with an INSTALLED tunnel), so decrypted traffic from D is never caught by it.

The floor under a private destination's tunnel (Rule 9 of resolver/provision.py) drops D's
packets the instant the tunnel's own path is gone, before the watch installs a shunt. It
follows the data path, read from the kernel's route to D once the tunnel is up (`_floor_plan`):
XFRM policies below charon's (`floor_rules`), or for IPv6 through a TUN device a prohibit route
(resolver/tunnels/routefloor.py).

Ownership: we only ever touch policies whose priority is one of OUR_PRIORITIES and whose
selector is a single host (destination out, source in/fwd), so dump/flush never disturb
charon's or anyone else's policies.

One encoder. pyroute2 0.9.7 has the NETLINK_XFRM socket but no XFRM message classes, and its
synchronous API runs a private event loop per request (measured ~0.6 ms per message, 3 ms to
install an IPv6 shunt, 4 ms to remove it, on the path of a first answer). So the messages of
<linux/xfrm.h> are packed and parsed here with `struct` (`encode_update`, `encode_delete`,
`encode_dump`, `decode_policy`: xfrm_selector 56 bytes, xfrm_userpolicy_info 168,
xfrm_userpolicy_id 64; checked byte for byte against pyroute2's generic nlmsg encoding in
tests/test_provision_xfrm.py, which keeps that encoding as its oracle), and sent on a plain
netlink socket (pyroute2 only opens it inside the namespace). Installs and removals send *all
pending intents in one send* (the kernel processes a multi-message datagram in order, so ALLOWs
still precede their BLOCK), then the ACKs are read back by sequence number. While one batch is
in the kernel the next intents queue, so 200 concurrent shunts cost a few round trips, not 1000.
A socket is used from one thread only: every netlink call runs on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final, TypeVar, TypeVarTuple

from resolver.errors import ProvisioningError
from resolver.tunnels import netlink
from resolver.tunnels.intents import (
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveFloor,
    RemoveShunt,
    RemoveTunnel,
)
from resolver.tunnels.netlink import (
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    open_socket,
)
from resolver.tunnels.netlink import NLMSGHDR as _NLMSGHDR
from resolver.tunnels.netlink import message as _message
from resolver.tunnels.netlink import messages as _messages
from resolver.tunnels.routefloor import RouteFloor

Address = IPv4Address | IPv6Address
T = TypeVar("T")
Args = TypeVarTuple("Args")

NETLINK_XFRM: Final = 6
XFRM_MSG_NEWPOLICY: Final = 0x13
XFRM_MSG_DELPOLICY: Final = 0x14
XFRM_MSG_GETPOLICY: Final = 0x15
XFRM_MSG_UPDPOLICY: Final = 0x19
XFRM_POLICY_IN: Final = 0
XFRM_POLICY_OUT: Final = 1
XFRM_POLICY_FWD: Final = 2
XFRM_POLICY_ALLOW: Final = 0
XFRM_POLICY_BLOCK: Final = 1
XFRM_INF: Final = 0xFFFF_FFFF_FFFF_FFFF

# Ours, by priority (lower wins). Above charon's IPsec policies (kernel-netlink uses large
# values), so while a shunt is in place nothing leaves for D but IKE.
ALLOW_PRIORITY: Final = 0x15C0
BLOCK_PRIORITY: Final = 0x15C1
# The floor under a tunnel (kernel ESP; see `floor_rules`): *below* every policy charon's
# kernel-netlink installs. strongSwan 5.9 computes its priorities from PRIO_BASE 200,000:
# passthrough < 200,000, IPsec and trap < 400,000, fallback drop < 600,000 (lower wins), so
# charon's policies for D always win over these, and ours only act when charon has none.
FLOOR_ALLOW_PRIORITY: Final = 0x000F_15C0  # 988,608
FLOOR_BLOCK_PRIORITY: Final = 0x000F_15C1
# The floor's selectors carry this in xfrm_selector.user (never matched against packets), so
# that they are policies of their own, not the shunt's: XFRM tells policies apart by selector,
# not by priority, and an update of one would otherwise replace the other.
FLOOR_TAG: Final = 0x15C0
OUR_PRIORITIES: Final = frozenset((ALLOW_PRIORITY, BLOCK_PRIORITY, FLOOR_ALLOW_PRIORITY,
                                   FLOOR_BLOCK_PRIORITY))


@dataclass(frozen=True, slots=True)
class Rule:
    """One host policy of ours (or found in a dump).

    `destination` is the shunted peer: the selector's destination address for an outbound
    rule, its source address for an inbound or forward rule (`direction`). Ports are those of
    the packet (`dport` is our port for an inbound rule).
    """

    destination: Address
    action: int  # XFRM_POLICY_ALLOW / XFRM_POLICY_BLOCK
    priority: int
    proto: int = 0
    sport: int = 0  # for ICMP: the type
    dport: int = 0
    direction: int = XFRM_POLICY_OUT
    tag: int = 0  # xfrm_selector.user: FLOOR_TAG for the floor's policies
    ifindex: int = 0  # only packets routed out through this device (0: any)


def shunt_rules(destination: Address, *, floor: bool = False) -> list[Rule]:
    """The policies of one shunt, ALLOWs first (so IKE is never blocked in between), each way;
    with `floor`, the same policies as the floor under a tunnel (`floor_rules`)."""
    allow, block, tag = ((FLOOR_ALLOW_PRIORITY, FLOOR_BLOCK_PRIORITY, FLOOR_TAG) if floor
                         else (ALLOW_PRIORITY, BLOCK_PRIORITY, 0))
    rules: list[Rule] = []
    for direction in (XFRM_POLICY_OUT, XFRM_POLICY_IN):
        rules += [Rule(destination, XFRM_POLICY_ALLOW, allow, socket.IPPROTO_UDP, 0,
                       port, direction, tag) for port in (500, 4500)]
        if destination.version == 6:
            rules += [Rule(destination, XFRM_POLICY_ALLOW, allow, socket.IPPROTO_ICMPV6,
                           icmp_type, 0, direction, tag) for icmp_type in (135, 136)]
    rules += [Rule(destination, XFRM_POLICY_BLOCK, block, direction=direction, tag=tag)
              for direction in (XFRM_POLICY_OUT, XFRM_POLICY_IN, XFRM_POLICY_FWD)]
    return rules


def floor_rules(destination: Address, tun_ifindex: int = 0) -> list[Rule]:
    """The floor under a private destination's tunnel, as XFRM policies at FLOOR_* priorities.

    Kernel ESP (`tun_ifindex` 0): the shunt's policies, both ways; charon's IPsec policies for
    D win while it holds them, and once it removes them D's packets fall onto the BLOCK (EPERM).
    Kernel-libipsec, IPv4 (`tun_ifindex`: charon's TUN device): outbound only, plus an ALLOW
    for the packets routed into the TUN (an IPv4 flow's output device is known at the policy
    lookup), so D's packets routed anywhere else (the TUN route gone with charon) are blocked.
    IPv6 flows carry no output device there: resolver/tunnels/routefloor.py."""
    if not tun_ifindex:
        return shunt_rules(destination, floor=True)
    return [Rule(destination, XFRM_POLICY_ALLOW, FLOOR_ALLOW_PRIORITY, tag=FLOOR_TAG,
                 ifindex=tun_ifindex),
            *(r for r in shunt_rules(destination, floor=True) if r.direction == XFRM_POLICY_OUT)]


_PORTS: Final = struct.Struct(">HHHH")  # dport, dport_mask, sport, sport_mask (network order)
_SEL_TAIL: Final = struct.Struct("=HBBB3xiI")  # family, prefixlen_d/s, proto, pad, ifindex, user
_SELECTOR_SIZE: Final = 32 + _PORTS.size + _SEL_TAIL.size  # struct xfrm_selector: 56
_LIFETIMES: Final = struct.Struct("=12Q")  # lifetime_cfg (8) + lifetime_cur (4)
_INFO_TAIL: Final = struct.Struct("=IIBBBB4x")  # priority, index, dir, action, flags, share
_INFO_SIZE: Final = _SELECTOR_SIZE + _LIFETIMES.size + _INFO_TAIL.size  # userpolicy_info: 168
_ID_TAIL: Final = struct.Struct("=IB3x")  # index, dir (struct xfrm_userpolicy_id: 64)
_NO_LIMITS: Final = _LIFETIMES.pack(*([XFRM_INF] * 4 + [0] * 8))


def _packed_selector(rule: Rule) -> bytes:
    d = rule.destination
    host, full = d.packed.ljust(16, b"\0"), int(d.max_prefixlen)
    plen_d: int
    plen_s: int
    if rule.direction == XFRM_POLICY_OUT:
        addrs, plen_d, plen_s = host + b"\0" * 16, full, 0  # daddr D
    else:
        addrs, plen_d, plen_s = b"\0" * 16 + host, 0, full  # saddr D
    return (addrs
            + _PORTS.pack(rule.dport, 0xFFFF if rule.dport else 0,
                          rule.sport, 0xFFFF if rule.sport else 0)
            + _SEL_TAIL.pack(socket.AF_INET if d.version == 4 else socket.AF_INET6,
                             plen_d, plen_s, rule.proto, rule.ifindex, rule.tag))


def encode_update(rule: Rule, seq: int) -> bytes:
    """XFRM_MSG_UPDPOLICY (create or replace) for one rule, with nlmsghdr."""
    body = (_packed_selector(rule) + _NO_LIMITS
            + _INFO_TAIL.pack(rule.priority, 0, rule.direction, rule.action, 0, 0))
    return _message(XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def encode_delete(rule: Rule, seq: int) -> bytes:
    """XFRM_MSG_DELPOLICY by selector and direction for one rule, with nlmsghdr."""
    body = _packed_selector(rule) + _ID_TAIL.pack(0, rule.direction)
    return _message(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def encode_dump(seq: int) -> bytes:
    """XFRM_MSG_GETPOLICY dump of every policy (the kernel ignores the id in a dump)."""
    body = b"\0" * _SELECTOR_SIZE + _ID_TAIL.pack(0, 0)
    return _message(XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


def decode_policy(body: bytes) -> Rule | None:
    """The Rule of a dumped policy (an xfrm_userpolicy_info) if it is one of ours, else None."""
    if len(body) < _INFO_SIZE:
        return None
    dport, dport_mask, sport, sport_mask = _PORTS.unpack_from(body, 32)
    family, plen_d, plen_s, proto, ifindex, tag = _SEL_TAIL.unpack_from(body,
                                                                         32 + _PORTS.size)
    priority, _, direction, action, _, _ = _INFO_TAIL.unpack_from(
        body, _SELECTOR_SIZE + _LIFETIMES.size)
    if priority not in OUR_PRIORITIES:
        return None
    if direction == XFRM_POLICY_OUT:
        host, other, offset = plen_d, plen_s, 0  # D is the destination
    elif direction in (XFRM_POLICY_IN, XFRM_POLICY_FWD):
        host, other, offset = plen_s, plen_d, 16  # D is the source
    else:
        return None
    if other != 0:
        return None
    if family == socket.AF_INET and host == 32:
        dest: Address = IPv4Address(body[offset:offset + 4])
    elif family == socket.AF_INET6 and host == 128:
        dest = IPv6Address(body[offset:offset + 16])
    else:
        return None
    return Rule(dest, action, priority, proto, sport if sport_mask else 0,
                dport if dport_mask else 0, direction, tag, ifindex)


class XfrmPolicies:
    """The XFRM policies of one network namespace, over a plain NETLINK_XFRM socket.

    Thread-confined (use it from one thread). Raises OSError (the caller translates it).
    """

    CHUNK: Final = 100

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.sock = open_socket(netns, NETLINK_XFRM)
        self.seq = 0
        # Our floor policies by destination, as the last dump found them and every ACK of
        # ours since (None: no dump yet on this socket). Only we install FLOOR_TAG policies,
        # so a batch finds a destination's stale ones here: a dump per batch cost O(all
        # policies) each (measured: 10,000 floored tunnels, a new one took 0.45 s and the
        # start-up reconcile 37 s, most of it parsing dumps).
        self._floors: dict[Address, set[Rule]] | None = None

    @functools.cached_property
    def routes(self) -> RouteFloor:
        """The route floors of the same namespace (opened on first use, on this thread)."""
        return RouteFloor(self.netns)

    def close(self) -> None:
        self.sock.close()
        if "routes" in self.__dict__:
            self.routes.close()

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

    def ours(self) -> list[Rule]:
        """Our policies (by priority and host selector), from a dump."""
        seq = self.next_seq()
        replies = netlink.dump(self.sock, encode_dump(seq), seq, "XFRM policy")
        found = [rule for mtype, body in replies
                 if mtype == XFRM_MSG_NEWPOLICY and (rule := decode_policy(body)) is not None]
        self._floors = {}
        for mine in found:
            if mine.tag == FLOOR_TAG:
                self._floors.setdefault(mine.destination, set()).add(mine)
        return found

    def floors_of(self, dest: Address) -> set[Rule]:
        """Our floor policies for `dest` (from the last dump and our ACKs since)."""
        if self._floors is None:
            self.ours()
        assert self._floors is not None
        return set(self._floors.get(dest, ()))

    def noted(self, rule: Rule, present: bool) -> None:
        """The kernel ACKed our change of `rule`: keep the floor index in step."""
        if rule.tag != FLOOR_TAG or self._floors is None:
            return
        if present:
            self._floors.setdefault(rule.destination, set()).add(rule)
        else:
            self._floors.get(rule.destination, set()).discard(rule)

    def flush_ours(self) -> int:
        """Delete all our policies; returns how many there were."""
        rules = self.ours()
        acks = self.send([encode_delete(r, self.next_seq()) for r in rules])
        failed = [e for e in acks.values() if e not in (0, errno.ENOENT)]
        if failed:
            raise OSError(failed[0], f"XFRM policy flush: {os.strerror(failed[0])}")
        return len(rules)

    def _send_chunk(self, messages: list[bytes]) -> dict[int, int]:
        wanted = {_NLMSGHDR.unpack_from(m)[3] for m in messages}
        self.sock.send(b"".join(messages))
        result: dict[int, int] = {}
        while len(result) < len(wanted):
            for mtype, seq, body in _messages(self.sock.recv(1 << 16)):
                if mtype == NLMSG_ERROR and seq in wanted:
                    (err,) = struct.unpack_from("=i", body)
                    result[seq] = -err
        return result


class XfrmBackend:
    """ProvisioningBackend for shunts and floors. All netlink work on one thread, on one
    socket per protocol (XFRM, and routes for the floors)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfrm")
        self._sock: XfrmPolicies | None = None  # opened, and used, on the thread only
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
                errors = await self._run(_apply_batch, [i for i, _ in batch])
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
        """A destination counts as shunted when one of our BLOCK policies for it is there
        (any direction: a half-removed shunt is still ours to remove), and as floored when its
        floor (route or BLOCK) is."""
        return await self._run(_installed)

    async def flush(self) -> int:
        """Remove every policy and floor of ours (tests); returns how many there were."""
        return await self._run(_flush)

    async def aclose(self) -> None:
        def close() -> None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

        await asyncio.get_running_loop().run_in_executor(self._thread, close)
        self._thread.shutdown(wait=False)

    async def _run(self, fn: Callable[[XfrmPolicies, *Args], T], *args: *Args) -> T:
        """`fn(socket, *args)` on the xfrm thread; OSError becomes ProvisioningError here."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._with_socket, fn, *args)
        except OSError as exc:
            raise ProvisioningError(f"XFRM netlink: {exc}") from None

    def _with_socket(self, fn: Callable[[XfrmPolicies, *Args], T], *args: *Args) -> T:
        if self._sock is None:
            self._sock = XfrmPolicies(self.netns)
        try:
            return fn(self._sock, *args)
        except OSError:
            self._sock.close()  # unread replies may be queued on it: the next call opens anew
            self._sock = None
            raise


def _installed(sock: XfrmPolicies) -> frozenset[PolicyKey]:
    keys = {PolicyKey.shunt(r.destination) if r.priority == BLOCK_PRIORITY
            else PolicyKey.floor(r.destination)
            for r in sock.ours() if r.action == XFRM_POLICY_BLOCK}
    return frozenset(keys | {PolicyKey.floor(d) for d in sock.routes.ours()})


def _flush(sock: XfrmPolicies) -> int:
    return sock.flush_ours() + sock.routes.flush()


@dataclass(slots=True)
class _FloorPlan:
    """What the floor intents of a batch come to (`_floor_plan`)."""

    errors: dict[Address, str] = field(default_factory=dict)  # why a floor failed
    put: dict[Address, list[Rule]] = field(default_factory=dict)  # XFRM rules to put in
    stale: dict[Address, list[Rule]] = field(default_factory=dict)  # ours to take out after


def _floor_plan(sock: XfrmPolicies, intents: list[Intent]) -> _FloorPlan:
    """Do the route part of a batch's floor intents and plan the XFRM part. Each destination
    ends as its last floor intent in the batch says; its floor follows the tunnel's path (the
    route to it, read now): no TUN device (kernel ESP) -> `floor_rules(D)`; TUN, IPv4 ->
    `floor_rules(D, TUN)`; TUN, IPv6 -> a route floor. XFRM floor policies of ours for D that
    the new floor does not have (another TUN device since charon restarted, another data path,
    the floor removed) are stale. A failure here fails only floors, never a shunt."""
    final = {i.destination: isinstance(i, InstallFloor) for i in intents
             if isinstance(i, InstallFloor | RemoveFloor)}
    plan = _FloorPlan()
    if not final:
        return plan
    try:
        gone = [d for d, wanted in final.items() if not wanted]
        for dest, err in (sock.routes.remove(gone) if gone else {}).items():
            if err:
                plan.errors[dest] = f"floor route removal: {os.strerror(err)}"
        by_route: dict[Address, int] = {}
        for dest, path in sock.routes.paths(d for d, wanted in final.items() if wanted).items():
            if isinstance(path, int):
                plan.errors[dest] = f"no route to it to put a floor under ({os.strerror(path)})"
            elif path.tun and dest.version == 6:
                by_route[dest] = path.table
            else:
                plan.put[dest] = floor_rules(dest, path.oif if path.tun else 0)
        plan.errors |= {d: why for d, why in sock.routes.install(by_route).items() if why}
    except OSError as exc:
        routes = sock.__dict__.pop("routes", None)  # unread replies may be queued on it:
        if routes is not None:  # the next use opens anew
            routes.close()
        plan.errors |= {d: f"routes: {exc}" for d in final if d not in plan.errors}
    try:
        for dest in final:
            for rule in sock.floors_of(dest):
                if rule not in plan.put.get(dest, ()):
                    plan.stale.setdefault(dest, []).append(rule)
    except OSError as exc:
        plan.errors |= {d: f"XFRM policy dump: {exc}" for d in final if d not in plan.errors}
    for rules in plan.stale.values():
        rules.sort(key=lambda r: r.action != XFRM_POLICY_BLOCK)  # BLOCKs out first
    return plan


def _apply_batch(sock: XfrmPolicies, intents: list[Intent]) -> list[ProvisioningError | None]:
    """One send for all `intents`' policies (the floors' routes first: `_floor_plan`); the
    error of each (None: done). On the xfrm thread."""
    plan = _floor_plan(sock, intents)
    changes: list[tuple[int, Rule, bool]] = []  # seq, rule, removed: for the floor index
    messages: list[bytes] = []
    seqs: list[list[tuple[int, bool]]] = []  # per intent: (seq, ENOENT is fine)
    for intent in intents:
        put: list[Rule] = []
        drop: list[Rule] = []
        if isinstance(intent, InstallShunt):
            put = shunt_rules(intent.destination)  # ALLOWs first: IKE is never blocked
        elif isinstance(intent, RemoveShunt):
            drop = shunt_rules(intent.destination)[::-1]  # BLOCKs first
        elif isinstance(intent, InstallFloor | RemoveFloor):
            if isinstance(intent, InstallFloor):
                put = plan.put.get(intent.destination, [])
            drop = plan.stale.pop(intent.destination, [])
        mine: list[tuple[int, bool]] = []
        for rule, remove in [(r, False) for r in put] + [(r, True) for r in drop]:
            seq = sock.next_seq()
            messages.append(encode_delete(rule, seq) if remove else encode_update(rule, seq))
            mine.append((seq, remove))
            changes.append((seq, rule, remove))
        seqs.append(mine)
    acks = sock.send(messages) if messages else {}
    for seq, rule, remove in changes:
        if acks.get(seq) == 0 or (remove and acks.get(seq) == errno.ENOENT):
            sock.noted(rule, not remove)
    out: list[ProvisioningError | None] = []
    for intent, mine in zip(intents, seqs, strict=True):
        dest = intent.destination  # type: ignore[union-attr]
        bad = [acks.get(seq, errno.EIO) for seq, enoent_ok in mine
               if acks.get(seq, errno.EIO) not in ((0, errno.ENOENT) if enoent_ok else (0,))]
        why = (plan.errors.get(dest) if isinstance(intent, InstallFloor | RemoveFloor)
               else None)
        if bad:
            why = f"{errno.errorcode.get(bad[0], bad[0])}"
        out.append(None if why is None else ProvisioningError(
            f"XFRM netlink: {type(intent).__name__} {dest}: {why}"))
    return out
