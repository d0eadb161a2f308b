"""IPSECKEY rdata <-> typed keys (RFC 4025, RFC 3110, RFC 6605/8005 encoding, RFC 9373).

Theory of operation: this module is pure (no I/O, no clock). It turns the IPSECKEY records of a
DNSSEC-secure RRset into `IpsecKey` values that the policy and provisioning layers can trust to
be well formed, and turns a `cryptography` public key back into IPSECKEY rdata (for autosp and the
lab, so that the project has one encoder). `to_json`/`from_json` are the one JSON form of a key,
used by both state files (a key read back is checked like one from DNS).

Rule 1: an `IpsecKey` is only ever built from a key field that `cryptography` accepted. Anything
else (algorithm 0/1 or unknown, a truncated RSA blob, a point not on the curve, an Ed25519 field of
the wrong length, a weak RSA modulus) is an `UnusableKey`; `keys_from_rrset` logs the reason and
skips that record, because one bad record in an RRset must not deny a peer its good ones.

Key field encodings (the IPSECKEY algorithm number selects the family, the length the curve):

    2 RSA     RFC 3110: exponent length (1 octet, or 0 + 2 octets), exponent, modulus
    3 ECDSA   RFC 6605 form: X || Y, 64 octets for P-256, 96 for P-384
    4 EdDSA   RFC 9373: the raw public key, 32 octets Ed25519, 57 octets Ed448
"""

from __future__ import annotations

import base64
import enum
import hashlib
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.IPSECKEY
import dns.rrset
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

log = logging.getLogger(__name__)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
IPSECKEYRdata = dns.rdtypes.IN.IPSECKEY.IPSECKEY

# RSA below 2048 bits is not an authentication we are willing to build a tunnel on (NIST SP
# 800-131A); RFC 3110 allows 512, which is why the check lives here and not in a parser.
MIN_RSA_BITS: Final = 2048
MAX_RSA_BITS: Final = 8192  # bounds the cost a hostile zone can make us pay per record


class KeyAlgorithm(enum.IntEnum):
    """IPSECKEY public key algorithm numbers (IANA registry)."""

    NONE = 0  # RFC 4025: no key present
    DSA = 1  # RFC 4025; obsolete, not supported
    RSA = 2  # RFC 4025 / RFC 3110
    ECDSA = 3  # RFC 8005 (P-256, P-384)
    EDDSA = 4  # RFC 9373 (Ed25519, Ed448)


class NoGateway(enum.Enum):
    """Gateway type 0: the owner itself is the IPsec peer. A one-member enum so that
    `gateway is NO_GATEWAY` narrows the union for mypy."""

    NO_GATEWAY = 0

    def __str__(self) -> str:
        return "."


NO_GATEWAY: Final = NoGateway.NO_GATEWAY

Gateway = NoGateway | IPv4Address | IPv6Address | dns.name.Name


class UnusableKey(ValueError):
    """An IPSECKEY record (or a public key) that cannot authenticate a peer; the text says why."""


@dataclass(frozen=True, slots=True)
class IpsecKey:
    """One usable IPSECKEY record of `owner`.

    `public_key` is the key field as published (wire form); `crypto_key()` gives the
    `cryptography` object. Build instances with `from_rdata` (which checks the key) or
    `from_public_key`; the plain constructor trusts its caller.
    """

    owner: dns.name.Name
    precedence: int
    gateway: Gateway
    algorithm: KeyAlgorithm
    public_key: bytes
    ttl: int

    @classmethod
    def from_rdata(cls, owner: dns.name.Name, rdata: IPSECKEYRdata, ttl: int) -> IpsecKey:
        """The typed key of one IPSECKEY rdata.

        Raises:
            UnusableKey: unsupported algorithm or a key field `cryptography` rejects.
        """
        key = cls(
            owner=owner,
            precedence=rdata.precedence,
            gateway=_gateway_from_rdata(rdata),
            algorithm=_algorithm(rdata.algorithm),
            public_key=bytes(rdata.key),
            ttl=ttl,
        )
        key.crypto_key()  # Rule 1: reject what cryptography would reject, now
        return key

    @classmethod
    def from_public_key(
        cls,
        owner: dns.name.Name,
        public_key: PublicKey,
        *,
        gateway: Gateway = NO_GATEWAY,
        precedence: int = 10,
        ttl: int = 0,
    ) -> IpsecKey:
        """The IpsecKey that would publish `public_key` (used by tests and autosp).

        Raises:
            UnusableKey: the key cannot be carried in IPSECKEY (e.g. a curve other than P-256/384).
        """
        algorithm, field = key_field_for(public_key)
        return cls(owner, _precedence(precedence), gateway, algorithm, field, ttl)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> IpsecKey:
        """The key of a `to_json` mapping (extra keys are ignored: the provisioner's state file
        stores them flat beside the tunnel's own fields).

        A state file is input too: the key is checked as `from_rdata` checks a record, so a
        damaged file never hands a malformed key to a backend.

        Raises:
            UnusableKey: a field is missing, has the wrong type, or the key is not usable.
        """
        try:
            key = cls(
                owner=dns.name.from_text(str(doc["owner"])),
                precedence=_precedence(int(doc["precedence"])),
                gateway=parse_gateway(str(doc["gateway"])),
                algorithm=_algorithm(int(doc["algorithm"])),
                public_key=base64.b64decode(str(doc["public_key"]), validate=True),
                ttl=int(doc["ttl"]),
            )
        except UnusableKey:
            raise
        except (KeyError, TypeError, ValueError, dns.exception.DNSException) as exc:
            raise UnusableKey(f"stored key: {exc!r}") from None
        key.crypto_key()  # Rule 1
        return key

    def to_json(self) -> dict[str, Any]:
        """The key as JSON values, for the state files (the inverse of `from_json`)."""
        return {
            "owner": self.owner.to_text(),
            "precedence": self.precedence,
            "gateway": self.gateway.to_text() if isinstance(self.gateway, dns.name.Name)
            else str(self.gateway),
            "algorithm": int(self.algorithm),
            "public_key": base64.b64encode(self.public_key).decode(),
            "ttl": self.ttl,
        }

    def crypto_key(self) -> PublicKey:
        """The `cryptography` public key. Raises UnusableKey if the field is malformed."""
        return public_key_from_field(self.algorithm, self.public_key)

    def spki_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of the key."""
        return spki_der(self.crypto_key())

    def spki_pem(self) -> str:
        """SubjectPublicKeyInfo PEM, the form charon takes in `pubkeys` over VICI."""
        return spki_pem(self.crypto_key())

    def fingerprint(self) -> str:
        """SHA-256 of the SPKI DER, as shown by `autosp list` (see `fingerprint`)."""
        return fingerprint(self.crypto_key())

    def key_type(self) -> str:
        """A short human name of the key: "rsa2048", "p256", "p384", "ed25519", "ed448"."""
        return key_type(self.crypto_key())

    def to_rdata(self) -> IPSECKEYRdata:
        """The IPSECKEY rdata of this key (the inverse of `from_rdata`)."""
        gtype, gvalue = _gateway_to_rdata(self.gateway)
        # dnspython's rdata constructors are untyped; the arguments are checked by it at runtime.
        return IPSECKEYRdata(  # type: ignore[no-untyped-call]
            dns.rdataclass.IN,
            dns.rdatatype.IPSECKEY,
            self.precedence,
            gtype,
            int(self.algorithm),
            gvalue,
            self.public_key,
        )

    def peer(self) -> IPv4Address | IPv6Address | dns.name.Name:
        """The IKE peer: the gateway if there is one, else the owner itself."""
        return self.owner if self.gateway is NO_GATEWAY else self.gateway


def keys_from_rrset(rrset: dns.rrset.RRset, ttl: int | None = None) -> list[IpsecKey]:
    """The usable keys of an IPSECKEY RRset, best (lowest precedence) first.

    Unusable records are skipped with a logged reason. Ties in precedence are ordered by key
    bytes, so that the result does not depend on the order the upstream sent the records in.

    Args:
        rrset: an IPSECKEY RRset; its security is the caller's business (only pass secure data).
        ttl: the TTL to record in each key (default: the RRset's).
    """
    if rrset.rdtype != dns.rdatatype.IPSECKEY:
        raise ValueError(f"not an IPSECKEY RRset: {dns.rdatatype.to_text(rrset.rdtype)}")
    keys = []
    for rdata in rrset:
        try:
            keys.append(IpsecKey.from_rdata(rrset.name, rdata, rrset.ttl if ttl is None else ttl))
        except UnusableKey as exc:
            log.warning("skipping IPSECKEY of %s (%s): %s", rrset.name, rdata.to_text()[:60], exc)
    return sorted(keys, key=lambda k: (k.precedence, k.public_key))


def best_keys(keys: Iterable[IpsecKey]) -> list[IpsecKey]:
    """The keys of the lowest precedence present (RFC 4025 2.3: lower is preferred)."""
    keys = list(keys)
    if not keys:
        return []
    best = min(k.precedence for k in keys)
    return [k for k in keys if k.precedence == best]


# --- key field <-> cryptography ------------------------------------------------------------


def public_key_from_field(algorithm: int, field: bytes) -> PublicKey:
    """The `cryptography` public key of an IPSECKEY key field.

    Raises:
        UnusableKey: unsupported algorithm, wrong length, bad point, weak or absurd RSA key.
    """
    alg = _algorithm(algorithm)
    try:
        if alg is KeyAlgorithm.RSA:
            return _rsa_from_field(field)
        if alg is KeyAlgorithm.ECDSA:
            curve = _EC_CURVE_BY_FIELD_LEN.get(len(field))
            if curve is None:
                raise UnusableKey(f"ECDSA key field of {len(field)} octets (want 64 or 96)")
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + field)
        if len(field) == 32:
            return ed25519.Ed25519PublicKey.from_public_bytes(field)
        if len(field) == 57:
            return ed448.Ed448PublicKey.from_public_bytes(field)
        raise UnusableKey(f"EdDSA key field of {len(field)} octets (want 32 or 57)")
    except (ValueError, UnsupportedAlgorithm) as exc:
        if isinstance(exc, UnusableKey):
            raise
        raise UnusableKey(f"{alg.name} key field rejected: {exc}") from None


def key_field_for(public_key: PublicKey) -> tuple[KeyAlgorithm, bytes]:
    """(algorithm, key field) publishing a `cryptography` public key.

    Raises:
        UnusableKey: a key type or curve IPSECKEY cannot carry, or a weak RSA key.
    """
    if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return KeyAlgorithm.EDDSA, raw
    if isinstance(public_key, rsa.RSAPublicKey):
        nums = public_key.public_numbers()
        _check_rsa(nums.e, public_key.key_size)
        exp = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        mod = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        # RFC 3110 section 2: one length octet, or a zero octet then two length octets.
        head = bytes([len(exp)]) if len(exp) < 256 else b"\x00" + len(exp).to_bytes(2, "big")
        return KeyAlgorithm.RSA, head + exp + mod
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        size = _EC_FIELD_LEN_BY_CURVE.get(public_key.curve.name)
        if size is None:
            raise UnusableKey(f"curve {public_key.curve.name} has no IPSECKEY encoding")
        point = public_key.public_numbers()
        half = size // 2
        return KeyAlgorithm.ECDSA, point.x.to_bytes(half, "big") + point.y.to_bytes(half, "big")
    raise UnusableKey(f"key type {type(public_key).__name__} has no IPSECKEY encoding")


def ipseckey_rdata_for(
    public_key: PublicKey,
    gateway: IPv4Address | IPv6Address | dns.name.Name | NoGateway | None = None,
    precedence: int = 10,
) -> IPSECKEYRdata:
    """IPSECKEY rdata publishing `public_key` (for autosp and the lab).

    Args:
        public_key: the host's public key (Ed25519/Ed448, RSA >= 2048 bits, ECDSA P-256/P-384).
        gateway: None for "this host is the peer", or the gateway's address or absolute name.
        precedence: 0..255, lower is preferred.

    Raises:
        ValueError (UnusableKey): a key IPSECKEY cannot carry, a relative gateway name, or a
            precedence outside 0..255.
    """
    gw: Gateway = NO_GATEWAY if gateway is None else gateway
    if isinstance(gw, dns.name.Name) and not gw.is_absolute():
        raise UnusableKey(f"gateway name {gw} must be absolute")
    key = IpsecKey.from_public_key(dns.name.root, public_key, gateway=gw, precedence=precedence)
    return key.to_rdata()


def spki_der(public_key: PublicKey) -> bytes:
    """SubjectPublicKeyInfo DER."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_pem(public_key: PublicKey) -> str:
    """SubjectPublicKeyInfo PEM (what charon's `pubkeys` takes over VICI)."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def fingerprint(public_key: PublicKey) -> str:
    """"SHA256:" + unpadded base64 of SHA-256(SPKI DER), the style OpenSSH made familiar.

    Hashing the SPKI rather than the IPSECKEY field makes the fingerprint the same whatever the
    key was read from (PEM file, IPSECKEY, charon's `list-certs`).
    """
    digest = hashlib.sha256(spki_der(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_type(public_key: PublicKey) -> str:
    """A short human name: "rsa2048", "p256", "p384", "ed25519", "ed448"."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ed448"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa{public_key.key_size}"
    return {"secp256r1": "p256", "secp384r1": "p384"}.get(public_key.curve.name, "ecdsa")


# --- helpers -----------------------------------------------------------------------------

_EC_CURVE_BY_FIELD_LEN: Final[dict[int, ec.EllipticCurve]] = {
    64: ec.SECP256R1(),
    96: ec.SECP384R1(),
}
_EC_FIELD_LEN_BY_CURVE: Final = {"secp256r1": 64, "secp384r1": 96}


def _algorithm(number: int) -> KeyAlgorithm:
    try:
        alg = KeyAlgorithm(number)
    except ValueError:
        raise UnusableKey(f"unknown IPSECKEY algorithm {number}") from None
    if alg in (KeyAlgorithm.NONE, KeyAlgorithm.DSA):
        raise UnusableKey(f"IPSECKEY algorithm {number} ({alg.name}) is not supported")
    return alg


def _precedence(value: int) -> int:
    if not 0 <= value <= 255:
        raise UnusableKey(f"precedence {value} outside 0..255")
    return value


def _rsa_from_field(field: bytes) -> rsa.RSAPublicKey:
    if not field:
        raise UnusableKey("empty RSA key field")
    if field[0]:
        elen, off = field[0], 1
    else:
        if len(field) < 3:
            raise UnusableKey("truncated RSA exponent length")
        elen, off = int.from_bytes(field[1:3], "big"), 3
    exp, mod = field[off : off + elen], field[off + elen :]
    if len(exp) != elen or not mod:
        raise UnusableKey("truncated RSA key field")
    if mod[0] == 0 or exp[0] == 0:
        raise UnusableKey("RSA key field has leading zero octets")  # not canonical (RFC 3110)
    e, n = int.from_bytes(exp, "big"), int.from_bytes(mod, "big")
    _check_rsa(e, n.bit_length())
    return rsa.RSAPublicNumbers(e, n).public_key()


def _check_rsa(e: int, bits: int) -> None:
    if bits < MIN_RSA_BITS:
        raise UnusableKey(f"RSA key of {bits} bits is too weak (minimum {MIN_RSA_BITS})")
    if bits > MAX_RSA_BITS:
        raise UnusableKey(f"RSA key of {bits} bits is larger than {MAX_RSA_BITS}")
    if e < 3 or e % 2 == 0:
        raise UnusableKey(f"RSA public exponent {e} is invalid")


def _gateway_from_rdata(rdata: IPSECKEYRdata) -> Gateway:
    gtype, value = rdata.gateway_type, rdata.gateway
    if gtype == 0:
        return NO_GATEWAY
    if gtype == 1:
        return IPv4Address(value)
    if gtype == 2:
        return IPv6Address(value)
    if gtype == 3 and isinstance(value, dns.name.Name):
        if value == dns.name.root:
            raise UnusableKey("gateway name is the root")
        return value
    raise UnusableKey(f"gateway type {gtype} is not supported")  # dnspython rejects it earlier


def _gateway_to_rdata(gateway: Gateway) -> tuple[int, str | dns.name.Name | None]:
    if gateway is NO_GATEWAY:
        return 0, None
    if isinstance(gateway, IPv4Address):
        return 1, str(gateway)
    if isinstance(gateway, IPv6Address):
        return 2, str(gateway)
    return 3, gateway


def parse_gateway(text: str) -> Gateway:
    """A gateway from text: "." (none), an address, or an absolute name (for config and tests)."""
    if text in (".", ""):
        return NO_GATEWAY
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return dns.name.from_text(text)
