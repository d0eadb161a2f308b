"""autosp.plan: what publish changes, as a table of (records read, wanted) -> steps."""

from __future__ import annotations

import base64
import ipaddress

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from autosp import plan as P
from autosp.errors import OperationFailed

NAME = dns.name.from_text("bob.example.test.")
ZONE = dns.name.from_text("example.test.")


def ipk(fill: int, precedence: int = 10, gateway: str = ".") -> P.Ipseckey:
    gtype = 0 if gateway == "." else 1
    key = base64.b64encode(bytes([fill]) * 32).decode()
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY,
                             f"{precedence} {gtype} 4 {gateway} {key}")
    assert isinstance(rd, P.Ipseckey)
    return rd


def a(text: str) -> dns.rdata.Rdata:
    rdtype = dns.rdatatype.AAAA if ":" in text else dns.rdatatype.A
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, text)


OLD, NEW = ipk(1), ipk(2)
V4, V4B, V6 = "198.51.100.11", "198.51.100.111", "2001:db8:100::11"


def current(ttl: int = 300, **sets: list[dns.rdata.Rdata]) -> P.Current:
    types = {"a": P.A, "aaaa": P.AAAA, "ipseckey": P.IPSECKEY}
    return P.Current(NAME, {types[k]: P.RRsetState(types[k], frozenset(v), ttl)
                            for k, v in sets.items() if v})


def desired(addrs: list[str] | None, key: P.Ipseckey | None, ttl: int = 300) -> P.Desired:
    return P.Desired(NAME, ZONE, ttl,
                     None if addrs is None else tuple(ipaddress.ip_address(x) for x in addrs),
                     key)


def fs(*rds: dns.rdata.Rdata) -> frozenset[dns.rdata.Rdata]:
    return frozenset(rds)


def test_first_publication_prereqs_say_nothing_is_there() -> None:
    p = P.build_plan(current(), desired([V4, V6], NEW))
    (u,) = p.steps
    assert isinstance(u, P.Update)
    assert u.prereqs == {P.A: fs(), P.AAAA: fs(), P.IPSECKEY: fs()}
    assert u.sets == {P.A: fs(a(V4)), P.AAAA: fs(a(V6)), P.IPSECKEY: fs(NEW)}
    assert u.ttl == 300 and u.zone == ZONE and u.name == NAME
    assert p.final == u.sets and p.finish_after is None


def test_nothing_changed_sends_nothing() -> None:
    p = P.build_plan(current(a=[a(V4)], aaaa=[a(V6)], ipseckey=[NEW]), desired([V4, V6], NEW))
    assert p.steps == ()
    assert "nothing to change" in p.notes[0]


def test_address_move_keeps_key_and_states_everything_read() -> None:
    p = P.build_plan(current(a=[a(V4)], aaaa=[a(V6)], ipseckey=[NEW]), desired([V4B, V6], NEW))
    (u,) = p.updates
    assert u.sets == {P.A: fs(a(V4B))}  # only what changed is rewritten...
    # ...but the update applies only to exactly the state it was planned from.
    assert u.prereqs == {P.A: fs(a(V4)), P.AAAA: fs(a(V6)), P.IPSECKEY: fs(NEW)}


def test_family_gone_deletes_its_rrset() -> None:
    p = P.build_plan(current(a=[a(V4)], aaaa=[a(V6)]), desired([V4], None))
    (u,) = p.updates
    assert u.sets == {P.AAAA: fs()}
    assert P.IPSECKEY not in u.prereqs  # IPSECKEY not managed without --key


def test_key_only_leaves_addresses_alone() -> None:
    p = P.build_plan(current(a=[a(V4)]), desired(None, NEW))
    (u,) = p.updates
    assert u.prereqs == {P.IPSECKEY: fs()}
    assert u.sets == {P.IPSECKEY: fs(NEW)}


def test_key_change_is_make_before_break_with_a_wait() -> None:
    p = P.build_plan(current(ttl=60, a=[a(V4)], ipseckey=[OLD]), desired([V4], NEW, ttl=60))
    first, wait, second = p.steps
    assert isinstance(first, P.Update) and isinstance(wait, P.Wait)
    assert isinstance(second, P.Update)
    assert first.prereqs[P.IPSECKEY] == fs(OLD)
    assert first.sets == {P.IPSECKEY: fs(OLD, NEW)}  # both keys published first
    assert wait.seconds == 60 + P.ROLLOVER_MARGIN  # the OLD set's TTL, not the new one
    assert second.prereqs[P.IPSECKEY] == fs(OLD, NEW)  # nobody changed it while we waited
    assert second.sets == {P.IPSECKEY: fs(NEW)}
    assert p.final[P.IPSECKEY] == fs(NEW)
    assert "phase 1" in first.purpose and "phase 2" in second.purpose


def test_key_change_without_wait_stops_after_phase_one() -> None:
    p = P.build_plan(current(ttl=120, ipseckey=[OLD]), desired(None, NEW, ttl=120), wait=False)
    (u,) = p.steps
    assert isinstance(u, P.Update)
    assert u.sets == {P.IPSECKEY: fs(OLD, NEW)}
    assert p.final == {P.IPSECKEY: fs(OLD, NEW)}
    assert p.finish_after == 120 + P.ROLLOVER_MARGIN
    assert u.purpose == P.PHASE1
    assert any("--finish-rollover" in n for n in p.notes)


def test_half_done_rollover_waits_the_full_ttl_again() -> None:
    p = P.build_plan(current(ttl=30, ipseckey=[OLD, NEW]), desired(None, NEW, ttl=30))
    wait, second = p.steps
    assert isinstance(wait, P.Wait) and wait.seconds == 30 + P.ROLLOVER_MARGIN
    assert isinstance(second, P.Update) and second.sets == {P.IPSECKEY: fs(NEW)}


def test_same_key_other_precedence_is_replaced_at_once() -> None:
    p = P.build_plan(current(ipseckey=[ipk(2, precedence=20)]), desired(None, NEW))
    (u,) = p.steps
    assert isinstance(u, P.Update) and u.sets == {P.IPSECKEY: fs(NEW)}


def test_finish_rollover_removes_the_others() -> None:
    p = P.build_plan(current(ipseckey=[OLD, NEW, ipk(3)]), desired(None, NEW),
                     P.Mode.FINISH_ROLLOVER)
    (u,) = p.steps
    assert isinstance(u, P.Update)
    assert u.prereqs == {P.IPSECKEY: fs(OLD, NEW, ipk(3))}
    assert u.sets == {P.IPSECKEY: fs(NEW)}


def test_finish_rollover_without_our_key_fails() -> None:
    with pytest.raises(OperationFailed, match="our key is not published"):
        P.build_plan(current(ipseckey=[OLD]), desired(None, NEW), P.Mode.FINISH_ROLLOVER)


def test_address_sets_split_by_family() -> None:
    sets = P.address_sets([ipaddress.ip_address(V6), ipaddress.ip_address(V4)])
    assert sets == {P.A: fs(a(V4)), P.AAAA: fs(a(V6))}


def test_ttl_alone_is_a_change_for_every_managed_rrset() -> None:
    """`publish --ttl 300` on records with TTL 60 rewrites them all with TTL 300 (it used to
    say "nothing to change"), and the rewrite states exactly what was read."""
    p = P.build_plan(current(ttl=60, a=[a(V4)], aaaa=[a(V6)], ipseckey=[NEW]),
                     desired([V4, V6], NEW, ttl=300))
    (u,) = p.updates
    assert u.ttl == 300
    assert u.sets == {P.A: fs(a(V4)), P.AAAA: fs(a(V6)), P.IPSECKEY: fs(NEW)}
    assert u.prereqs == u.sets
    assert not any("nothing to change" in n for n in p.notes)


def test_after_a_real_change_every_rrset_has_the_new_ttl() -> None:
    p = P.build_plan(current(ttl=60, a=[a(V4)], aaaa=[a(V6)], ipseckey=[NEW]),
                     desired([V4B, V6], NEW, ttl=120))
    (u,) = p.updates
    assert set(u.sets) == {P.A, P.AAAA, P.IPSECKEY} and u.ttl == 120
    # An absent family stays absent: no TTL to apply to an RRset that does not exist.
    p = P.build_plan(current(ttl=60, a=[a(V4)]), desired([V4], None, ttl=120))
    (u,) = p.updates
    assert u.sets == {P.A: fs(a(V4))}


def test_rollover_order_is_one_everywhere() -> None:
    """The help, the plan's notes, the nsupdate script and the README give one order."""
    from pathlib import Path

    from autosp.cli import PUBLISH_EPILOG
    from autosp.nsupdate import plan_script

    p = P.build_plan(current(ttl=120, ipseckey=[OLD]), desired(None, NEW, ttl=120), wait=False)
    script = plan_script(p, "198.51.100.4", 53)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for step in P.ROLLOVER_STEPS:
        assert step in PUBLISH_EPILOG
        assert step in script
        assert step in readme, step
    note = " ".join(p.notes)
    assert note.index("--finish-rollover") < note.index("switch the IKE daemon")
