"""The responder's rules, pure: who may come in, how much work an unknown initiator may cost us,
and the conn that lets one in.

Theory of operation. An initiator that charon does not know (no conn of ours names its identity,
or not with the key it signs with) fails IKE_AUTH on our wildcard conn; resolver/responder/
manager.py learns its identity and source address from charon's log and asks this module, in
two steps, with `now` passed in (no clock, no I/O here):

  1. `Gate.before_lookup`: may it cost us a lookup at all? Refused without any lookup: an
     identity that is not a host name, a name outside `accept`, an (identity, address) refused
     recently (the negative cache), the global and per-address lookup rates, the number of
     lookups in flight, and a full table of responder conns.
  2. `judge`: the lookups' results (through the daemon's own validating resolver) decide.
     The IPSECKEY RRset of the identity must be SECURE and hold a usable key without a gateway
     (a key with a gateway is the gateway's, not the owner's); bogus, insecure (unsigned zone),
     missing or unprovable: refused, with the reason in words. `allow_keys` (fingerprints) may
     narrow the keys; `match_address` requires the source address to be among the identity's
     secure A/AAAA (IPv4 and IPv6). The traffic selectors are the identity's secure addresses
     (plus the source address when `match_address = false`): never more than DNS vouches for.

Attack bounds (identities are chosen by the initiator): every refusal in step 1 costs no lookup;
the lookups that do happen are bounded by `lookups_per_second` (global) and
`peer_lookups_per_second` (per source address) with small bursts, `max_lookups` at once, and the
negative cache remembers a refusal for `negative_ttl` seconds per (identity, address) with at
most `negative_cache` entries (so a flood of random names cannot grow it, and an attacker who
claims a real peer's name from its own address does not lock the real peer out). At most
`max_conns` responder conns are loaded; an initiator that claims a name whose key it does not
hold is admitted as far as loading that name's conn with the *published* key, and then fails
authentication: it gets nothing.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any, ClassVar, Final

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from resolver.configtable import Section, Table, between, one_of
from resolver.ipseckey import NO_GATEWAY, IpsecKey, keys_from_rrset
from resolver.policy import RRsetAnswer
from resolver.tunnels.intents import DPD_CHILD_OPTIONS, dpd_options
from resolver.validator.response import Security

Address = IPv4Address | IPv6Address

RESPONDER_PREFIX: Final = "iskr-"  # not "isk-": the Provisioner's reconcile must leave these
WILDCARD: Final = "iskr-wildcard"
# The wildcard's remote auth requires membership in a group nobody has: charon selects it for
# any initiator (and logs who it is), but no authentication can ever satisfy it, not even one
# with a key a removed conn left trusted in charon's credential store (lab-notes, Careful 1).
NEVER_GROUP: Final = "ipseckey-resolver-unknown-peer"
ANY: Final = (dns.name.root,)


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponderConfig(Section):
    """The parsed [responder] table.

    ```toml
    [responder]
    accept = "any"                # "any", "none", or name suffixes: ["example.com."]
    allow_keys = []               # key fingerprints ("SHA256:..."); empty: any secure key
    match_address = true          # the source address must be one of the name's A/AAAA
    lease = 600                   # seconds a learned conn lives (extended while it carries SAs)
    lookups_per_second = 20       # unknown initiators looked up, all together...
    peer_lookups_per_second = 2   # ...and per source address (bursts of 4x either)
    max_lookups = 16              # lookups in flight at once
    max_conns = 256               # learned conns loaded at once
    negative_ttl = 30             # seconds a refused (identity, address) is not looked up again
    negative_cache = 4096         # entries of that memory
    lookup_timeout = 2.0          # seconds for the lookups of one initiator
    ```
    """

    TABLE: ClassVar[str] = "responder"

    accept: tuple[dns.name.Name, ...] = ANY  # (): none; (root,): any
    allow_keys: tuple[str, ...] = ()
    match_address: bool = True
    lease: float = 600.0
    lookups_per_second: float = 20.0
    peer_lookups_per_second: float = 2.0
    max_lookups: int = 16
    max_conns: int = 256
    negative_ttl: float = 30.0
    negative_cache: int = 4096
    lookup_timeout: float = 2.0

    @property
    def enabled(self) -> bool:
        """Whether unknown initiators are looked up at all (`accept = "none"`: no)."""
        return bool(self.accept)

    @classmethod
    def from_table(cls, t: Table) -> ResponderConfig:
        """Parse the [responder] table."""
        d = cls()
        if isinstance(t.raw.get("accept", "any"), str):
            word = t.get("accept", str, "any", one_of("any", "none"))
            accept: tuple[dns.name.Name, ...] = ANY if word == "any" else ()
        else:
            accept = t.each("accept", _parse_suffix, ANY)
        cfg = cls(
            accept=accept,
            allow_keys=t.each("allow_keys", _parse_fingerprint, d.allow_keys),
            match_address=t.get("match_address", bool, d.match_address),
            lease=t.get("lease", float, d.lease, between(5, 86400, "seconds")),
            lookups_per_second=t.get("lookups_per_second", float, d.lookups_per_second,
                                     between(0.1, 10000)),
            peer_lookups_per_second=t.get("peer_lookups_per_second", float,
                                          d.peer_lookups_per_second, between(0.01, 10000)),
            max_lookups=t.get("max_lookups", int, d.max_lookups, between(1, 4096)),
            max_conns=t.get("max_conns", int, d.max_conns, between(1, 100000)),
            negative_ttl=t.get("negative_ttl", float, d.negative_ttl,
                               between(0, 86400, "seconds")),
            negative_cache=t.get("negative_cache", int, d.negative_cache,
                                 between(1, 1_000_000)),
            lookup_timeout=t.get("lookup_timeout", float, d.lookup_timeout,
                                 between(0.1, 60, "seconds")),
        )
        t.done()
        return cfg


def _parse_suffix(text: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{text!r} is not a name suffix: {exc}") from None


def _parse_fingerprint(text: str) -> str:
    """A key fingerprint as `autosp list` and the logs show it: "SHA256:" + unpadded base64."""
    body = text.removeprefix("SHA256:")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except ValueError:
        raw = b""
    if not text.startswith("SHA256:") or len(raw) != 32:
        raise ValueError(f"{text!r} is not a key fingerprint (SHA256:<43 base64 characters>, "
                         "as `autosp list` shows it)")
    return text


# --- bounds on the work an initiator may cause ---------------------------------------------


class TokenBucket:
    """`rate` per second with bursts of `burst`; `take(now)` spends one token if there is one."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, -math.inf

    def take(self, now: float) -> bool:
        if self.at != -math.inf:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class NegativeCache:
    """Refusals by (identity, address) until `ttl` passes; at most `size` entries (the oldest
    go first), so its memory is bounded whatever the initiators send."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl, self.size = ttl, size
        self._entries: OrderedDict[tuple[dns.name.Name, Address], tuple[float, str]] = (
            OrderedDict())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[dns.name.Name, Address], now: float) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: tuple[dns.name.Name, Address], reason: str, now: float) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (now + self.ttl, reason)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, name: dns.name.Name) -> None:
        """Drop every entry of `name` (its records changed, or an operator asked)."""
        for key in [k for k in self._entries if k[0] == name]:
            del self._entries[key]


@dataclass(frozen=True, slots=True)
class Refused:
    """No: `reason` in words. `lookup` says whether this refusal came after a lookup (and is
    cached). `quiet` refusals (rate limits, repeats) are counted by `kind` and summarised
    rather than logged one by one: a flood must not become a flood of log lines."""

    reason: str
    lookup: bool = False
    quiet: bool = False
    kind: str = ""


@dataclass(slots=True)
class GateCounters:
    """What the gate did (for the log, the benchmark and the tests)."""

    seen: int = 0
    not_a_name: int = 0
    not_accepted: int = 0
    negative_hits: int = 0
    rate_limited: int = 0
    busy: int = 0
    full: int = 0
    lookups: int = 0
    admitted: int = 0
    refused_after_lookup: int = 0


class Gate:
    """Step 1 (see the module docstring): whether an unknown initiator may cost a lookup."""

    def __init__(self, config: ResponderConfig) -> None:
        self.config = config
        self.negative = NegativeCache(config.negative_ttl, config.negative_cache)
        self.counters = GateCounters()
        self._global = TokenBucket(config.lookups_per_second,
                                   max(1.0, 4 * config.lookups_per_second))
        self._peers: OrderedDict[Address, TokenBucket] = OrderedDict()

    def before_lookup(self, identity: dns.name.Name | None, address: Address, now: float, *,
                      in_flight: int, conns: int, evictable: bool) -> Refused | None:
        """None: go ahead and look `identity` up (one lookup is counted against the rates)."""
        c = self.counters
        c.seen += 1
        if identity is None:
            c.not_a_name += 1
            return Refused("its identity is not a host name (only FQDN identities can be "
                           "looked up)")
        if not any(identity.is_subdomain(s) for s in self.config.accept):
            c.not_accepted += 1
            return Refused(f"{_text(identity)} is not under [responder] accept")
        cached = self.negative.get((identity, address), now)
        if cached is not None:
            c.negative_hits += 1
            return Refused(f"refused less than {self.config.negative_ttl:g} s ago: {cached}",
                           quiet=True, kind="refused recently")
        if in_flight >= self.config.max_lookups:
            c.busy += 1
            return Refused(f"{in_flight} lookups in flight ([responder] max_lookups)",
                           quiet=True, kind="max_lookups in flight")
        if conns >= self.config.max_conns and not evictable:
            c.full += 1
            return Refused(f"{conns} learned conns loaded, all in use ([responder] max_conns)",
                           quiet=True, kind="max_conns in use")
        peer = self._peer_bucket(address, now)
        if not peer.take(now):
            c.rate_limited += 1
            return Refused(f"more than {self.config.peer_lookups_per_second:g} lookups/s from "
                           f"{address} ([responder] peer_lookups_per_second)", quiet=True,
                           kind="over peer_lookups_per_second")
        if not self._global.take(now):
            c.rate_limited += 1
            return Refused(f"more than {self.config.lookups_per_second:g} lookups/s "
                           "([responder] lookups_per_second)", quiet=True,
                           kind="over lookups_per_second")
        c.lookups += 1
        return None

    def after_lookup(self, identity: dns.name.Name, address: Address, outcome: Admit | Refused,
                     now: float) -> None:
        """Count the outcome; remember a refusal (the negative cache)."""
        if isinstance(outcome, Admit):
            self.counters.admitted += 1
            self.negative.forget(identity)
        else:
            self.counters.refused_after_lookup += 1
            self.negative.put((identity, address), outcome.reason, now)

    def _peer_bucket(self, address: Address, now: float) -> TokenBucket:
        bucket = self._peers.get(address)
        if bucket is None:
            rate = self.config.peer_lookups_per_second
            bucket = self._peers[address] = TokenBucket(rate, max(1.0, 4 * rate))
            # Bounded like the negative cache; a forgotten address only starts a fresh bucket,
            # which any new address gets anyway (the global rate bounds them all).
            while len(self._peers) > self.config.negative_cache:
                self._peers.popitem(last=False)
        self._peers.move_to_end(address)
        return bucket


# --- step 2: the lookups decide ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admit:
    """Yes: load a conn for `identity` with `keys`, traffic selectors `addresses`."""

    identity: dns.name.Name
    keys: tuple[IpsecKey, ...]
    addresses: tuple[Address, ...]  # remote traffic selectors (hosts)
    remote_addrs: tuple[Address, ...]  # where IKE may come from (empty: anywhere)

    def describe(self) -> str:
        keys = ", ".join(f"{k.key_type()} {k.fingerprint()}" for k in self.keys)
        return f"DNSSEC-secure IPSECKEY ({keys})"


def judge(config: ResponderConfig, identity: dns.name.Name, address: Address,
          ipseckey: RRsetAnswer | BaseException, a: RRsetAnswer | BaseException,
          aaaa: RRsetAnswer | BaseException) -> Admit | Refused:
    """Step 2 (see the module docstring). Each answer is the validated answer of the identity's
    IPSECKEY, A and AAAA lookups, or the error its lookup raised."""
    name = _text(identity)
    keys_or_refusal = _secure_keys(name, identity, ipseckey)
    if isinstance(keys_or_refusal, Refused):
        return keys_or_refusal
    keys = keys_or_refusal
    if config.allow_keys:
        allowed = tuple(k for k in keys if k.fingerprint() in config.allow_keys)
        if not allowed:
            prints = ", ".join(k.fingerprint() for k in keys)
            return Refused(f"the key {name} publishes ({prints}) is not in [responder] "
                           "allow_keys", lookup=True)
        keys = allowed
    addresses: list[Address] = []
    for qtype, ans in (("A", a), ("AAAA", aaaa)):
        if isinstance(ans, BaseException):
            if config.match_address:
                return Refused(f"{name} {qtype} lookup failed: {ans}", lookup=True)
            continue
        sec = ans.verdict.security
        if sec is not Security.SECURE:
            if config.match_address and sec is not Security.INSECURE:
                return Refused(f"{name} {qtype} is {sec.value}: {ans.verdict.reason}",
                               lookup=True)
            continue  # an insecure address vouches for nothing
        rdtype = dns.rdatatype.A if qtype == "A" else dns.rdatatype.AAAA
        addresses += [ip_address(rd.address) for r in ans.answer
                      if r.name == identity and r.rdtype == rdtype for rd in r]
    if config.match_address:
        if address not in addresses:
            published = ", ".join(map(str, addresses)) or "none"
            return Refused(f"it comes from {address}, which is not an address of {name} "
                           f"(secure A/AAAA: {published}; [responder] match_address)",
                           lookup=True)
        return Admit(identity, keys, tuple(addresses), tuple(addresses))
    if address not in addresses:
        addresses.append(address)
    return Admit(identity, keys, tuple(addresses), ())


def _secure_keys(name: str, identity: dns.name.Name, ans: RRsetAnswer | BaseException
                 ) -> tuple[IpsecKey, ...] | Refused:
    if isinstance(ans, BaseException):
        return Refused(f"the IPSECKEY lookup of {name} failed: {ans}", lookup=True)
    v = ans.verdict
    if v.security is Security.BOGUS:
        return Refused(f"the IPSECKEY of {name} is bogus: {v.reason}", lookup=True)
    if v.security is Security.INDETERMINATE:
        return Refused(f"the IPSECKEY of {name} could not be validated: {v.reason}",
                       lookup=True)
    if v.security is Security.INSECURE:
        return Refused(f"{name} is in an unsigned zone (insecure): its IPSECKEY cannot "
                       "authenticate anyone", lookup=True)
    if ans.rcode == dns.rcode.NXDOMAIN:
        return Refused(f"{name} does not exist (NXDOMAIN)", lookup=True)
    if ans.rcode != dns.rcode.NOERROR:
        return Refused(f"the IPSECKEY lookup of {name} answered "
                       f"{dns.rcode.to_text(dns.rcode.Rcode(ans.rcode))}", lookup=True)
    keys = tuple(k for r in ans.answer if r.rdtype == dns.rdatatype.IPSECKEY
                 and r.name == identity for k in keys_from_rrset(r)
                 if k.gateway is NO_GATEWAY)
    if not keys:
        return Refused(f"{name} publishes no usable IPSECKEY of its own (proven)", lookup=True)
    return keys


# --- the conns ----------------------------------------------------------------------------


def conn_name(identity: dns.name.Name) -> str:
    """"iskr-" + up to 20 characters of the first label + "-" + 10 hex digits of SHA-256 of the
    name (`identity_name` allows only [a-z0-9-] labels, so nothing needs sanitizing)."""
    label = identity.labels[0].decode("ascii")[:20] if identity.labels else "root"
    digest = hashlib.sha256(identity.to_digestable()).hexdigest()[:10]
    return f"{RESPONDER_PREFIX}{label}-{digest}"


def wildcard_conn(local_id: str, local_spki: str) -> dict[str, Any]:
    """The load-conn payload of the one wildcard conn: selected for any initiator no other conn
    knows, so that charon logs who it is; never able to authenticate anyone (NEVER_GROUP), and
    with no children, so even a charon that let it through could not carry traffic for it."""
    return {WILDCARD: {
        "version": "2",
        "mobike": "no",
        "local": {"auth": "pubkey", "id": local_id, "pubkeys": [local_spki]},
        "remote": {"auth": "pubkey", "id": "%any", "groups": [NEVER_GROUP]},
    }}


def responder_conn(admit: Admit, local_id: str, local_spki: str,
                   local_addresses: tuple[Address, ...], dpd_delay: int) -> dict[str, Any]:
    """The load-conn payload that lets `admit.identity` in: its published key(s) bound to its
    identity, tunnel mode, remote traffic selectors = the addresses DNS vouches for, and
    `[provision] dpd_delay`: a dead initiator's IKE_SA is closed, so its conn's lease (which
    SAs extend) can run out."""
    name = conn_name(admit.identity)
    local_ts = [str(ip_network(a)) for a in local_addresses] or ["dynamic"]
    conn: dict[str, Any] = {
        "version": "2",
        "mobike": "no",  # see resolver/tunnels/vici.py
        **dpd_options(dpd_delay),
        "local": {"auth": "pubkey", "id": local_id, "pubkeys": [local_spki]},
        "remote": {"auth": "pubkey", "id": _text(admit.identity),
                   "pubkeys": [k.spki_pem() for k in admit.keys]},
        "children": {name: {
            "mode": "tunnel",
            "local_ts": local_ts,
            "remote_ts": [str(ip_network(a)) for a in admit.addresses],
            **DPD_CHILD_OPTIONS,
        }},
    }
    if admit.remote_addrs:
        conn["remote_addrs"] = [str(a) for a in admit.remote_addrs]
    return {name: conn}


def same_admission(a: Admit, b: Admit) -> bool:
    """Whether two admissions load the same conn (keys compared as published bytes)."""
    return (a.identity == b.identity and a.addresses == b.addresses
            and a.remote_addrs == b.remote_addrs
            and {k.public_key for k in a.keys} == {k.public_key for k in b.keys})


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True)
