"""resolver.tunnels.xfrm without the kernel: struct sizes, encoding, and what counts as ours."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from resolver.tunnels.xfrm import (
    ALLOW_PRIORITY,
    BLOCK_PRIORITY,
    XFRM_POLICY_BLOCK,
    XFRM_POLICY_OUT,
    Rule,
    _rule_of,
    _selector,
    shunt_rules,
    xfrm_userpolicy_id,
    xfrm_userpolicy_info,
)


def encoded(msg_class: type, values: dict[str, object]) -> bytes:
    msg = msg_class()
    msg.update(values)
    msg["header"]["type"] = 0x13
    msg.encode()
    return bytes(msg.data[16:])  # body after the 16-byte nlmsghdr


def info_values(rule: Rule) -> dict[str, object]:
    values: dict[str, object] = dict(_selector(rule))
    for name, _ in xfrm_userpolicy_info.fields:
        if not name.startswith("__") and name not in values:
            values[name] = 0
    values.update({"priority": rule.priority, "dir": XFRM_POLICY_OUT, "action": rule.action})
    return values


def test_struct_sizes_match_linux_xfrm_h() -> None:
    rule = Rule(IPv4Address("192.0.2.2"), XFRM_POLICY_BLOCK, BLOCK_PRIORITY)
    assert len(encoded(xfrm_userpolicy_info, info_values(rule))) == 168
    ident = dict(_selector(rule)) | {"index": 0, "dir": XFRM_POLICY_OUT}
    assert len(encoded(xfrm_userpolicy_id, ident)) == 64


def test_selector_layout() -> None:
    rule = Rule(IPv4Address("192.0.2.2"), 0, ALLOW_PRIORITY, socket.IPPROTO_UDP, 0, 4500)
    body = encoded(xfrm_userpolicy_info, info_values(rule))
    assert body[0:4] == bytes([192, 0, 2, 2]) and body[4:16] == b"\0" * 12  # daddr
    assert struct.unpack_from(">HH", body, 32) == (4500, 0xFFFF)  # dport, big-endian
    assert struct.unpack_from("=HBBB", body, 40) == (socket.AF_INET, 32, 0, socket.IPPROTO_UDP)
    assert struct.unpack_from("=II", body, 152) == (ALLOW_PRIORITY, 0)  # priority, index
    assert body[160:162] == bytes([XFRM_POLICY_OUT, 0])  # dir, action allow


def test_shunt_rules() -> None:
    v4 = shunt_rules(IPv4Address("192.0.2.2"))
    assert [(r.proto, r.dport, r.action) for r in v4] == [
        (socket.IPPROTO_UDP, 500, 0), (socket.IPPROTO_UDP, 4500, 0), (0, 0, XFRM_POLICY_BLOCK)]
    v6 = shunt_rules(IPv6Address("2001:db8::2"))
    assert [(r.proto, r.sport) for r in v6 if r.proto == socket.IPPROTO_ICMPV6] == [
        (socket.IPPROTO_ICMPV6, 135), (socket.IPPROTO_ICMPV6, 136)]
    assert v6[-1].action == XFRM_POLICY_BLOCK  # BLOCK last: IKE is never blocked in between


def test_only_our_policies_count() -> None:
    rule = Rule(IPv6Address("2001:db8::2"), XFRM_POLICY_BLOCK, BLOCK_PRIORITY)
    msg = info_values(rule)
    assert _rule_of(msg) == rule
    assert _rule_of({**msg, "priority": 100}) is None  # someone else's
    assert _rule_of({**msg, "dir": 0}) is None  # inbound
    assert _rule_of({**msg, "prefixlen_d": 64}) is None  # not a host selector


def test_batch_encoding_matches_pyroute2() -> None:
    """The struct-packed messages of the batch path are byte for byte pyroute2's."""
    from resolver.tunnels.xfrm import (
        XFRM_INF,
        XFRM_MSG_DELPOLICY,
        XFRM_MSG_UPDPOLICY,
        encode_delete,
        encode_update,
    )

    for rule in [*shunt_rules(IPv4Address("192.0.2.2")), *shunt_rules(IPv6Address("2001:db8::2"))]:
        values = info_values(rule)
        values.update({n: XFRM_INF for n, _ in xfrm_userpolicy_info.fields if n.endswith("limit")})
        msg = xfrm_userpolicy_info()
        msg.update(values)
        msg["header"].update({"type": XFRM_MSG_UPDPOLICY, "flags": 5, "sequence_number": 7})
        msg.encode()
        assert encode_update(rule, 7) == bytes(msg.data)
        ident = xfrm_userpolicy_id()
        ident.update(dict(_selector(rule)) | {"index": 0, "dir": XFRM_POLICY_OUT})
        ident["header"].update({"type": XFRM_MSG_DELPOLICY, "flags": 5, "sequence_number": 9})
        ident.encode()
        assert encode_delete(rule, 9) == bytes(ident.data)
