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
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from resolver.errors import ProvisioningError
from resolver.provision import (
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


class XfrmBackend:
    """ProvisioningBackend for shunts. All netlink work on one thread (pyroute2's rule)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xfrm")
        self._policies: XfrmPolicies | None = None

    async def apply(self, intent: Intent) -> None:
        """Raises ProvisioningError only."""
        if isinstance(intent, InstallShunt):
            await self._run(self._install, intent.destination)
        elif isinstance(intent, RemoveShunt):
            await self._run(self._remove, intent.destination)
        elif isinstance(intent, InstallTunnel | RemoveTunnel):
            raise ProvisioningError(f"{type(intent).__name__} is not an XFRM intent")

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

        await self._run(close)
        self._thread.shutdown(wait=False)

    def _xfrm(self) -> XfrmPolicies:
        if self._policies is None:
            self._policies = XfrmPolicies(self.netns)
        return self._policies

    def _install(self, destination: Address) -> None:
        x = self._xfrm()
        for rule in shunt_rules(destination):
            x.add(rule)

    def _remove(self, destination: Address) -> None:
        x = self._xfrm()
        for rule in reversed(shunt_rules(destination)):  # BLOCK first, then the ALLOWs
            x.delete(rule)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, lambda: fn(*args))
        except NetlinkError as exc:
            raise ProvisioningError(f"XFRM netlink: {exc}") from None
        except OSError as exc:
            raise ProvisioningError(f"XFRM netlink socket: {exc}") from None

