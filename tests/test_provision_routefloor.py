"""resolver.tunnels.routefloor without the kernel: its rtnetlink messages against an oracle
(pyroute2's own rtmsg / fibmsg / ifinfmsg encoding), the decoding of what the kernel sends
back, and where our rule goes. The kernel's side is tests/integration/test_provision_xfrm.py."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from resolver.tunnels.routefloor import (
    FLOOR_TABLE,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_F_LOOKUP_TABLE,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTN_PROHIBIT,
    Path,
    RoutingRule,
    decode_floor_route,
    decode_link_kind,
    decode_route,
    decode_rule,
    encode_floor_route,
    encode_link_get,
    encode_route_dump,
    encode_route_get,
    encode_rule,
    encode_rule_dump,
    floor_rule,
)

NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE = 0x400, 0x200, 0x100
B4, B6 = IPv4Address("192.0.2.2"), IPv6Address("2001:db8::2")


def oracle(msg: Any, values: dict[str, Any], attrs: list[tuple[str, Any]], msg_type: int,
           flags: int, seq: int) -> bytes:
    msg.update(values)
    msg["attrs"] = attrs
    msg["header"].update({"type": msg_type, "flags": flags, "sequence_number": seq})
    msg.encode()
    return bytes(msg.data)


def route(family: int, **over: Any) -> dict[str, Any]:
    return {"family": family, "dst_len": 0, "src_len": 0, "tos": 0, "table": 0, "proto": 0,
            "scope": 0, "type": 0, "flags": 0} | over


def test_route_messages_match_the_oracle() -> None:
    for dest, fam in ((B4, socket.AF_INET), (B6, socket.AF_INET6)):
        plen = dest.max_prefixlen
        # IPv6 refuses RTM_F_LOOKUP_TABLE under strict checking (and names the table anyway)
        assert encode_route_get(dest, 5) == oracle(
            rtmsg(), route(fam, dst_len=plen,
                           flags=RTM_F_LOOKUP_TABLE if dest.version == 4 else 0),
            [("RTA_DST", str(dest))], RTM_GETROUTE, NLM_F_REQUEST, 5)
        assert encode_floor_route(dest, 6) == oracle(
            rtmsg(), route(fam, dst_len=plen, proto=4, type=RTN_PROHIBIT),
            [("RTA_DST", str(dest)), ("RTA_TABLE", FLOOR_TABLE)], RTM_NEWROUTE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, 6)
        assert encode_floor_route(dest, 7, delete=True) == oracle(
            rtmsg(), route(fam, dst_len=plen, scope=255, type=RTN_PROHIBIT),
            [("RTA_DST", str(dest)), ("RTA_TABLE", FLOOR_TABLE)], RTM_DELROUTE,
            NLM_F_REQUEST | NLM_F_ACK, 7)
        assert encode_route_dump(fam, 8) == oracle(
            rtmsg(), route(fam), [("RTA_TABLE", FLOOR_TABLE)], RTM_GETROUTE,
            NLM_F_REQUEST | NLM_F_DUMP, 8)


def test_rule_and_link_messages_match_the_oracle() -> None:
    ours = RoutingRule(socket.AF_INET6, 221, FLOOR_TABLE, 0x42, 0xFFFFFFFF, invert=True)
    head = {"family": socket.AF_INET6, "dst_len": 0, "src_len": 0, "tos": 0, "table": 0,
            "res1": 0, "res2": 0, "action": 1, "flags": 2}
    attrs = [("FRA_PRIORITY", 221), ("FRA_TABLE", FLOOR_TABLE), ("FRA_FWMARK", 0x42),
             ("FRA_FWMASK", 0xFFFFFFFF)]
    assert encode_rule(ours, 3) == oracle(fibmsg(), head, attrs, RTM_NEWRULE,
                                          NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
                                          3)
    assert encode_rule(ours, 4, delete=True) == oracle(fibmsg(), head, attrs, RTM_DELRULE,
                                                       NLM_F_REQUEST | NLM_F_ACK, 4)
    assert encode_rule_dump(socket.AF_INET, 5) == oracle(
        fibmsg(), dict.fromkeys(head, 0) | {"family": socket.AF_INET}, [], RTM_GETRULE,
        NLM_F_REQUEST | NLM_F_DUMP, 5)
    assert encode_link_get(7, 6) == oracle(
        ifinfmsg(), {"family": 0, "ifi_type": 0, "index": 7, "flags": 0, "change": 0}, [],
        RTM_GETLINK, NLM_F_REQUEST, 6)


def test_decoding_what_the_kernel_sends() -> None:
    # a route reply: charon's TUN route for B, found in table 220 through device 3
    reply = oracle(rtmsg(), route(socket.AF_INET, dst_len=32, table=220, proto=4, type=1),
                   [("RTA_TABLE", 220), ("RTA_DST", str(B4)), ("RTA_OIF", 3)], RTM_NEWROUTE,
                   0, 1)[16:]
    assert decode_route(reply) == (Path(220, 3), 1, 32, B4)
    assert decode_floor_route(reply) is None  # not our table
    ours = oracle(rtmsg(), route(socket.AF_INET6, dst_len=128, proto=4, type=RTN_PROHIBIT),
                  [("RTA_TABLE", FLOOR_TABLE), ("RTA_DST", str(B6))], RTM_NEWROUTE, 0, 1)[16:]
    assert decode_floor_route(ours) == B6
    wide = oracle(rtmsg(), route(socket.AF_INET6, dst_len=64, type=RTN_PROHIBIT),
                  [("RTA_TABLE", FLOOR_TABLE), ("RTA_DST", str(B6))], RTM_NEWROUTE, 0, 1)[16:]
    assert decode_floor_route(wide) is None  # not a host route: not one of ours
    assert decode_route(b"\x02\x20") is None  # truncated
    # rules: charon's (inverted mark), a plain one, and one that is not a lookup
    charon = oracle(fibmsg(), {"family": socket.AF_INET, "table": 220, "action": 1,
                               "flags": 2},
                    [("FRA_PRIORITY", 220), ("FRA_TABLE", 220), ("FRA_FWMARK", 0x42),
                     ("FRA_FWMASK", 0xFFFFFFFF)], RTM_NEWRULE, 0, 1)[16:]
    assert decode_rule(charon) == RoutingRule(socket.AF_INET, 220, 220, 0x42, 0xFFFFFFFF, True)
    main = oracle(fibmsg(), {"family": socket.AF_INET, "table": 254, "action": 1},
                  [("FRA_PRIORITY", 32766), ("FRA_TABLE", 254)], RTM_NEWRULE, 0, 1)[16:]
    assert decode_rule(main) == RoutingRule(socket.AF_INET, 32766, 254)
    blackhole = oracle(fibmsg(), {"family": socket.AF_INET, "action": 6},
                       [("FRA_PRIORITY", 5)], RTM_NEWRULE, 0, 1)[16:]
    assert decode_rule(blackhole) is None
    # a link's kind, from the nested IFLA_LINKINFO
    tun = oracle(ifinfmsg(), {"family": 0, "ifi_type": 65534, "index": 3, "flags": 0,
                              "change": 0},
                 [("IFLA_IFNAME", "ipsec0"), ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND",
                                                                           "tun")]})],
                 RTM_NEWLINK, 0, 1)[16:]
    assert decode_link_kind(tun) == "tun"
    plain = oracle(ifinfmsg(), {"family": 0, "ifi_type": 1, "index": 2, "flags": 0,
                                "change": 0}, [("IFLA_IFNAME", "eth0")], RTM_NEWLINK, 0, 1)[16:]
    assert decode_link_kind(plain) == ""


def test_our_rule_goes_right_after_charons_with_its_selector() -> None:
    charon = RoutingRule(socket.AF_INET, 220, 220, 0x42, 0xFFFFFFFF, invert=True)
    assert floor_rule(charon) == RoutingRule(socket.AF_INET, 221, FLOOR_TABLE, 0x42,
                                             0xFFFFFFFF, invert=True)
