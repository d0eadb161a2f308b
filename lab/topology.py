"""The lab's topology as data: hosts, addresses, zones and the records in them.

Theory of operation: everything the lab builds is derived from the constants in this module,
so tests and other helpers import names and addresses from here instead of repeating literals.
Nothing here does I/O; `lab.net`, `lab.dns` and `lab.ike` turn this data into namespaces,
zone files and charon configuration.

Layout (one L2 segment on a bridge inside the lab's own switch namespace):

    198.51.100.0/24, 2001:db8:100::/64
      .2  ns-root     root "."                         (NSEC, dnssec-signzone)
      .3  ns-test     "test."                          (NSEC3 no salt, 0 iterations)
      .4  ns-example  "example.test."                  (named dnssec-policy, dynamic, TSIG)
      .5  ns-broken   badsig/expired/wrongds/unsigned.test., and dead-ns/lame-ns.test. (zones
                      whose NS sets hold a dead and lame servers, for iterative resolution)
      .249            nothing: the dead name server of dead-ns.test.
      .53 unbound     validating recursive, anchored at the lab root
      .10 alice  .11 bob  .12 carol  .13 dave  .20 gw   (each runs a charon)
      .30 plain  (no IPSECKEY, no charon)
    203.0.113.0/24, 2001:db8:113::/64 behind gw (gw .1, srv .21) on a veth of its own.

IPv6 host parts use the same digits as the IPv4 ones (alice = 2001:db8:100::10).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

LAN_V4: Final = "198.51.100.0/24"
LAN_V6: Final = "2001:db8:100::/64"
SRV_NET_V4: Final = "203.0.113.0/24"
SRV_NET_V6: Final = "2001:db8:113::/64"
SRV_V4: Final = "203.0.113.21"
SRV_V6: Final = "2001:db8:113::21"
# charon's routing table (and the priority of its rule "not fwmark 0x42 lookup 220"); gw's
# traffic-selector anchors (see Host.ts_anchors) live in it too.
CHARON_TABLE: Final = 220
# Routed to a blackhole in the host namespace while any lab instance is up, so that a packet
# addressed to the lab from outside it can never leave the machine.
BLACKHOLE_PREFIXES: Final = ("198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")

# Where nothing listens: the "dead" name server of dead-ns.test. (no host has it).
DEAD_NS_V4: Final = "198.51.100.249"
DEAD_NS_V6: Final = "2001:db8:100::249"
# An NXNSAttack-style delegation in test.: nxns.test. has this many NS names, none of which
# exists (nxns-<i>.example.test.); a resolver must give up within its limits.
NXNS_NAMES: Final = 24

DOMAIN: Final = "example.test."
DEFAULT_TTL: Final = 60
# SOA minimum: the negative-caching TTL; short so that names added by tests appear quickly.
NEGATIVE_TTL: Final = 5


class KeyKind(enum.Enum):
    """The kind of key behind a host's IPSECKEY; the value is the IPSECKEY algorithm number."""

    RSA2048 = 2  # RFC 4025: RSA, key field in RFC 3110 format
    ECDSA_P256 = 3  # RFC 8005 / 9373: ECDSA, X||Y
    ED25519 = 4  # RFC 9373: EdDSA, raw 32-byte public key


class Role(enum.Enum):
    """What a lab namespace is for."""

    DNS = "dns"  # an authoritative named
    RESOLVER = "resolver"  # the validating Unbound
    PEER = "peer"  # runs a charon; has an IPSECKEY
    PLAIN = "plain"  # a client with no IPSec
    SERVER = "server"  # lives behind gw on its own segment


@dataclass(frozen=True, slots=True)
class Link:
    """A point-to-point veth from a host to another host (not the LAN bridge)."""

    peer: str  # the other host
    ifname: str  # this end's interface name
    v4: str  # this end's address, with prefix length
    v6: str


@dataclass(frozen=True, slots=True)
class Route:
    """A static route inside a host namespace (never a default route)."""

    prefix: str
    via: str


@dataclass(frozen=True, slots=True)
class Host:
    """One network namespace of the lab."""

    name: str
    role: Role
    v4: str  # main address (LAN, or the srv segment for srv)
    v6: str
    on_lan: bool = True
    key: KeyKind | None = None  # key behind the published IPSECKEY (peers only)
    charon: bool = False
    links: tuple[Link, ...] = ()
    routes: tuple[Route, ...] = ()
    forwarding: bool = False
    # Extra traffic selectors this host offers as an IKE responder (gw: the net behind it).
    local_ts: tuple[str, ...] = ()
    # Single addresses behind this host that a peer may ask for as the whole local TS
    # (RFC 4025 gateway: the IPSECKEY of srv vouches for srv's /32 only). kernel-libipsec in
    # strongSwan 5.9.8 refuses a CHILD_SA whose local TS holds none of the host's own addresses
    # (fixed in 5.9.12); lab.net gives the host these addresses in a way that only charon sees
    # (see lab/README.md, "Gateway for a single host").
    ts_anchors: tuple[str, ...] = ()

    @property
    def fqdn(self) -> str:
        """The host's DNS name, also its IKE identity (no trailing dot)."""
        return f"{self.name}.{DOMAIN}".rstrip(".")


def _lan(last: int) -> tuple[str, str]:
    return f"198.51.100.{last}", f"2001:db8:100::{last}"


def _host(name: str, role: Role, last: int, **kw: object) -> Host:
    v4, v6 = _lan(last)
    return Host(name, role, v4, v6, **kw)  # type: ignore[arg-type]


HOSTS: Final[dict[str, Host]] = {
    h.name: h
    for h in (
        _host("ns-root", Role.DNS, 2),
        _host("ns-test", Role.DNS, 3),
        _host("ns-example", Role.DNS, 4),
        _host("ns-broken", Role.DNS, 5),
        _host("unbound", Role.RESOLVER, 53),
        _host("alice", Role.PEER, 10, key=KeyKind.ED25519, charon=True),
        _host("bob", Role.PEER, 11, key=KeyKind.ED25519, charon=True),
        _host("carol", Role.PEER, 12, key=KeyKind.RSA2048, charon=True),
        _host("dave", Role.PEER, 13, key=KeyKind.ECDSA_P256, charon=True),
        _host(
            "gw",
            Role.PEER,
            20,
            key=KeyKind.ED25519,
            charon=True,
            forwarding=True,
            links=(Link("srv", "eth1", "203.0.113.1/24", "2001:db8:113::1/64"),),
            local_ts=(SRV_NET_V4, SRV_NET_V6),
            ts_anchors=(f"{SRV_V4}/32", f"{SRV_V6}/128"),
        ),
        _host("plain", Role.PLAIN, 30),
        Host(
            "srv",
            Role.SERVER,
            SRV_V4,
            SRV_V6,
            on_lan=False,
            links=(Link("gw", "eth0", f"{SRV_V4}/24", f"{SRV_V6}/64"),),
            routes=(Route(LAN_V4, "203.0.113.1"), Route(LAN_V6, "2001:db8:113::1")),
        ),
    )
}

PEERS: Final = tuple(h.name for h in HOSTS.values() if h.charon)
UNBOUND: Final = HOSTS["unbound"]


# --- DNS -----------------------------------------------------------------------------------


class Signing(enum.Enum):
    """How a zone is signed (or deliberately broken)."""

    NSEC = "nsec"  # dnssec-signzone, NSEC chain
    NSEC3 = "nsec3"  # dnssec-signzone -3 - -H 0 (no salt, 0 iterations)
    POLICY = "policy"  # named signs it (dnssec-policy, inline-signing), TSIG dynamic updates
    BAD_SIG = "badsig"  # signed, then the RRSIG over one RRset is corrupted
    EXPIRED = "expired"  # signed with inception and expiration in the past
    WRONG_DS = "wrongds"  # signed, but the parent's DS matches no key of the zone
    UNSIGNED = "unsigned"  # no keys, no DS in the parent: provably insecure


@dataclass(frozen=True, slots=True)
class AddressRecords:
    """A (and AAAA) records at `owner` with the addresses of `host` (or explicit ones)."""

    owner: str  # relative to the zone origin
    host: str


@dataclass(frozen=True, slots=True)
class IpseckeyRecord:
    """An IPSECKEY at `owner` carrying the public key of `key_host`.

    gateway: None (no gateway, the owner's address is the peer), an IPv4/IPv6 address, or a
    fully qualified name ending in a dot.
    """

    owner: str
    key_host: str
    precedence: int = 10
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class TextRecord:
    """Any other record, as zone-file text after the owner (e.g. "TXT \\"hello\\"")."""

    owner: str
    text: str


ZoneRecord = AddressRecords | IpseckeyRecord | TextRecord


@dataclass(frozen=True, slots=True)
class ExtraNs:
    """Another NS name of a zone besides `Zone.ns_name`, served at the given addresses.

    The name must lie in the zone (in-domain): the zone gets its A/AAAA records and the parent
    its glue. Pointing it at an address where nobody listens makes a dead server; at a named
    that does not serve the zone, a lame one.
    """

    name: str  # fully qualified
    v4: str
    v6: str


@dataclass(frozen=True, slots=True)
class Zone:
    """One zone of the private hierarchy."""

    name: str  # fully qualified, trailing dot ("." for the root)
    server: str  # host serving it
    signing: Signing
    parent: str | None
    ns_name: str  # the zone's NS target (fully qualified)
    template: str  # file in zones/
    records: tuple[ZoneRecord, ...] = ()
    # For BAD_SIG: the (owner, type) whose RRSIG gets corrupted after signing.
    corrupt: tuple[str, str] | None = None
    extra_ns: tuple[ExtraNs, ...] = ()

    @property
    def file_stem(self) -> str:
        """A file-name-safe name for the zone ("root" for ".")."""
        return "root" if self.name == "." else self.name.rstrip(".")


def _peer_records() -> tuple[ZoneRecord, ...]:
    out: list[ZoneRecord] = []
    for h in HOSTS.values():
        if h.role in (Role.PEER, Role.PLAIN):
            out.append(AddressRecords(h.name, h.name))
        if h.key is not None:
            out.append(IpseckeyRecord(h.name, h.name))
    return tuple(out)


_BROKEN_HOST: Final = (AddressRecords("host", "bob"), IpseckeyRecord("host", "bob"))


def _at(name: str, host: str) -> ExtraNs:
    return ExtraNs(name, HOSTS[host].v4, HOSTS[host].v6)


# NS names of nxns.test. (see NXNS_NAMES): they do not exist, so resolving them is pure cost.
_NXNS_DELEGATION: Final = tuple(TextRecord("nxns", f"NS nxns-{i}.{DOMAIN}")
                                for i in range(NXNS_NAMES))

ZONES: Final[dict[str, Zone]] = {
    z.name: z
    for z in (
        Zone(
            ".",
            "ns-root",
            Signing.NSEC,
            None,
            "a.root-servers.lab.",
            "root.zone.in",
            (AddressRecords("a.root-servers.lab.", "ns-root"),),
        ),
        Zone(
            "test.",
            "ns-test",
            Signing.NSEC3,
            ".",
            "ns1.test.",
            "test.zone.in",
            (AddressRecords("ns1", "ns-test"), AddressRecords("ns-broken", "ns-broken"),
             *_NXNS_DELEGATION),
        ),
        Zone(
            DOMAIN,
            "ns-example",
            Signing.POLICY,
            "test.",
            "ns.example.test.",
            "example.test.zone.in",
            (
                AddressRecords("ns", "ns-example"),
                *_peer_records(),
                AddressRecords("srv", "srv"),
                IpseckeyRecord("srv", "gw", gateway="198.51.100.20"),
                AddressRecords("srv-byname", "srv"),
                IpseckeyRecord("srv-byname", "gw", gateway="gw.example.test."),
                AddressRecords("multi", "bob"),
                IpseckeyRecord("multi", "bob", precedence=10),
                IpseckeyRecord("multi", "carol", precedence=20),
                IpseckeyRecord("multi", "dave", precedence=30),
                # alice's key under a name whose address is carol's: an initiator that holds
                # the key but comes from elsewhere ([responder] match_address, issue 11)
                AddressRecords("elsewhere", "carol"),
                IpseckeyRecord("elsewhere", "alice"),
            ),
        ),
        Zone(
            "badsig.test.",
            "ns-broken",
            Signing.BAD_SIG,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
            corrupt=("host.badsig.test.", "IPSECKEY"),
        ),
        Zone(
            "expired.test.",
            "ns-broken",
            Signing.EXPIRED,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
        ),
        Zone(
            "wrongds.test.",
            "ns-broken",
            Signing.WRONG_DS,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
        ),
        Zone(
            "unsigned.test.",
            "ns-broken",
            Signing.UNSIGNED,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
        ),
        # Signed and correct, but one of the two name servers is dead (nothing listens).
        Zone(
            "dead-ns.test.",
            "ns-broken",
            Signing.NSEC,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
            extra_ns=(ExtraNs("ns-dead.dead-ns.test.", DEAD_NS_V4, DEAD_NS_V6),),
        ),
        # Signed and correct, but one of the two name servers is lame: ns-example's named
        # answers REFUSED (it does not serve the zone). (A lame server that refers back to the
        # zone itself, ns-test's named, made the lab Unbound, our oracle, fail now and then:
        # "no NSEC3 records ... for DS"; that case is covered by tests/test_iterate.py.)
        Zone(
            "lame-ns.test.",
            "ns-broken",
            Signing.NSEC,
            "test.",
            "ns-broken.test.",
            "broken.zone.in",
            _BROKEN_HOST,
            extra_ns=(_at("ns-refused.lame-ns.test.", "ns-example"),),
        ),
    )
}

TSIG_KEY_NAME: Final = "ddns-key"


def _host_at(addr: str) -> str | None:
    """The LAN host whose (topology) address is `addr`."""
    return next((h.name for h in HOSTS.values() if addr in (h.v4, h.v6)), None)


def ike_identities(host: str) -> tuple[str, ...]:
    """The IKE identities `host` answers to as a responder: its FQDN first, then every other
    identity a resolver binds the host's key to when it reads the secure example.test zone.

    A resolver binds an IPSECKEY's key to: the owner name when there is no gateway (the peer is
    the owner's address), the gateway name, or the gateway address (RFC 4025 says where, not
    who, so the address is the identity). The host accepts such an identity only if the key
    is its own and (no gateway) the owner's address is its address: multi.example.test (bob's
    address, bob's key at precedence 10) -> bob; srv's "10 1 4 198.51.100.20" -> gw. The broken
    zones are left out on purpose: a tunnel keyed from a bogus or insecure answer must fail.
    """
    h = HOSTS[host]
    ids = [h.fqdn]
    zone = ZONES[DOMAIN]
    addressed = {r.owner: r.host for r in zone.records if isinstance(r, AddressRecords)}
    for r in zone.records:
        if not isinstance(r, IpseckeyRecord) or r.key_host != host:
            continue
        if r.gateway is None:
            ident = f"{r.owner}.{DOMAIN}".rstrip(".") if addressed.get(r.owner) == host else None
        elif r.gateway.endswith("."):
            ident = r.gateway.rstrip(".") if r.gateway.rstrip(".") == h.fqdn else None
        else:
            ident = r.gateway if _host_at(r.gateway) == host else None
        if ident is not None and ident not in ids:
            ids.append(ident)
    return tuple(ids)


@dataclass(frozen=True, slots=True)
class Expectation:
    """What a validating resolver must say about a name (used by smoke tests and the demo)."""

    qname: str
    rdtype: str
    rcode: str  # "NOERROR" / "SERVFAIL"
    ad: bool
    note: str = field(default="", compare=False)


EXPECTATIONS: Final = (
    Expectation("bob.example.test.", "IPSECKEY", "NOERROR", True, "secure Ed25519 key"),
    Expectation("carol.example.test.", "IPSECKEY", "NOERROR", True, "secure RSA key"),
    Expectation("dave.example.test.", "IPSECKEY", "NOERROR", True, "secure ECDSA key"),
    Expectation("host.badsig.test.", "IPSECKEY", "SERVFAIL", False, "corrupted RRSIG"),
    Expectation("host.badsig.test.", "A", "NOERROR", True, "A still valid"),
    Expectation("host.expired.test.", "IPSECKEY", "SERVFAIL", False, "expired RRSIGs"),
    Expectation("host.wrongds.test.", "IPSECKEY", "SERVFAIL", False, "DS matches no key"),
    Expectation("host.unsigned.test.", "IPSECKEY", "NOERROR", False, "insecure zone"),
)
