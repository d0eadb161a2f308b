"""UPDATE messages and nsupdate scripts built from a plan: sections, TSIG, and equivalence."""

from __future__ import annotations

import base64
import ipaddress

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update

from autosp import plan as P
from autosp.nsupdate import plan_script, update_script
from autosp.updatemsg import build_update_message

NAME = dns.name.from_text("bob.example.test.")
ZONE = dns.name.from_text("example.test.")
KEY = dns.tsig.Key("ddns-key", base64.b64encode(b"k" * 32).decode(), "hmac-sha256")


def rd(rdtype: str, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), text)


OLD = rd("IPSECKEY", "10 0 4 . " + base64.b64encode(b"\x01" * 32).decode())
NEW = rd("IPSECKEY", "10 1 4 198.51.100.20 " + base64.b64encode(b"\x02" * 32).decode())
A1, A2 = rd("A", "198.51.100.11"), rd("A", "198.51.100.111")
AAAA1 = rd("AAAA", "2001:db8:100::11")

UPDATE = P.Update(
    zone=ZONE, name=NAME, ttl=300,
    prereqs={P.A: frozenset({A1}), P.AAAA: frozenset(), P.IPSECKEY: frozenset({OLD})},
    sets={P.A: frozenset({A2}), P.AAAA: frozenset({AAAA1}), P.IPSECKEY: frozenset({OLD, NEW})},
    purpose="rollover phase 1: new key beside the old one(s)")


def _rrs(section: list[dns.rrset.RRset]) -> set[tuple[str, int, int, int, frozenset[str]]]:
    """A section as wire semantics: (name, class on the wire, type, ttl, rdatas), merged."""
    merged: dict[tuple[str, int, int, int], set[str]] = {}
    for r in section:
        cls = r.deleting if r.deleting is not None else r.rdclass
        merged.setdefault((r.name.to_text(), cls, r.rdtype, r.ttl), set()).update(
            x.to_text() for x in r)
    return {(*k, frozenset(v)) for k, v in merged.items()}


IN, ANY, NONE = dns.rdataclass.IN, dns.rdataclass.ANY, dns.rdataclass.NONE
T = dns.rdatatype


def test_message_sections_follow_rfc2136() -> None:
    m = dns.message.from_wire(build_update_message(UPDATE, None).to_wire())
    assert isinstance(m, dns.update.UpdateMessage)
    zone_rr = m.zone[0]
    assert (zone_rr.name, zone_rr.rdtype, zone_rr.rdclass) == (ZONE, T.SOA, IN)
    n = NAME.to_text()
    assert _rrs(m.prerequisite) == {
        (n, IN, T.A, 0, frozenset({A1.to_text()})),  # RRset exists, value dependent (2.4.2)
        (n, NONE, T.AAAA, 0, frozenset()),  # RRset does not exist (2.4.3)
        (n, IN, T.IPSECKEY, 0, frozenset({OLD.to_text()})),
    }
    assert _rrs(m.update) == {
        (n, ANY, T.A, 0, frozenset()), (n, ANY, T.AAAA, 0, frozenset()),  # delete RRset (2.5.2)
        (n, ANY, T.IPSECKEY, 0, frozenset()),
        (n, IN, T.A, 300, frozenset({A2.to_text()})),  # add (2.5.1)
        (n, IN, T.AAAA, 300, frozenset({AAAA1.to_text()})),
        (n, IN, T.IPSECKEY, 300, frozenset({OLD.to_text(), NEW.to_text()})),
    }
    # Deletes come before the adds of the same type, or the adds would be deleted too.
    order = [(r.rdtype, r.deleting or r.rdclass) for r in m.update]
    for t in (T.A, T.AAAA, T.IPSECKEY):
        assert order.index((t, ANY)) < order.index((t, IN))


def test_message_is_tsig_signed_and_verifies() -> None:
    wire = build_update_message(UPDATE, KEY).to_wire()
    back = dns.message.from_wire(wire, keyring={KEY.name: KEY})
    assert back.had_tsig and back.keyname == KEY.name
    assert back.keyalgorithm == dns.tsig.HMAC_SHA256
    wrong = dns.tsig.Key("ddns-key", base64.b64encode(b"x" * 32).decode(), "hmac-sha256")
    try:
        dns.message.from_wire(wire, keyring={wrong.name: wrong})
    except dns.tsig.BadSignature:
        pass
    else:
        raise AssertionError("a message signed with KEY verified under another secret")


def parse_script(text: str) -> list[dns.update.UpdateMessage]:
    """Read an nsupdate script back the way nsupdate reads it (the commands we emit)."""
    out: list[dns.update.UpdateMessage] = []
    msg: dns.update.UpdateMessage | None = None
    zone = None
    for line in text.splitlines():
        if not line or line.startswith(";"):
            continue
        words = line.split()
        if words[0] == "server":
            continue
        if words[0] == "zone":
            zone = words[1]
            msg = dns.update.UpdateMessage(zone)
            continue
        assert msg is not None and zone is not None
        if words[0] == "send":
            out.append(msg)
            msg = None
        elif words[:2] == ["prereq", "nxrrset"]:
            assert words[3] == "IN"
            msg.absent(words[2], words[4])
        elif words[:2] == ["prereq", "yxrrset"]:
            assert words[3] == "IN"
            msg.present(words[2], rd(words[4], " ".join(words[5:])))
        elif words[:2] == ["update", "delete"]:
            assert words[3] == "IN" and len(words) == 5  # whole-RRset deletes only
            msg.delete(words[2], words[4])
        elif words[:2] == ["update", "add"]:
            assert words[4] == "IN"
            msg.add(words[2], int(words[3]), rd(words[5], " ".join(words[6:])))
        else:
            raise AssertionError(f"unexpected nsupdate line {line!r}")
    assert msg is None, "script does not end with send"
    return out


def test_script_parses_back_to_the_same_message() -> None:
    text = update_script(UPDATE, "198.51.100.4", 53)
    lines = text.splitlines()
    assert lines[:2] == ["server 198.51.100.4 53", "zone example.test."]
    assert lines[-1] == "send"
    (back,) = parse_script(text)
    ours = build_update_message(UPDATE, None)
    assert _rrs(back.prerequisite) == _rrs(ours.prerequisite)
    assert _rrs(back.update) == _rrs(ours.update)


def test_plan_script_stops_at_the_rollover_wait() -> None:
    cur = P.Current(NAME, {P.IPSECKEY: P.RRsetState(P.IPSECKEY, frozenset({OLD}), 60)})
    new = rd("IPSECKEY", "10 0 4 . " + base64.b64encode(b"\x03" * 32).decode())
    assert isinstance(new, P.Ipseckey)
    plan = P.build_plan(cur, P.Desired(NAME, ZONE, 300, None, new))
    assert len(plan.updates) == 2
    text = plan_script(plan, "198.51.100.4", 53)
    (only,) = parse_script(text)  # phase 2 is not in the script: it must not run at once
    assert "--finish-rollover" in text
    assert _rrs(only.update) == _rrs(build_update_message(plan.updates[0], None).update)


def test_nothing_to_do_script_has_no_send() -> None:
    cur = P.Current(NAME, {P.A: P.RRsetState(P.A, frozenset({A1}), 300)})
    plan = P.build_plan(cur, P.Desired(NAME, ZONE, 300,
                                       (ipaddress.ip_address("198.51.100.11"),), None))
    text = plan_script(plan, "198.51.100.4", 53)
    assert parse_script(text) == [] and "nothing to change" in text
