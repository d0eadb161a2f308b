"""Zones signed at test time, and an in-memory upstream that answers like a recursive resolver.

``build_world()`` signs a small hierarchy with Ed25519 keys at a pinned clock ``WHEN``:

    .                      root (the test trust anchor is its KSK's DS)
    test.                  NSEC; delegates every zone below
    example.test.          NSEC: www, host, *.wild, a.b (b is an empty non-terminal), CNAMEs,
                           a CNAME loop, a DNAME (dn -> example.test.), *.wc CNAME
    nsec3.test.            NSEC3 (salt aabb, 0 iterations) with an unsigned delegation "unsig";
                           same names as example.test
    optout.test.           NSEC3 with Opt-Out and an unsigned delegation "unsig"
    iter.test.             NSEC3 with 200 iterations
    unsigned.test.         insecure delegation (NS, no DS)
    wrongds.test.          its DS matches no key
    algo.test.             its only DS has algorithm 12 (ECC-GOST, unsupported)
    keytrap.test.          40 DNSKEYs sharing one key tag, and 40 bogus RRSIGs on www

``Upstream.fetch`` is the validator's ``Fetch``: it picks the deepest zone for a name (the
parent for DS at a cut), answers from it with RRSIGs and NSEC/NSEC3 proofs, follows CNAME and
DNAME chains, and applies per-question ``mutate`` hooks that tests use to break replies.
NSEC3 chains are built by hand (``dns.dnssec.sign_zone`` does NSEC only).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives.asymmetric import ed25519
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from resolver.errors import UpstreamError
from resolver.validator.anchors import TrustAnchors
from resolver.validator.response import Limits, ValidatedAnswer, Validator

WHEN = 1_790_000_000.0  # 2026-09-21, pinned clock of every test
INCEPTION = int(WHEN - 86400)
EXPIRATION = int(WHEN + 30 * 86400)
N = dns.name.from_text
IN = dns.rdataclass.IN
T = dns.rdatatype


@dataclass
class Key:
    private: ed25519.Ed25519PrivateKey
    dnskey: DNSKEY

    @property
    def tag(self) -> int:
        return dns.dnssec.key_id(self.dnskey)


def new_key(flags: int = 256) -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    return Key(private, dns.dnssec.make_dnskey(private.public_key(), 15, flags=flags))


def sign(rrset: dns.rrset.RRset, key: Key, signer: dns.name.Name, *,
         inception: float = INCEPTION, expiration: float = EXPIRATION,
         sign_as: dns.name.Name | None = None) -> dns.rrset.RRset:
    """RRSIG RRset for ``rrset``; ``sign_as`` signs as if the owner were that (wildcard) name."""
    target = rrset
    if sign_as is not None:
        target = dns.rrset.RRset(sign_as, rrset.rdclass, rrset.rdtype)
        target.update(rrset)
    sig = dns.dnssec.sign(target, key.private, signer, key.dnskey, inception=int(inception),
                          expiration=int(expiration))
    out = dns.rrset.RRset(rrset.name, rrset.rdclass, T.RRSIG, rrset.rdtype)
    out.update_ttl(rrset.ttl)
    out.add(sig)
    return out


def rr(name: str | dns.name.Name, rdtype: str, *rdatas: str, ttl: int = 3600,
       origin: dns.name.Name = dns.name.root) -> dns.rrset.RRset:
    owner = name if isinstance(name, dns.name.Name) else N(name)
    return dns.rrset.from_text_list(owner, ttl, IN, rdtype, list(rdatas), origin=origin,
                                    relativize=False)


def b32(digest: bytes) -> str:
    return base64.b32hexencode(digest).decode().lower()


def nsec3_raw(name: dns.name.Name, salt: bytes, iterations: int) -> bytes:
    return base64.b32hexdecode(dns.dnssec.nsec3_hash(name, salt, iterations, 1))


class Zone:
    """One zone: records, keys, signatures and its NSEC or NSEC3 chain."""

    def __init__(self, origin: str, records: list[dns.rrset.RRset], *, denial: str = "nsec",
                 iterations: int = 0, salt: bytes = b"", optout: bool = False,
                 signed: bool = True) -> None:
        self.origin = N(origin)
        self.denial, self.iterations, self.salt, self.optout = denial, iterations, salt, optout
        self.signed = signed
        self.ksk, self.zsk = new_key(257), new_key(256)
        self.rrsets: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self.sigs: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        ns = dns.name.Name(("ns", *self.origin.labels)).to_text()
        admin = dns.name.Name(("admin", *self.origin.labels)).to_text()
        self.add(rr(self.origin, "SOA", f"{ns} {admin} 1 3600 600 86400 300"))
        self.add(rr(self.origin, "NS", ns))
        for r in records:
            self.add(r)
        self.nsec3: list[tuple[bytes, dns.rrset.RRset]] = []

    @classmethod
    def from_signed(cls, path: str, origin: str) -> Zone:
        """A zone signed by another signer (BIND's dnssec-signzone), served as it is."""
        import dns.zone

        zone = cls.__new__(cls)
        zone.origin, zone.signed, zone.optout = N(origin), True, False
        zone.rrsets, zone.sigs, zone.nsec3 = {}, {}, []
        zone.denial, zone.salt, zone.iterations = "nsec", b"", 0
        parsed = dns.zone.from_file(path, origin, relativize=False)
        for name, node in parsed.nodes.items():
            for rds in node.rdatasets:
                rrset = dns.rrset.RRset(name, IN, rds.rdtype, rds.covers)
                rrset.update(rds)
                if rds.rdtype == T.RRSIG:
                    zone.sigs[(name, rds.covers)] = rrset
                elif rds.rdtype == T.NSEC3:
                    first = rds[0]
                    zone.denial, zone.salt, zone.iterations = "nsec3", first.salt, first.iterations
                    zone.nsec3.append((base64.b32hexdecode(name.labels[0].upper()), rrset))
                else:
                    zone.rrsets[(name, rds.rdtype)] = rrset
        zone.nsec3.sort(key=lambda item: item[0])
        return zone

    def add(self, r: dns.rrset.RRset) -> None:
        self.rrsets[(r.name, r.rdtype)] = r

    def delegate(self, child: Zone, ds: list[str] | None = None, secure: bool = True) -> None:
        self.add(rr(child.origin, "NS", f"ns.{child.origin}"))
        if ds is not None:
            self.add(rr(child.origin, "DS", *ds))
        elif secure:
            made = dns.dnssec.make_ds(child.origin, child.ksk.dnskey, "SHA256")
            self.add(rr(child.origin, "DS", made.to_text()))

    # -- structure -------------------------------------------------------------------------

    def cuts(self) -> set[dns.name.Name]:
        return {n for (n, t) in self.rrsets if t == T.NS and n != self.origin}

    def names(self) -> set[dns.name.Name]:
        return {n for (n, _) in self.rrsets}

    def types_at(self, name: dns.name.Name) -> list[int]:
        return sorted(t for (n, t) in self.rrsets if n == name)

    def authoritative(self, name: dns.name.Name, rdtype: int) -> bool:
        if name in self.cuts():
            return rdtype in (T.DS, T.NSEC)
        return True

    def finish(self) -> Zone:
        """Add DNSKEYs, sign everything, build the denial chain."""
        if not self.signed:
            return self
        self.add(dns.rrset.from_rdata_list(self.origin, 3600, [self.ksk.dnskey,
                                                                 self.zsk.dnskey]))
        if self.denial == "nsec":
            self._nsec_chain()
        else:
            self._nsec3_chain()
        for (name, rdtype), rrset in list(self.rrsets.items()):
            if not self.authoritative(name, rdtype):
                continue
            key = self.ksk if rdtype == T.DNSKEY else self.zsk
            self.sigs[(name, rdtype)] = sign(rrset, key, self.origin)
        for _, n3 in self.nsec3:
            self.sigs[(n3.name, T.NSEC3)] = sign(n3, self.zsk, self.origin)
        return self

    def _nsec_chain(self) -> None:
        names = sorted(self.names())
        for i, name in enumerate(names):
            nxt = names[(i + 1) % len(names)]
            types = {dns.rdatatype.to_text(t) for t in self.types_at(name)
                     if self.authoritative(name, t) or t == T.NS} | {"NSEC", "RRSIG"}
            self.add(rr(name, "NSEC", f"{nxt} {' '.join(sorted(types))}", ttl=300))

    def _nsec3_chain(self) -> None:
        names = set()
        for name in self.names():
            if self.optout and name in self.cuts() and (name, T.DS) not in self.rrsets:
                continue  # Opt-Out: unsigned delegations get no NSEC3
            names.add(name)
            while name != self.origin:  # empty non-terminals get NSEC3s too
                name = name.parent()
                names.add(name)
        hashed = sorted((nsec3_raw(n, self.salt, self.iterations), n) for n in names)
        flags = 1 if self.optout else 0
        salt = self.salt.hex() or "-"
        for i, (h, name) in enumerate(hashed):
            nxt = hashed[(i + 1) % len(hashed)][0]
            types = [dns.rdatatype.to_text(t) for t in self.types_at(name)]
            if types and name not in self.cuts():
                types.append("RRSIG")
            elif (name, T.DS) in self.rrsets:
                types.append("RRSIG")
            text = f"1 {flags} {self.iterations} {salt} {b32(nxt).upper()} {' '.join(types)}"
            owner = dns.name.Name((b32(h), *self.origin.labels))
            self.nsec3.append((h, rr(owner, "NSEC3", text, ttl=300)))

    # -- answering -------------------------------------------------------------------------

    def _with_sig(self, name: dns.name.Name, rdtype: int) -> list[dns.rrset.RRset]:
        out = [self.rrsets[(name, rdtype)]]
        if (name, rdtype) in self.sigs:
            out.append(self.sigs[(name, rdtype)])
        return out

    def _exists(self, name: dns.name.Name) -> bool:
        return any(n.is_subdomain(name) for n in self.names())

    def _cover_nsec(self, name: dns.name.Name) -> list[dns.rrset.RRset]:
        if not self.signed:
            return []
        if self.denial == "nsec":
            owners = sorted(n for n in self.names() if (n, T.NSEC) in self.rrsets)
            before = [n for n in owners if n < name] or [owners[-1]]
            return self._with_sig(before[-1], T.NSEC)
        h = nsec3_raw(name, self.salt, self.iterations)
        before = [r for r in self.nsec3 if r[0] < h] or [self.nsec3[-1]]
        n3 = before[-1][1]
        return [n3, self.sigs[(n3.name, T.NSEC3)]]

    def _match_nsec(self, name: dns.name.Name) -> list[dns.rrset.RRset]:
        if not self.signed:
            return []
        if self.denial == "nsec":
            return self._with_sig(name, T.NSEC)
        h = nsec3_raw(name, self.salt, self.iterations)
        for rh, n3 in self.nsec3:
            if rh == h:
                return [n3, self.sigs[(n3.name, T.NSEC3)]]
        return []

    def _encloser(self, name: dns.name.Name) -> dns.name.Name:
        ce = name.parent()
        while not self._exists(ce):
            ce = ce.parent()
        return ce

    def _ce_proof(self, name: dns.name.Name) -> tuple[dns.name.Name, list[dns.rrset.RRset]]:
        ce = self._encloser(name)
        if self.denial == "nsec":
            return ce, self._cover_nsec(name)
        next_closer = name.split(len(ce) + 1)[1]
        return ce, self._match_nsec(ce) + self._cover_nsec(next_closer)

    def answer(self, name: dns.name.Name, rdtype: int
               ) -> tuple[int, list[dns.rrset.RRset], list[dns.rrset.RRset]]:
        soa = self._with_sig(self.origin, T.SOA)
        if (name, rdtype) in self.rrsets:
            return dns.rcode.NOERROR, self._with_sig(name, rdtype), []
        if (name, T.CNAME) in self.rrsets:
            return dns.rcode.NOERROR, self._with_sig(name, T.CNAME), []
        if self._exists(name):  # NODATA, possibly at an empty non-terminal
            if name in self.names() or self.denial == "nsec3":
                proof = self._match_nsec(name) or self._ce_proof(name)[1]
            else:
                proof = self._cover_nsec(name)
            return dns.rcode.NOERROR, [], soa + proof
        for owner, t in self.rrsets:
            if t == T.DNAME and name.is_subdomain(owner):
                target = name.relativize(owner).concatenate(self.rrsets[(owner, t)][0].target)
                cname = rr(name, "CNAME", target.to_text(), ttl=self.rrsets[(owner, t)].ttl)
                return dns.rcode.NOERROR, [*self._with_sig(owner, T.DNAME), cname], []
        ce, proof = self._ce_proof(name)
        wild = dns.name.Name(("*", *ce.labels))
        for t in (rdtype, T.CNAME):
            if (wild, t) in self.rrsets:
                data = dns.rrset.RRset(name, IN, t)
                data.update(self.rrsets[(wild, t)])
                sig = dns.rrset.RRset(name, IN, T.RRSIG, t)
                sig.update(self.sigs[(wild, t)])
                cover = proof[-2:] if self.denial == "nsec3" else proof
                return dns.rcode.NOERROR, [data, sig], cover
        if self._exists(wild):  # wildcard NODATA
            return dns.rcode.NOERROR, [], soa + proof + self._match_nsec(wild)
        return dns.rcode.NXDOMAIN, [], soa + _dedupe(proof + self._cover_nsec(wild))


def _dedupe(rrsets: list[dns.rrset.RRset]) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    for r in rrsets:
        if not any(o.name == r.name and o.rdtype == r.rdtype and o.covers == r.covers
                   for o in out):
            out.append(r)
    return out


Mutator = Callable[[dns.message.Message], dns.message.Message]


@dataclass
class Upstream:
    """The in-memory recursive resolver behind the validator's ``Fetch``."""

    zones: dict[dns.name.Name, Zone]
    mutate: dict[tuple[dns.name.Name, int], Mutator] = field(default_factory=dict)
    fail: set[tuple[dns.name.Name, int]] = field(default_factory=set)
    calls: list[tuple[dns.name.Name, int]] = field(default_factory=list)

    def zone_for(self, name: dns.name.Name, rdtype: int) -> Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if not name.is_subdomain(origin):
                continue
            if rdtype == T.DS and name == origin and origin != dns.name.root:
                continue  # DS is answered by the parent
            if best is None or len(origin) > len(best.origin):
                best = zone
        return best

    def resolve(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, want_dnssec=True)
        query.flags |= dns.flags.CD
        msg = dns.message.make_response(query)
        current = name
        for _ in range(14):
            zone = self.zone_for(current, rdtype)
            if zone is None:
                msg.set_rcode(dns.rcode.SERVFAIL)
                return msg
            rcode, answer, authority = zone.answer(current, rdtype)
            msg.answer += [a for a in answer if a not in msg.answer]
            msg.set_rcode(rcode)
            last = answer[-1] if answer and answer[-1].rdtype != T.RRSIG else \
                (answer[-2] if len(answer) > 1 else None)
            msg.authority += [a for a in authority if a not in msg.authority]
            if last is None or last.rdtype != T.CNAME or rdtype == T.CNAME:
                return msg
            current = last[0].target
        return msg

    async def fetch(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
                    ) -> dns.message.Message:
        self.calls.append((name, rdtype))
        if (name, rdtype) in self.fail:
            raise UpstreamError(f"timeout for {name}/{dns.rdatatype.to_text(rdtype)}")
        msg = self.resolve(name, rdtype)
        hook = self.mutate.get((name, rdtype))
        return hook(msg) if hook else msg


def _records(origin: str, lines: list[str]) -> list[dns.rrset.RRset]:
    out: dict[tuple[dns.name.Name, str], list[str]] = {}
    for line in lines:
        owner, rdtype, rdata = line.split(None, 2)
        name = N(owner, N(origin)) if owner != "@" else N(origin)
        out.setdefault((name, rdtype), []).append(rdata)
    return [rr(n, t, *rds, origin=N(origin)) for (n, t), rds in out.items()]


COMMON = [
    "www A 192.0.2.1", "www AAAA 2001:db8::1", "host A 192.0.2.2", "host TXT \"key\"",
    "*.wild A 192.0.2.3", "a.b A 192.0.2.4", "alias CNAME www", "loop1 CNAME loop2",
    "loop2 CNAME loop1", "*.wc CNAME www",
]


@dataclass
class World:
    zones: dict[dns.name.Name, Zone]
    anchors: TrustAnchors

    def upstream(self) -> Upstream:
        return Upstream(dict(self.zones))

    def __getitem__(self, origin: str) -> Zone:
        return self.zones[N(origin)]


def keytrap_zone(count: int = 40) -> Zone:
    """Many DNSKEYs sharing the ZSK's key tag, and many bogus RRSIGs with that tag on www."""
    zone = Zone("keytrap.test.", _records("keytrap.test.", ["www A 192.0.2.9"]))
    zone.finish()
    tag = zone.zsk.tag
    keys = [zone.ksk.dnskey, zone.zsk.dnskey]
    while len(keys) < count:
        keys.append(_key_with_tag(tag))
    dnskeys = dns.rrset.from_rdata_list(zone.origin, 3600, keys)
    zone.add(dnskeys)
    zone.sigs[(zone.origin, T.DNSKEY)] = sign(dnskeys, zone.ksk, zone.origin)
    www = zone.rrsets[(N("www.keytrap.test."), T.A)]
    good = zone.sigs[(www.name, T.A)][0]
    bad = dns.rrset.RRset(www.name, IN, T.RRSIG, T.A)
    bad.update_ttl(www.ttl)
    for _ in range(count):
        bad.add(good.replace(signature=os.urandom(64)))
    zone.sigs[(www.name, T.A)] = bad
    return zone


def _key_with_tag(tag: int) -> DNSKEY:
    """A 32-byte 'Ed25519' key (often not even a valid point) whose key tag is ``tag``.

    The key tag is a 16-bit folded sum over the rdata (RFC 4034 App. B), so the last two key
    bytes can be solved for; ``k`` is the end-around carry (the high half of the sum).
    """
    while True:
        body = bytearray(os.urandom(32))
        body[30] = body[31] = 0
        wire = DNSKEY(IN, T.DNSKEY, 256, 3, 15, bytes(body)).to_digestable()
        base = sum((b << 8) if i % 2 == 0 else b for i, b in enumerate(wire))
        for x in {(tag - base - k) % 65536 for k in range(64)}:
            body[30], body[31] = x >> 8, x & 0xFF
            key = DNSKEY(IN, T.DNSKEY, 256, 3, 15, bytes(body))
            if dns.dnssec.key_id(key) == tag:
                return key


@functools.cache
def build_world() -> World:
    """Sign the whole hierarchy once per test session (about 0.2 s)."""
    root = Zone(".", [])
    test = Zone("test.", [])
    example = Zone("example.test.", _records("example.test.", [
        *COMMON, "dn DNAME example.test.", "ext CNAME www.nsec3.test.",
        "far CNAME www.unsigned.test.", "toiter CNAME nope.iter.test."]))
    nsec3 = Zone("nsec3.test.", _records("nsec3.test.", COMMON), denial="nsec3",
                 salt=b"\xaa\xbb")
    nsec3.add(rr("unsig.nsec3.test.", "NS", "ns.unsig.nsec3.test."))
    optout = Zone("optout.test.", _records("optout.test.", ["www A 192.0.2.13"]),
                  denial="nsec3", optout=True)
    optout.add(rr("unsig.optout.test.", "NS", "ns.unsig.optout.test."))
    optout_child = Zone("unsig.optout.test.", _records("unsig.optout.test.",
                                                       ["www A 192.0.2.14"]), signed=False)
    iters = Zone("iter.test.", _records("iter.test.", ["www A 192.0.2.7"]), denial="nsec3",
                 iterations=200)
    unsigned = Zone("unsigned.test.", _records("unsigned.test.", ["www A 192.0.2.8"]),
                    signed=False)
    unsig_child = Zone("unsig.nsec3.test.", _records("unsig.nsec3.test.", ["www A 192.0.2.10"]),
                       signed=False)
    wrongds = Zone("wrongds.test.", _records("wrongds.test.", ["www A 192.0.2.11"]))
    algo = Zone("algo.test.", _records("algo.test.", ["www A 192.0.2.12"]))
    keytrap = keytrap_zone()
    for child in (example, nsec3, iters, keytrap, optout):
        test.delegate(child)
    test.delegate(unsigned, secure=False)
    other = new_key(257)
    test.delegate(wrongds, ds=[dns.dnssec.make_ds(wrongds.origin, other.dnskey,
                                                  "SHA256").to_text()])
    test.delegate(algo, ds=[f"{algo.ksk.tag} 12 2 " + "ab" * 32])
    root.delegate(test)
    zones = [root, test, example, nsec3, iters, unsigned, unsig_child, wrongds, algo, optout,
             optout_child]
    for z in zones:
        z.finish()
    anchors = TrustAnchors.from_records([
        (dns.name.root, dns.dnssec.make_ds(dns.name.root, root.ksk.dnskey, "SHA256"))])
    all_zones = {z.origin: z for z in [*zones, keytrap]}
    return World(all_zones, anchors)


# -- test drivers: one question through a fresh Validator, and reply mutators --------------


class Run:
    """A fresh upstream + validator over the shared signed world."""

    def __init__(self, limits: Limits | None = None, world: World | None = None) -> None:
        self.world = world or build_world()
        self.upstream: Upstream = self.world.upstream()
        self.validator = Validator(self.world.anchors, self.upstream.fetch, limits or Limits())

    def ask(self, name: str, rdtype: str = "A", now: float = WHEN) -> ValidatedAnswer:
        return asyncio.run(self.ask_async(name, rdtype, now))

    async def ask_async(self, name: str, rdtype: str = "A", now: float = WHEN
                        ) -> ValidatedAnswer:
        qname, qtype = N(name), dns.rdatatype.from_text(rdtype)
        response = await self.upstream.fetch(qname, qtype)
        self.upstream.calls.clear()
        return await self.validator.validate(qname, qtype, response, now)

    def on(self, name: str, rdtype: str,
           mutate: Callable[[dns.message.Message], dns.message.Message]) -> None:
        self.upstream.mutate[(N(name), dns.rdatatype.from_text(rdtype))] = mutate


def forge_nsec_next_outside_zone(zsk: Key, zone: str = "example.test."
                                 ) -> Callable[[dns.message.Message], dns.message.Message]:
    """A reply rewriter: every NSEC in the authority section gets the next name
    zzz.elsewhere. and a valid signature by `zsk`, so one record would "prove" the absence of
    everything after it, across zones (the aggressive-cache attack fixed in Knot 6.4.1)."""

    def forge(msg: dns.message.Message) -> dns.message.Message:
        out = []
        for r in msg.authority:
            if r.rdtype == T.NSEC:
                forged = rr(r.name, "NSEC", "zzz.elsewhere. A RRSIG NSEC", ttl=r.ttl)
                out += [forged, sign(forged, zsk, N(zone))]
            elif not (r.rdtype == T.RRSIG and r.covers == T.NSEC):
                out.append(r)
        msg.authority = out
        return msg

    return forge


def without(section_types: set[int], *, covers: bool = True, section: str = "answer"
            ) -> Callable[[dns.message.Message], dns.message.Message]:
    """Drop RRsets of these types (and RRSIGs covering them when ``covers``)."""

    def mutate(msg: dns.message.Message) -> dns.message.Message:
        rrsets: list[dns.rrset.RRset] = getattr(msg, section)
        setattr(msg, section, [
            r for r in rrsets
            if r.rdtype not in section_types
            and not (covers and r.rdtype == T.RRSIG and r.covers in section_types)])
        return msg

    return mutate


def only_owner(name: str) -> Callable[[dns.message.Message], dns.message.Message]:
    """Keep only the answer RRsets owned by ``name``: a CNAME chain cut after its first link."""

    def mutate(msg: dns.message.Message) -> dns.message.Message:
        msg.answer = [r for r in msg.answer if r.name == N(name)]
        return msg

    return mutate


def resign(name: str, rdtype: str, key: Key, signer: str, *, section: str = "answer",
           sign_as: str | None = None, **times: float
           ) -> Callable[[dns.message.Message], dns.message.Message]:
    """Replace the RRSIGs of one RRset by a signature made with ``key`` as ``signer``."""
    owner, t = N(name), dns.rdatatype.from_text(rdtype)

    def mutate(msg: dns.message.Message) -> dns.message.Message:
        rrsets: list[dns.rrset.RRset] = getattr(msg, section)
        data = next(r for r in rrsets if r.name == owner and r.rdtype == t)
        sig = sign(data, key, N(signer), sign_as=N(sign_as) if sign_as else None, **times)
        kept = [r for r in rrsets if not (r.name == owner and r.rdtype == T.RRSIG
                                          and r.covers == t)]
        setattr(msg, section, [*kept, sig])
        return msg

    return mutate


def clear_authority(msg: dns.message.Message) -> dns.message.Message:
    """Drop the whole authority section (SOA, NSEC/NSEC3 and their RRSIGs)."""
    msg.authority = []
    return msg


def rcode(code: int) -> Callable[[dns.message.Message], dns.message.Message]:
    """Replace the reply's rcode."""

    def mutate(msg: dns.message.Message) -> dns.message.Message:
        msg.set_rcode(code)
        return msg

    return mutate
