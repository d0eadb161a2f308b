"""What `autosp publish` will change, decided without any I/O.

Theory of operation. Inputs: the records the primary server serves now at NAME (A, AAAA,
IPSECKEY, read just before), and what the user wants there. Output: a `Plan`, a sequence of
`Update` steps (each one RFC 2136 UPDATE message) with `Wait` steps between them. The edges
(`autosp.publish` sending with dnspython, `autosp.nsupdate` printing or running nsupdate) only
execute a plan; every decision is here, so it is tested as a table.

Rule 1 -- nothing is half-published, and a racing publisher fails cleanly. Every update carries
value-dependent prerequisites (RFC 2136 section 2.4.2, "RRset exists (value dependent)", or
"RRset does not exist") for each RRset type it touches, stating exactly the contents read before.
The server applies the whole update or nothing, and refuses it (NXRRSET/YXRRSET) if anyone
changed those RRsets in between. Re-reading and re-running is then always safe.

Rule 2 -- a key changes make-before-break. Peers cache our IPSECKEY RRset for up to its TTL; a
peer holding only the old key would reject the new one. So when the published set holds a key
other than ours, the rollover is:

    phase 1  publish the new key BESIDE the old one(s)                   (one update)
    wait     the old IPSECKEY RRset's TTL (+ a margin): every cache that held the old set
             alone has expired it, so every peer now knows both keys
    phase 2  remove the old key(s), keep only ours                      (one update)

With `--no-wait` (and always with `--nsupdate`, whose script cannot wait) autosp stops after
phase 1 and says when phase 2 may run: `autosp publish ... --finish-rollover` after that time.
The host's IKE daemon must authenticate with the new private key from phase 2 on; until phase 2,
peers accept either key. If a rollover is found already half-done (both keys published), phase 1
is empty and the full wait is taken again, since we cannot know when phase 1 happened.

A record with the same public key as ours but another gateway or precedence is not a key change:
peers holding it still authenticate us, so it is replaced at once.

Rule 3 -- an update that would change nothing is not sent (no needless serial bumps). An RRset
whose records are right but whose TTL is not the requested one is a change: `--ttl` applies to
every RRset the plan manages, not only to those whose records change.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.IPSECKEY

from autosp.errors import OperationFailed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Ipseckey = dns.rdtypes.IN.IPSECKEY.IPSECKEY

A = dns.rdatatype.A
AAAA = dns.rdatatype.AAAA
IPSECKEY = dns.rdatatype.IPSECKEY
# Seconds added to the old TTL before phase 2: covers clock steps and a cache that fetched the
# old set an instant before phase 1 committed.
ROLLOVER_MARGIN = 2.0
PHASE1 = "rollover phase 1: new key beside the old one(s)"
# The one order of a key rollover, for the help, the README, the plan's notes and the
# nsupdate script (tests check they all carry it). Step 4 comes after the removal because a
# peer that pinned us (`autosp add`) keeps using the old key while both are published and
# moves to the new one only once the old one is gone (resolver/endpoints, Rule 3).
ROLLOVER_STEPS = (
    "1. publish the new key beside the old one(s)",
    "2. wait the old IPSECKEY TTL + 2 s, so no cache holds the old key alone",
    "3. remove the old key(s) (--finish-rollover after --no-wait or --nsupdate)",
    "4. switch the IKE daemon to the new key ([identity] private_key; restart ipseckey-resolver)",
)
PHASE2 = "rollover phase 2: remove the old key(s)"


class Mode(enum.Enum):
    """What the user asked `publish` to do."""

    PUBLISH = "publish"  # set addresses and key; start (and by default finish) a rollover
    FINISH_ROLLOVER = "finish-rollover"  # phase 2 only: keep our key, drop the others


@dataclass(frozen=True, slots=True)
class RRsetState:
    """The contents of one RRset as read (empty = absent) and its TTL."""

    rdtype: dns.rdatatype.RdataType
    rdatas: frozenset[dns.rdata.Rdata] = frozenset()
    ttl: int = 0


@dataclass(frozen=True, slots=True)
class Current:
    """What the primary serves at `name` now."""

    name: dns.name.Name
    rrsets: dict[dns.rdatatype.RdataType, RRsetState]

    def get(self, rdtype: dns.rdatatype.RdataType) -> RRsetState:
        """The RRset of that type (an empty one if absent)."""
        return self.rrsets.get(rdtype, RRsetState(rdtype))


@dataclass(frozen=True, slots=True)
class Desired:
    """What the user wants at `name` in `zone`.

    addresses: None leaves A/AAAA alone; otherwise the complete new address list (an empty
        family removes that family's RRset).
    ipseckey: None leaves the IPSECKEY RRset alone (publish addresses only).
    """

    name: dns.name.Name
    zone: dns.name.Name
    ttl: int
    addresses: tuple[IPAddress, ...] | None
    ipseckey: Ipseckey | None


@dataclass(frozen=True, slots=True)
class Update:
    """One RFC 2136 UPDATE: prerequisites, then the replacement RRsets of the touched types.

    prereqs maps each touched type to the exact set that must be present (empty: "RRset does
    not exist"). sets maps each touched type to its new contents (empty: delete the RRset).
    """

    zone: dns.name.Name
    name: dns.name.Name
    ttl: int
    prereqs: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]]
    sets: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]]
    purpose: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep before the next step (the rollover's cache-expiry wait)."""

    seconds: float
    reason: str


Step = Update | Wait


@dataclass(frozen=True, slots=True)
class Plan:
    """The steps to run, the state they leave, and what to tell the user afterwards."""

    steps: tuple[Step, ...]
    final: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]]
    notes: tuple[str, ...] = field(default=())
    # Set when the plan stops after phase 1: the earliest moment (seconds from the end of the
    # plan) at which --finish-rollover is safe.
    finish_after: float | None = None

    @property
    def updates(self) -> tuple[Update, ...]:
        """Only the Update steps."""
        return tuple(s for s in self.steps if isinstance(s, Update))


def same_key(a: Ipseckey, b: Ipseckey) -> bool:
    """True if two IPSECKEY rdatas carry the same public key (gateway/precedence aside)."""
    return a.algorithm == b.algorithm and a.key == b.key


def address_sets(addresses: Iterable[IPAddress]) -> dict[dns.rdatatype.RdataType,
                                                           frozenset[dns.rdata.Rdata]]:
    """A and AAAA rdata sets for a list of addresses."""
    out: dict[dns.rdatatype.RdataType, set[dns.rdata.Rdata]] = {A: set(), AAAA: set()}
    for addr in addresses:
        rdtype = A if addr.version == 4 else AAAA
        out[rdtype].add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(addr)))
    return {k: frozenset(v) for k, v in out.items()}


def build_plan(current: Current, desired: Desired, mode: Mode = Mode.PUBLISH,
               wait: bool = True) -> Plan:
    """The steps that take `current` to `desired` (see the module docstring for the rules).

    Args:
        current: what the primary serves now.
        desired: what the user wants.
        mode: PUBLISH, or FINISH_ROLLOVER (phase 2 of a rollover started with --no-wait).
        wait: run a rollover's wait and phase 2 now; False stops after phase 1.

    Raises:
        OperationFailed: FINISH_ROLLOVER while our key is not published.
    """
    base: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]] = {}
    if desired.addresses is not None:
        base.update(address_sets(desired.addresses))
    notes: list[str] = []
    ours = desired.ipseckey
    if ours is None:
        return _finish(current, desired, [base], notes, None)
    published = current.get(IPSECKEY)
    others = frozenset(r for r in published.rdatas if not same_key(_ipk(r), ours))
    if mode is Mode.FINISH_ROLLOVER:
        if not any(same_key(_ipk(r), ours) for r in published.rdatas):
            raise OperationFailed(f"{desired.name}: our key is not published, so there is no "
                                  "rollover to finish; run `autosp publish` without "
                                  "--finish-rollover first")
        if others:
            notes.append(f"rollover step 3 done: removed {len(others)} old key(s); now switch "
                         "the IKE daemon to the new key (step 4)")
        return _finish(current, desired, [{**base, IPSECKEY: frozenset({ours})}], notes, None)
    if not others:
        return _finish(current, desired, [{**base, IPSECKEY: frozenset({ours})}], notes, None)
    # A key change: make before break.
    both = others | {ours}
    delay = published.ttl + ROLLOVER_MARGIN
    if not wait:
        notes.append(f"key rollover step 1 done: the new key is published beside {len(others)} "
                     f"old one(s). Peers may still hold the old set for {published.ttl} s: "
                     f"after {delay:.0f} s run the same command with --finish-rollover "
                     "(step 3), then switch the IKE daemon to the new key (step 4)")
        return _finish(current, desired, [{**base, IPSECKEY: both}], notes, delay,
                       purposes=[PHASE1])
    notes.append(f"key rollover: new key published beside the old one(s), waited {delay:.0f} s "
                 "for caches to expire, then removed the old key(s); now switch the IKE "
                 "daemon to the new key (step 4)")
    return _finish(current, desired, [{**base, IPSECKEY: both},
                                      {**base, IPSECKEY: frozenset({ours})}], notes, None,
                   wait_between=Wait(delay, f"the old IPSECKEY TTL ({published.ttl} s) + "
                                            f"{ROLLOVER_MARGIN:.0f} s, so caches drop it"))


def _ipk(rdata: dns.rdata.Rdata) -> Ipseckey:
    assert isinstance(rdata, Ipseckey)  # IPSECKEY RRsets hold only IPSECKEY rdatas
    return rdata


def _finish(current: Current, desired: Desired,
            targets: list[dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]]],
            notes: list[str], finish_after: float | None, wait_between: Wait | None = None,
            purposes: list[str] | None = None) -> Plan:
    """Turn the successive target states into Update steps (skipping empty ones)."""
    steps: list[Step] = []
    state = {t: current.get(t).rdatas for t in (A, AAAA, IPSECKEY)}
    ttls = {t: current.get(t).ttl for t in (A, AAAA, IPSECKEY)}
    if purposes is None:
        purposes = ["publish"] if len(targets) == 1 else [PHASE1, PHASE2]
    for i, target in enumerate(targets):
        changed = {t: v for t, v in target.items()
                   if state[t] != v or (v and ttls[t] != desired.ttl)}
        if i > 0 and wait_between is not None:
            steps.append(wait_between)
        if not changed:
            continue
        # Prerequisites cover every type this plan manages, changed or not: the update then
        # applies only to exactly the state the plan was made from.
        prereqs = {t: state[t] for t in target}
        steps.append(Update(desired.zone, desired.name, desired.ttl, prereqs, changed,
                            purposes[i]))
        state.update(changed)
        ttls.update({t: desired.ttl for t in changed})
    if not any(isinstance(s, Update) for s in steps):
        notes.insert(0, "nothing to change: the records are already as requested")
        steps = []
    final = {t: state[t] for t in targets[-1]} if targets else {}
    return Plan(tuple(steps), final, tuple(notes), finish_after)
