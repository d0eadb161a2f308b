"""resolver.tunnels.xfrm without the kernel: the struct encoder and decoder against an oracle
(pyroute2's generic netlink encoding of the <linux/xfrm.h> structures, declared here and only
here), the C layout, and what counts as ours."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg

from resolver.tunnels.xfrm import (
    ALLOW_PRIORITY,
    BLOCK_PRIORITY,
    XFRM_INF,
    XFRM_MSG_DELPOLICY,
    XFRM_MSG_GETPOLICY,
    XFRM_MSG_NEWPOLICY,
    XFRM_MSG_UPDPOLICY,
    XFRM_POLICY_BLOCK,
    XFRM_POLICY_FWD,
    XFRM_POLICY_IN,
    XFRM_POLICY_OUT,
    Rule,
    decode_policy,
    encode_delete,
    encode_dump,
    encode_update,
    shunt_rules,
)

# --- the oracle: <linux/xfrm.h> as pyroute2 nlmsg classes (flat, C padding spelled out) -------

SELECTOR = (
    ("daddr", "16s"), ("saddr", "16s"),
    ("dport", ">H"), ("dport_mask", ">H"), ("sport", ">H"), ("sport_mask", ">H"),
    ("family", "H"), ("prefixlen_d", "B"), ("prefixlen_s", "B"), ("proto", "B"),
    ("__pad_sel", "3x"), ("ifindex", "i"), ("user", "I"),
)  # struct xfrm_selector
LIFETIME_CFG = tuple((n, "Q") for n in (
    "soft_byte_limit", "hard_byte_limit", "soft_packet_limit", "hard_packet_limit",
    "soft_add_expires_seconds", "hard_add_expires_seconds",
    "soft_use_expires_seconds", "hard_use_expires_seconds"))
LIFETIME_CUR = tuple((n, "Q") for n in ("bytes", "packets", "add_time", "use_time"))


class xfrm_userpolicy_info(nlmsg):  # type: ignore[misc]
    fields = (*SELECTOR, *LIFETIME_CFG, *LIFETIME_CUR, ("priority", "I"), ("index", "I"),
              ("dir", "B"), ("action", "B"), ("flags", "B"), ("share", "B"),
              ("__pad_info", "4x"))


class xfrm_userpolicy_id(nlmsg):  # type: ignore[misc]
    fields = (*SELECTOR, ("index", "I"), ("dir", "B"), ("__pad_id", "3x"))


def selector(rule: Rule) -> dict[str, Any]:
    d = rule.destination
    host, none = d.packed.ljust(16, b"\0"), b"\0" * 16
    out = rule.direction == XFRM_POLICY_OUT  # out: D is the destination; in/fwd: the source
    return {"daddr": host if out else none, "saddr": none if out else host,
            "dport": rule.dport, "dport_mask": 0xFFFF if rule.dport else 0,
            "sport": rule.sport, "sport_mask": 0xFFFF if rule.sport else 0,
            "family": socket.AF_INET if d.version == 4 else socket.AF_INET6,
            "prefixlen_d": d.max_prefixlen if out else 0,
            "prefixlen_s": 0 if out else d.max_prefixlen, "proto": rule.proto,
            "ifindex": 0, "user": 0}


def oracle(msg_class: type, values: dict[str, Any], msg_type: int, flags: int, seq: int
           ) -> bytes:
    msg = msg_class()
    msg.update(values)
    msg["header"].update({"type": msg_type, "flags": flags, "sequence_number": seq})
    msg.encode()
    return bytes(msg.data)


def info(rule: Rule, **over: Any) -> dict[str, Any]:
    values = selector(rule) | {n: XFRM_INF if n.endswith("limit") else 0
                               for n, _ in (*LIFETIME_CFG, *LIFETIME_CUR)}
    return values | {"priority": rule.priority, "index": 0, "dir": rule.direction,
                     "action": rule.action, "flags": 0, "share": 0} | over


def dumped(rule: Rule, **over: Any) -> bytes:
    """The body of a NEWPOLICY dump entry for `rule`, as the oracle encodes it."""
    return oracle(xfrm_userpolicy_info, info(rule, **over), XFRM_MSG_NEWPOLICY, 2, 1)[16:]


RULES = [*shunt_rules(IPv4Address("192.0.2.2")), *shunt_rules(IPv6Address("2001:db8::2"))]


# --- the tests ---------------------------------------------------------------------------------


def test_encoding_matches_the_oracle_byte_for_byte() -> None:
    for rule in RULES:
        assert encode_update(rule, 7) == oracle(xfrm_userpolicy_info, info(rule),
                                                XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK, 7)
        ident = selector(rule) | {"index": 0, "dir": rule.direction}
        assert encode_delete(rule, 9) == oracle(xfrm_userpolicy_id, ident, XFRM_MSG_DELPOLICY,
                                                NLM_F_REQUEST | NLM_F_ACK, 9)
    zero = dict.fromkeys((n for n, f in SELECTOR if not n.startswith("__")), 0) | {
        "daddr": b"\0" * 16, "saddr": b"\0" * 16, "index": 0, "dir": 0}
    assert encode_dump(3) == oracle(xfrm_userpolicy_id, zero, XFRM_MSG_GETPOLICY,
                                    NLM_F_REQUEST | NLM_F_DUMP, 3)


def test_struct_sizes_and_layout_match_linux_xfrm_h() -> None:
    rule = Rule(IPv4Address("192.0.2.2"), 0, ALLOW_PRIORITY, socket.IPPROTO_UDP, 0, 4500)
    body = encode_update(rule, 1)[16:]
    assert len(body) == 168 and len(encode_delete(rule, 1)) - 16 == 64
    assert body[0:4] == bytes([192, 0, 2, 2]) and body[4:16] == b"\0" * 12  # daddr
    assert struct.unpack_from(">HH", body, 32) == (4500, 0xFFFF)  # dport, big-endian
    assert struct.unpack_from("=HBBB", body, 40) == (socket.AF_INET, 32, 0, socket.IPPROTO_UDP)
    assert struct.unpack_from("=II", body, 152) == (ALLOW_PRIORITY, 0)  # priority, index
    assert body[160:162] == bytes([XFRM_POLICY_OUT, 0])  # dir, action allow
    inbound = encode_update(Rule(IPv4Address("192.0.2.2"), XFRM_POLICY_BLOCK, BLOCK_PRIORITY,
                                 direction=XFRM_POLICY_IN), 1)[16:]
    assert inbound[0:16] == b"\0" * 16 and inbound[16:20] == bytes([192, 0, 2, 2])  # saddr
    assert struct.unpack_from("=HBB", inbound, 40) == (socket.AF_INET, 0, 32)  # prefixlen_s
    assert inbound[160:162] == bytes([XFRM_POLICY_IN, XFRM_POLICY_BLOCK])


def test_decoding_the_oracles_dump_entries() -> None:
    for rule in RULES:
        assert decode_policy(dumped(rule)) == rule
        assert decode_policy(dumped(rule) + b"\x08\x00\x10\x00attr") == rule  # attributes
        assert decode_policy(encode_update(rule, 1)[16:]) == rule


def test_only_our_policies_count() -> None:
    rule = Rule(IPv6Address("2001:db8::2"), XFRM_POLICY_BLOCK, BLOCK_PRIORITY)
    assert decode_policy(dumped(rule)) == rule
    assert decode_policy(dumped(rule, priority=100)) is None  # someone else's
    # an inbound policy whose host is the destination (traffic *to* D arriving): not ours
    assert decode_policy(dumped(rule, dir=XFRM_POLICY_IN)) is None
    assert decode_policy(dumped(rule, prefixlen_d=64)) is None  # not a host selector
    assert decode_policy(dumped(rule, prefixlen_s=24)) is None  # D/128 from 2001:db8::/24
    assert decode_policy(dumped(rule)[:100]) is None  # truncated
    inbound = Rule(rule.destination, XFRM_POLICY_BLOCK, BLOCK_PRIORITY, direction=XFRM_POLICY_IN)
    assert decode_policy(dumped(inbound)) == inbound
    assert decode_policy(dumped(inbound, prefixlen_d=64)) is None  # only from D, to anywhere
    assert decode_policy(dumped(inbound, dir=3)) is None  # not a direction we use


def test_shunt_rules() -> None:
    udp, out, inb, fwd = socket.IPPROTO_UDP, XFRM_POLICY_OUT, XFRM_POLICY_IN, XFRM_POLICY_FWD
    v4 = shunt_rules(IPv4Address("192.0.2.2"))
    assert [(r.direction, r.proto, r.dport, r.action) for r in v4] == [
        (out, udp, 500, 0), (out, udp, 4500, 0), (inb, udp, 500, 0), (inb, udp, 4500, 0),
        (out, 0, 0, XFRM_POLICY_BLOCK), (inb, 0, 0, XFRM_POLICY_BLOCK),
        (fwd, 0, 0, XFRM_POLICY_BLOCK)]
    v6 = shunt_rules(IPv6Address("2001:db8::2"))
    assert [(r.direction, r.sport) for r in v6 if r.proto == socket.IPPROTO_ICMPV6] == [
        (out, 135), (out, 136), (inb, 135), (inb, 136)]
    # BLOCKs last: IKE is never blocked in between, in either direction
    assert {r.action for r in v6[-3:]} == {XFRM_POLICY_BLOCK}
    assert {r.action for r in v6[:-3]} == {0}
