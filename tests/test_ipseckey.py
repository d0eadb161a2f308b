"""resolver.ipseckey: text <-> wire <-> IpsecKey, in both directions, against cryptography keys."""

from __future__ import annotations

import base64
import hashlib
import logging
from ipaddress import IPv4Address, IPv6Address

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from resolver.ipseckey import (
    NO_GATEWAY,
    IpsecKey,
    KeyAlgorithm,
    UnusableKey,
    best_keys,
    fingerprint,
    ipseckey_rdata_for,
    key_field_for,
    keys_from_rrset,
    parse_gateway,
    public_key_from_field,
)

OWNER = dns.name.from_text("bob.example.test.")

# Fixed keys, so that the table below holds literal key fields.
ED25519 = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
ED448 = ed448.Ed448PrivateKey.from_private_bytes(bytes(range(57))).public_key()
P256 = ec.derive_private_key(0x1234567, ec.SECP256R1()).public_key()
P384 = ec.derive_private_key(0x7654321, ec.SECP384R1()).public_key()
RSA2048 = rsa.generate_private_key(65537, 2048).public_key()
RSA3072_E3 = rsa.generate_private_key(3, 3072).public_key()


def raw(k: ed25519.Ed25519PublicKey | ed448.Ed448PublicKey) -> bytes:
    return k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def xy(k: ec.EllipticCurvePublicKey) -> bytes:
    n = k.public_numbers()
    size = (k.curve.key_size + 7) // 8
    return n.x.to_bytes(size, "big") + n.y.to_bytes(size, "big")


def rfc3110(k: rsa.RSAPublicKey) -> bytes:
    n = k.public_numbers()
    e = n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")
    return bytes([len(e)]) + e + n.n.to_bytes(k.key_size // 8, "big")


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


GW_NAME = dns.name.from_text("gw.example.test.")

# (label, rdata text, precedence, gateway, algorithm, key field, cryptography key, key_type)
CASES = [
    ("ed25519", f"10 0 4 . {b64(raw(ED25519))}", 10, NO_GATEWAY, KeyAlgorithm.EDDSA,
     raw(ED25519), ED25519, "ed25519"),
    ("ed448", f"20 0 4 . {b64(raw(ED448))}", 20, NO_GATEWAY, KeyAlgorithm.EDDSA,
     raw(ED448), ED448, "ed448"),
    ("p256 v4 gw", f"10 1 3 198.51.100.20 {b64(xy(P256))}", 10, IPv4Address("198.51.100.20"),
     KeyAlgorithm.ECDSA, xy(P256), P256, "p256"),
    ("p384 v6 gw", f"5 2 3 2001:db8:100::20 {b64(xy(P384))}", 5, IPv6Address("2001:db8:100::20"),
     KeyAlgorithm.ECDSA, xy(P384), P384, "p384"),
    ("rsa name gw", f"0 3 2 gw.example.test. {b64(rfc3110(RSA2048))}", 0, GW_NAME,
     KeyAlgorithm.RSA, rfc3110(RSA2048), RSA2048, "rsa2048"),
    ("rsa e=3", f"255 0 2 . {b64(rfc3110(RSA3072_E3))}", 255, NO_GATEWAY, KeyAlgorithm.RSA,
     rfc3110(RSA3072_E3), RSA3072_E3, "rsa3072"),
]
IDS = [c[0] for c in CASES]


def rdata_of(text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, text)


def spki(k: object) -> bytes:
    return k.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(("label", "text", "prec", "gw", "alg", "field", "crypto", "kt"), CASES,
                         ids=IDS)
def test_text_to_key(label, text, prec, gw, alg, field, crypto, kt):  # type: ignore[no-untyped-def]
    rd = rdata_of(text)
    # through the wire too: what arrives from upstream is wire
    wire = rd.to_wire()
    rd2 = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.IPSECKEY, wire, 0, len(wire))
    key = IpsecKey.from_rdata(OWNER, rd2, 300)  # type: ignore[arg-type]
    assert key == IpsecKey(OWNER, prec, gw, alg, field, 300)
    assert spki(key.crypto_key()) == spki(crypto)
    assert key.key_type() == kt
    assert key.spki_pem() == crypto.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.mark.parametrize(("label", "text", "prec", "gw", "alg", "field", "crypto", "kt"), CASES,
                         ids=IDS)
def test_key_to_text(label, text, prec, gw, alg, field, crypto, kt):  # type: ignore[no-untyped-def]
    assert key_field_for(crypto) == (alg, field)
    key = IpsecKey(OWNER, prec, gw, alg, field, 300)
    assert key.to_rdata() == rdata_of(text)
    gateway = None if gw is NO_GATEWAY else gw
    assert ipseckey_rdata_for(crypto, gateway, prec) == rdata_of(text)
    assert IpsecKey.from_public_key(OWNER, crypto, gateway=gw, precedence=prec, ttl=300) == key


def test_generated_keys_round_trip() -> None:
    """Freshly generated cryptography keys of every supported kind survive rdata and back."""
    for priv in (ed25519.Ed25519PrivateKey.generate(), ed448.Ed448PrivateKey.generate(),
                 ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())):
        pub = priv.public_key()
        rd = ipseckey_rdata_for(pub)
        assert spki(IpsecKey.from_rdata(OWNER, rd, 1).crypto_key()) == spki(pub)


def test_rfc3110_long_exponent_form() -> None:
    # A zero length octet then two octets of length; no real key needs it, parsers must accept it.
    n = RSA2048.public_numbers()
    field = b"\x00\x00\x03" + n.e.to_bytes(3, "big") + n.n.to_bytes(256, "big")
    assert spki(public_key_from_field(2, field)) == spki(RSA2048)


def test_fingerprint_is_sha256_of_spki() -> None:
    digest = hashlib.sha256(spki(ED25519)).digest()
    assert fingerprint(ED25519) == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    key = IpsecKey.from_public_key(OWNER, ED25519)
    assert key.fingerprint() == fingerprint(ED25519)


UNUSABLE = [
    ("alg 0", 0, b"", "not supported"),
    ("dsa", 1, b"\x00" * 40, "not supported"),
    ("unknown alg", 9, b"\x01" * 32, "unknown IPSECKEY algorithm 9"),
    ("eddsa short", 4, b"\x01" * 31, "31 octets"),
    ("ecdsa odd length", 3, b"\x01" * 65, "65 octets"),
    ("ecdsa point off curve", 3, b"\x01" * 64, "ECDSA key field rejected"),
    ("rsa empty", 2, b"", "empty"),
    ("rsa truncated length", 2, b"\x00\x01", "truncated RSA exponent length"),
    ("rsa truncated", 2, b"\x03\x01\x00", "truncated RSA key field"),
    ("rsa weak", 2, b"\x03\x01\x00\x01" + b"\xc1" * 128, "too weak"),
    ("rsa even exponent", 2, b"\x01\x04" + b"\xc1" * 256, "exponent 4 is invalid"),
    ("rsa leading zero", 2, b"\x03\x01\x00\x01" + b"\x00" + b"\xc1" * 256, "leading zero"),
]


@pytest.mark.parametrize(("label", "alg", "field", "why"), UNUSABLE, ids=[u[0] for u in UNUSABLE])
def test_unusable_fields(label: str, alg: int, field: bytes, why: str) -> None:
    with pytest.raises(UnusableKey, match=why):
        public_key_from_field(alg, field)


def test_unusable_public_keys() -> None:
    with pytest.raises(UnusableKey, match="secp521r1"):
        key_field_for(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(UnusableKey, match="too weak"):
        key_field_for(rsa.generate_private_key(65537, 1024).public_key())
    with pytest.raises(ValueError, match="absolute"):
        ipseckey_rdata_for(ED25519, dns.name.from_text("gw", origin=None))
    with pytest.raises(ValueError, match="precedence"):
        ipseckey_rdata_for(ED25519, None, 256)


def test_keys_from_rrset_sorts_and_skips(caplog: pytest.LogCaptureFixture) -> None:
    rrset = dns.rrset.from_text(
        OWNER, 120, "IN", "IPSECKEY",
        f"30 0 4 . {b64(raw(ED25519))}",
        f"10 0 3 . {b64(xy(P256))}",
        f"5 0 4 . {b64(b'short')}",  # best precedence, but unusable: skipped
        f"20 0 9 . {b64(b'x' * 32)}",  # unknown algorithm: skipped
        f"10 0 4 . {b64(raw(ED448))}",
    )
    with caplog.at_level(logging.WARNING, logger="resolver.ipseckey"):
        keys = keys_from_rrset(rrset)
    assert [k.precedence for k in keys] == [10, 10, 30]
    assert {k.key_type() for k in keys[:2]} == {"p256", "ed448"}
    assert all(k.ttl == 120 and k.owner == OWNER for k in keys)
    assert len([r for r in caplog.records if "skipping IPSECKEY" in r.getMessage()]) == 2
    assert {k.key_type() for k in best_keys(keys)} == {"p256", "ed448"}
    # order of arrival does not matter
    rev = dns.rrset.from_rdata_list(OWNER, 120, list(reversed(list(rrset))))
    assert keys_from_rrset(rev) == keys
    assert keys_from_rrset(rrset, ttl=7)[0].ttl == 7


def test_keys_from_rrset_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="not an IPSECKEY"):
        keys_from_rrset(dns.rrset.from_text(OWNER, 1, "IN", "A", "192.0.2.1"))


def test_peer_and_gateway_parsing() -> None:
    assert IpsecKey.from_public_key(OWNER, ED25519).peer() == OWNER
    gw = IpsecKey.from_public_key(OWNER, ED25519, gateway=IPv4Address("198.51.100.20"))
    assert gw.peer() == IPv4Address("198.51.100.20")
    assert parse_gateway(".") is NO_GATEWAY
    assert parse_gateway("2001:db8::1") == IPv6Address("2001:db8::1")
    assert parse_gateway("gw.example.test.") == GW_NAME
    assert str(NO_GATEWAY) == "."



@pytest.mark.parametrize(("label", "text", "prec", "gw", "alg", "field", "crypto", "kt"), CASES,
                         ids=IDS)
def test_json_form(label, text, prec, gw, alg, field, crypto, kt):  # type: ignore[no-untyped-def]
    """The state files' form of a key: the fields as written, and back to the same key."""
    key = IpsecKey(OWNER, prec, gw, alg, field, 300)
    doc = key.to_json()
    gw_text = "." if gw is NO_GATEWAY else gw.to_text() if isinstance(gw, dns.name.Name) \
        else str(gw)
    assert doc == {"owner": "bob.example.test.", "precedence": prec, "gateway": gw_text,
                   "algorithm": int(alg), "public_key": b64(field), "ttl": 300}
    assert IpsecKey.from_json(doc) == key
    assert IpsecKey.from_json(doc | {"name": "isk-x", "expires_at": 1.0}) == key  # flat, extra


@pytest.mark.parametrize(("damage", "words"), [
    ({"public_key": b64(raw(ED25519))[:-8]}, "EdDSA key field of 27 octets"),
    ({"public_key": "not base64!"}, "stored key"),
    ({"algorithm": 1}, "not supported"),
    ({"algorithm": 9}, "unknown IPSECKEY algorithm"),
    ({"precedence": 256}, "precedence"),
    ({"precedence": "high"}, "stored key"),
    ({"owner": "a..b."}, "stored key"),
    ({"ttl": None}, "stored key"),
])
def test_json_form_rejects_damage(damage: dict[str, object], words: str) -> None:
    """A damaged state file gives UnusableKey (a ValueError) naming the fault, never a key."""
    doc = IpsecKey.from_public_key(OWNER, ED25519).to_json()
    with pytest.raises(UnusableKey, match=words):
        IpsecKey.from_json(doc | damage)
    with pytest.raises(UnusableKey, match="stored key"):
        IpsecKey.from_json({k: v for k, v in doc.items() if k != "owner"})
