"""Policy groups and the decision table: (destination, evidence) -> a Decision value.

Theory of operation: this module is pure. It never looks anything up, never provisions and
never reads the clock; it is given what the resolution core proved and returns what should
happen, as data. The decision table of DESIGN.md lives in one place, `Policy.decide` plus
`Policy.after_setup_failure`, and tests/test_policy.py walks every cell of it.

Groups (Libreswan's names):

    block             SERVFAIL (EDE Blocked), drop shunt; nothing else is looked at
    private           tunnel, or SERVFAIL (+ drop shunt). Never an answer in clear.
    private-or-clear  tunnel if the peer publishes a secure key, else clear. A tunnel that fails
                      to come up is SERVFAIL (the default, `strict = true`): a destination that
                      publishes a secure key is never answered in clear. `strict = false` is
                      the explicit opt-in to answering it in clear after a failed setup; it is
                      warned about at start-up (`Policy.warnings`) and on every such answer
                      (`AnswerClear.after_failure`, logged by resolver/capture.py).
    clear-or-private  answer in clear; tunnels the peer starts are accepted (charon's business)
    clear             answer in clear; the IPSECKEY is not even waited for

Rule 1 (DESIGN.md, security requirement 3; Unbound's ipsecmod returns the address in clear when
the IPSECKEY lookup fails): an IPSECKEY whose absence is not *proven* is never "no key". Only a
secure NXDOMAIN/NODATA or an insecure zone is `KeyStatus.ABSENT`; bogus data, missing proofs,
timeouts, NSEC3 over the iteration limit, and an insecure IPSECKEY next to a secure address
(same owner, so the same zone: something is wrong) are `BOGUS`/`UNPROVABLE`, and those are
SERVFAIL in every group that looks at keys.

Rule 2: a bogus (or indeterminate) *address* RRset is SERVFAIL whatever the group.

Rule 3: the host's own addresses and loopback are never tunnelled and never blocked.

Finding the group of a destination. Rules are CIDRs or name suffixes, each in exactly one group:
  * each address of the answer takes the group of its longest matching CIDR; an address that no
    CIDR matches takes the group of the query name's longest matching suffix; failing both, the
    `default` group. (CIDRs beat names: an address rule is about where packets go, and a name
    rule must not relax it.)
  * the answer's group is the strictest among its addresses (block > private > private-or-clear >
    clear-or-private > clear): one answer is one decision, and failing closed is the safe merge.
  * an answer without addresses (NODATA, NXDOMAIN) takes the name's group, or the default.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar, Final, Protocol

import dns.edns
import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from resolver.configtable import Section, Table, between, one_of
from resolver.errors import (
    AddressBound,
    IkeDaemonUnreachable,
    ProvisioningError,
    StateUnrecorded,
    TunnelTimeout,
)
from resolver.ipseckey import IpsecKey, keys_from_rrset
from resolver.validator.response import Security, Verdict

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class Group(enum.Enum):
    """Policy groups; the value is the config key."""

    BLOCK = "block"
    PRIVATE = "private"
    PRIVATE_OR_CLEAR = "private-or-clear"
    CLEAR_OR_PRIVATE = "clear-or-private"
    CLEAR = "clear"

    @property
    def strictness(self) -> int:
        """Higher is stricter; used to merge the groups of several addresses."""
        return _STRICTNESS[self]

    @property
    def wants_keys(self) -> bool:
        """Whether the IPSECKEY lookup matters for this group (clear and block ignore it)."""
        return self in (Group.PRIVATE, Group.PRIVATE_OR_CLEAR, Group.CLEAR_OR_PRIVATE)


_STRICTNESS: Final = {
    Group.CLEAR: 0,
    Group.CLEAR_OR_PRIVATE: 1,
    Group.PRIVATE_OR_CLEAR: 2,
    Group.PRIVATE: 3,
    Group.BLOCK: 4,
}

DEFAULT_GROUP: Final = Group.PRIVATE_OR_CLEAR


class KeyStatus(enum.Enum):
    """What the IPSECKEY lookup proved (the columns of the decision table)."""

    FOUND = "found"  # secure, at least one usable key
    ABSENT = "absent"  # secure proof of no IPSECKEY, or an insecure zone
    UNUSABLE = "unusable"  # secure, but no record we can use (unknown algorithm, bad key)
    BOGUS = "bogus"  # validation failed
    UNPROVABLE = "unprovable"  # absence not proven: timeout, missing proof, NSEC3 limit, ...


@dataclass(frozen=True, slots=True)
class KeyEvidence:
    """The IPSECKEY side of one lookup, reduced to what the decision table needs."""

    status: KeyStatus
    keys: tuple[IpsecKey, ...] = ()
    reason: str = ""
    ede: int | None = None
    ttl: int | None = None  # TTL of the IPSECKEY RRset (or negative answer), capped by validity


class SetupFailure(enum.Enum):
    """Why a tunnel did not come up (`classify` maps a ProvisioningError onto these)."""

    TIMEOUT = "timeout"  # the CHILD_SA was not INSTALLED within the timeout
    DAEMON_UNREACHABLE = "daemon-unreachable"  # the IKE daemon's control socket failed
    REJECTED = "rejected"  # the daemon refused (key mismatch, auth failed, bad config)
    UNRECORDED = "unrecorded"  # up, but the state file could not record it: undone
    ADDRESS_BOUND = "address-bound"  # a live tunnel binds the address to another name's key


# --- decisions ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerClear:
    """Answer with the addresses; no tunnel is set up by us.

    `after_failure`: the destination publishes a secure key and its tunnel failed; answering
    anyway is what `strict = false` asked for, and each such answer is logged as a warning.
    """

    group: Group
    reason: str
    after_failure: bool = False


@dataclass(frozen=True, slots=True)
class Tunnel:
    """Bring a tunnel up to each destination, then answer.

    `drop_while_negotiating`: install a drop shunt for the destinations until the tunnel is up
    (group private). `fail_closed`: a failed setup is SERVFAIL (private, and private-or-clear
    unless `strict = false`); otherwise the answer goes out in clear.
    """

    group: Group
    destinations: tuple[Address, ...]
    keys: tuple[IpsecKey, ...]  # best first; the provisioner uses keys[0]
    drop_while_negotiating: bool
    fail_closed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """SERVFAIL with an Extended DNS Error; `drop` lists destinations to shunt."""

    group: Group | None  # None: decided before any group applied (bogus address)
    ede: int
    reason: str
    drop: tuple[Address, ...] = ()


Decision = AnswerClear | Tunnel | Refuse

# EDE codes for our own SERVFAILs (RFC 8914). 28 "Unable to conform to policy" is what a
# private destination without a usable key is; the tunnel failures are network errors.
EDE_NO_KEY: Final = int(dns.edns.EDECode.UNABLE_TO_CONFORM_TO_POLICY)
EDE_BOGUS: Final = int(dns.edns.EDECode.DNSSEC_BOGUS)
EDE_INDETERMINATE: Final = int(dns.edns.EDECode.DNSSEC_INDETERMINATE)
EDE_BLOCKED: Final = int(dns.edns.EDECode.BLOCKED)
EDE_TUNNEL: Final = int(dns.edns.EDECode.NETWORK_ERROR)
EDE_DAEMON: Final = int(dns.edns.EDECode.NOT_READY)
# No RFC 8914 code says "our own disk failed"; 0 (Other) with the reason in the text does.
EDE_STATE: Final = int(dns.edns.EDECode.OTHER)

_FAILURE_EDE: Final = {
    SetupFailure.TIMEOUT: EDE_TUNNEL,
    SetupFailure.REJECTED: EDE_TUNNEL,
    SetupFailure.DAEMON_UNREACHABLE: EDE_DAEMON,
    SetupFailure.UNRECORDED: EDE_STATE,
    SetupFailure.ADDRESS_BOUND: EDE_NO_KEY,  # 28: our policy cannot use this name's key
}
_FAILURE_TEXT: Final = {
    SetupFailure.TIMEOUT: "IPsec tunnel setup timed out",
    SetupFailure.REJECTED: "IPsec tunnel setup failed",
    SetupFailure.DAEMON_UNREACHABLE: "IKE daemon unreachable",
    SetupFailure.UNRECORDED: "cannot record tunnel state",
    SetupFailure.ADDRESS_BOUND: "address bound to another name's key",
}


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyConfig(Section):
    """The parsed [policy] table.

    ```toml
    [policy]
    default = "private-or-clear"      # group for everything no rule matches
    strict = true                     # false: private-or-clear answers in clear when the
                                      # tunnel of a destination with a secure key fails
    max_ttl = 300                     # cap on answer TTLs (re-query before leases end)
    private = ["198.51.100.0/24", "corp.example."]
    private-or-clear = []
    clear-or-private = []
    clear = ["203.0.113.0/24"]
    block = ["ads.example."]
    ```
    """

    TABLE: ClassVar[str] = "policy"

    default: Group = DEFAULT_GROUP
    strict: bool = True
    max_ttl: int = 300
    networks: tuple[tuple[Network, Group], ...] = ()
    suffixes: tuple[tuple[dns.name.Name, Group], ...] = ()

    @classmethod
    def from_table(cls, t: Table) -> PolicyConfig:
        """Parse the [policy] table."""
        d = cls()
        default = t.get("default", str, d.default.value, one_of(*(g.value for g in Group)))
        strict = t.get("strict", bool, d.strict)
        max_ttl = t.get("max_ttl", int, d.max_ttl, between(1, 86400, "seconds"))
        networks: dict[Network, Group] = {}
        suffixes: dict[dns.name.Name, Group] = {}
        for group in Group:  # each rule in exactly one group
            for rule in t.each(group.value, _parse_rule, ()):
                rules: dict[Any, Group] = networks if isinstance(rule, Network) else suffixes
                if rules.setdefault(rule, group) is not group:
                    raise t.fail(group.value, f"{str(rule)!r} is also in group "
                                              f"{rules[rule].value!r}")
        t.done()
        return cls(Group(default), strict, max_ttl, tuple(networks.items()),
                   tuple(suffixes.items()))


def _parse_rule(text: str) -> Network | dns.name.Name:
    """A CIDR or a name suffix. Raises ValueError saying which it looked like."""
    if any(c in text for c in "/:") or text.replace(".", "").isdigit():
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a CIDR: {exc}") from None
    try:
        return dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{text!r} is not a name suffix: {exc}") from None


# --- evidence ----------------------------------------------------------------------------


class RRsetAnswer(Protocol):
    """What a pure decision reads of validator.response.ValidatedAnswer: verdict, rcode and the
    answer section (structural, so the cores need no more and unit tests pass plain records).
    The responder's `judge` reads this much; the key evidence below also wants the TTL."""

    @property
    def verdict(self) -> Verdict: ...
    @property
    def rcode(self) -> int: ...
    @property
    def answer(self) -> list[dns.rrset.RRset]: ...


class AnswerLike(RRsetAnswer, Protocol):
    """An `RRsetAnswer` with its TTL (how long the evidence drawn from it holds)."""

    @property
    def ttl(self) -> int: ...


def key_evidence(
    ipseckey: AnswerLike | None,
    address_security: Security,
    failure: str | None = None,
    owner: dns.name.Name | None = None,
) -> KeyEvidence:
    """Reduce the IPSECKEY lookup to a KeyStatus (Rule 1).

    Args:
        ipseckey: the validated IPSECKEY answer, or None if the lookup raised.
        address_security: the address answer's overall security (for the consistency check).
        failure: why the lookup raised (UpstreamError text, timeout), when `ipseckey` is None.
        owner: only IPSECKEY RRsets of this owner count (the end of the address's CNAME chain;
            the caller makes sure the IPSECKEY answer's chain ends there too).
    """
    if ipseckey is None:
        return KeyEvidence(KeyStatus.UNPROVABLE, reason=f"IPSECKEY lookup failed: {failure}",
                           ede=int(dns.edns.EDECode.NO_REACHABLE_AUTHORITY))
    v = ipseckey.verdict
    if v.security is Security.BOGUS:
        return KeyEvidence(KeyStatus.BOGUS, reason=f"IPSECKEY bogus: {v.reason}",
                           ede=v.ede if v.ede is not None else EDE_BOGUS)
    if v.security is Security.INDETERMINATE:
        return KeyEvidence(KeyStatus.UNPROVABLE, reason=f"IPSECKEY indeterminate: {v.reason}",
                           ede=v.ede if v.ede is not None else EDE_INDETERMINATE)
    if ipseckey.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        rcode = dns.rcode.to_text(dns.rcode.Rcode(ipseckey.rcode))
        return KeyEvidence(KeyStatus.UNPROVABLE, reason=f"IPSECKEY lookup {rcode}",
                           ede=v.ede if v.ede is not None else EDE_INDETERMINATE)
    if v.security is Security.INSECURE:
        if v.ede == int(dns.edns.EDECode.UNSUPPORTED_NSEC3_ITERATIONS_VALUE):
            # Insecure only because the denial cannot be checked: no authenticated absence.
            return KeyEvidence(KeyStatus.UNPROVABLE, reason=f"IPSECKEY: {v.reason}", ede=v.ede)
        if address_security is Security.SECURE:
            return KeyEvidence(KeyStatus.UNPROVABLE, ede=EDE_INDETERMINATE,
                               reason="IPSECKEY insecure while the address is secure")
        return KeyEvidence(KeyStatus.ABSENT, reason="insecure zone", ttl=ipseckey.ttl)
    rrsets = [r for r in ipseckey.answer if r.rdtype == dns.rdatatype.IPSECKEY
              and (owner is None or r.name == owner)]
    if not rrsets:
        return KeyEvidence(KeyStatus.ABSENT, reason="no IPSECKEY (proven)", ttl=ipseckey.ttl)
    keys = tuple(k for r in rrsets for k in keys_from_rrset(r, ttl=ipseckey.ttl))
    if not keys:
        return KeyEvidence(KeyStatus.UNUSABLE, reason="no usable IPSECKEY record",
                           ttl=ipseckey.ttl)
    keys = tuple(sorted(keys, key=lambda k: (k.precedence, k.public_key)))
    return KeyEvidence(KeyStatus.FOUND, keys=keys, reason="secure IPSECKEY", ttl=ipseckey.ttl)


# --- the policy ----------------------------------------------------------------------------


class Policy:
    """Groups plus the decision table.

    The groups change only as a whole, by `reconfigure` (SIGHUP, resolver/service/reload.py): the
    capture handler, the provisioner and the endpoint manager hold this one object, so all of
    them see the new groups at once, and since every method here is synchronous a decision
    never mixes the old and the new configuration.
    """

    def __init__(self, config: PolicyConfig, own_addresses: Iterable[Address] = ()) -> None:
        self.own_addresses = frozenset(own_addresses)
        self.reconfigure(config)

    def reconfigure(self, config: PolicyConfig) -> None:
        """Replace the groups and settings (the own addresses stay)."""
        self.config = config
        # Longest prefix first, so the first match is the longest.
        self._networks = sorted(config.networks, key=lambda ng: -ng[0].prefixlen)
        self._suffixes = sorted(config.suffixes, key=lambda sg: -len(sg[0]))

    def warnings(self) -> list[str]:
        """What the daemon warns about at start-up: settings that let traffic go in clear to a
        destination that publishes a secure key (today only `strict = false`)."""
        if self.config.strict:
            return []
        return ["[policy] strict = false: a private-or-clear destination that publishes a "
                "secure IPSECKEY is answered in clear when its tunnel cannot be set up "
                "(each such answer is logged)"]

    def is_exempt(self, address: Address) -> bool:
        """Rule 3: own addresses, loopback and the unspecified address are never tunnelled."""
        return address.is_loopback or address.is_unspecified or address in self.own_addresses

    def name_group(self, qname: dns.name.Name) -> Group | None:
        """The group of the longest matching name suffix, if any."""
        for suffix, group in self._suffixes:
            if qname.is_subdomain(suffix):
                return group
        return None

    def address_group(self, address: Address, qname: dns.name.Name) -> Group:
        """The group of one address: longest CIDR, else the name's suffix, else the default."""
        for network, group in self._networks:
            if network.version == address.version and address in network:
                return group
        by_name = self.name_group(qname)
        return by_name if by_name is not None else self.config.default

    def group_for(self, qname: dns.name.Name, addresses: Sequence[Address]) -> Group:
        """The answer's group: the strictest among its (non-exempt) addresses."""
        relevant = [a for a in addresses if not self.is_exempt(a)]
        if not relevant:
            by_name = self.name_group(qname)
            return by_name if by_name is not None else self.config.default
        return max((self.address_group(a, qname) for a in relevant), key=lambda g: g.strictness)

    def decide(
        self,
        qname: dns.name.Name,
        addresses: Sequence[Address],
        address_verdict: Verdict,
        keys: KeyEvidence | None,
    ) -> Decision:
        """The decision table of DESIGN.md.

        Args:
            qname: the owner of the addresses (the end of any CNAME chain).
            addresses: the addresses in the answer (empty for NODATA/NXDOMAIN).
            address_verdict: the address answer's verdict.
            keys: the IPSECKEY evidence; None when it was not waited for (allowed only when
                `group_for(...)` does not `wants_keys`; otherwise treated as UNPROVABLE).
        """
        if address_verdict.security in (Security.BOGUS, Security.INDETERMINATE):
            ede = address_verdict.ede
            if ede is None:
                ede = EDE_BOGUS if address_verdict.security is Security.BOGUS else EDE_INDETERMINATE
            return Refuse(None, ede, f"address {address_verdict.security.value}: "
                                     f"{address_verdict.reason}")
        targets = tuple(a for a in addresses if not self.is_exempt(a))
        group = self.group_for(qname, addresses)
        if addresses and not targets:
            return AnswerClear(group, "own address or loopback: never tunnelled")
        if group is Group.BLOCK:
            return Refuse(group, EDE_BLOCKED, "destination blocked by policy", drop=targets)
        if group is Group.CLEAR:
            return AnswerClear(group, "clear by policy")
        if not targets:
            return AnswerClear(group, "no address to protect")  # NODATA / NXDOMAIN pass through
        if keys is None:
            keys = KeyEvidence(KeyStatus.UNPROVABLE, reason="IPSECKEY not looked up",
                               ede=EDE_INDETERMINATE)
        return self._decide_keys(group, targets, keys)

    def _decide_keys(self, group: Group, targets: tuple[Address, ...], ev: KeyEvidence) -> Decision:
        private = group is Group.PRIVATE
        if ev.status in (KeyStatus.BOGUS, KeyStatus.UNPROVABLE):
            ede = ev.ede if ev.ede is not None else EDE_BOGUS
            return Refuse(group, ede, ev.reason or f"IPSECKEY {ev.status.value}")
        if ev.status in (KeyStatus.ABSENT, KeyStatus.UNUSABLE):
            if private:
                why = ("no IPSECKEY for private destination" if ev.status is KeyStatus.ABSENT
                       else "no usable IPSECKEY for private destination")
                return Refuse(group, EDE_NO_KEY, why, drop=targets)
            return AnswerClear(group, f"{ev.reason or ev.status.value}: clear")
        if group is Group.CLEAR_OR_PRIVATE:
            return AnswerClear(group, "clear-or-private: peers may start tunnels to us")
        return Tunnel(
            group=group,
            destinations=targets,
            keys=ev.keys,
            drop_while_negotiating=private,
            fail_closed=private or self.config.strict,
            reason=ev.reason or "secure IPSECKEY",
        )

    def after_setup_failure(self, tunnel: Tunnel, failure: SetupFailure, detail: str) -> Decision:
        """The last columns of the decision table: what a failed `Tunnel` becomes.

        An address bound to another name's key is SERVFAIL in every group, without a shunt:
        answering it "in clear" would in fact send the traffic through the tunnel keyed for
        the other name, and a shunt would cut that tunnel.
        """
        text = f"{_FAILURE_TEXT[failure]}: {detail}" if detail else _FAILURE_TEXT[failure]
        if failure is SetupFailure.ADDRESS_BOUND:
            return Refuse(tunnel.group, _FAILURE_EDE[failure], text)
        if tunnel.fail_closed:
            drop = tunnel.destinations if tunnel.group is Group.PRIVATE else ()
            return Refuse(tunnel.group, _FAILURE_EDE[failure], text, drop=drop)
        return AnswerClear(tunnel.group, f"{text}: answered in clear (strict = false)",
                           after_failure=True)


def classify(exc: ProvisioningError) -> SetupFailure:
    """The decision-table category of a provisioning failure."""
    if isinstance(exc, TunnelTimeout):
        return SetupFailure.TIMEOUT
    if isinstance(exc, IkeDaemonUnreachable):
        return SetupFailure.DAEMON_UNREACHABLE
    if isinstance(exc, StateUnrecorded):
        return SetupFailure.UNRECORDED
    if isinstance(exc, AddressBound):
        return SetupFailure.ADDRESS_BOUND
    return SetupFailure.REJECTED
