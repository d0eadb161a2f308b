"""Host key pairs behind the lab's IPSECKEY records.

Private keys are generated with `cryptography` the first time the lab comes up and cached as
PKCS#8 PEM in the state directory's key cache, so the published records stay stable across runs.

The IPSECKEY encoding itself is the project's (`resolver.ipseckey`), so the records the lab
publishes are exactly what the resolver and autosp read and write; `ipseckey_rdata_text` only
adapts the lab's topology data (gateway as text) to it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import dns.name
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lab.topology import KeyKind
from resolver import ipseckey

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def generate(kind: KeyKind) -> PrivateKey:
    """A fresh private key of the given kind."""
    if kind is KeyKind.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if kind is KeyKind.RSA2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def load_private(path: Path) -> PrivateKey:
    """The unencrypted PKCS#8 PEM private key at `path` (the lab's, or one autosp keygen wrote)."""
    return serialization.load_pem_private_key(path.read_bytes(), password=None)  # type: ignore[return-value]


def load_or_create(path: Path, kind: KeyKind) -> PrivateKey:
    """Load the cached key at `path`, or generate one and write it there (mode 0600).

    A cached key of the wrong kind (topology changed) is replaced.
    """
    if path.exists():
        key = load_private(path)
        if _kind_of(key) is kind:
            return key
    key = generate(kind)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    tmp.replace(path)
    return key


def _kind_of(key: object) -> KeyKind | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyKind.ED25519
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048:
        return KeyKind.RSA2048
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return KeyKind.ECDSA_P256
    return None


def spki_pem(public: PublicKey) -> str:
    """SubjectPublicKeyInfo PEM, the form charon takes in `pubkeys` over VICI."""
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def pkcs8_der(key: PrivateKey) -> bytes:
    """PKCS#8 DER, the form charon's `load-key` takes with type "any"."""
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def ipseckey_rdata_text(public: PublicKey, gateway: str | None = None, precedence: int = 10) -> str:
    """IPSECKEY rdata in zone-file presentation form (encoded by `resolver.ipseckey`).

    Args:
        public: the key to publish.
        gateway: None, an IPv4/IPv6 address, or a fully qualified name ending in ".".
        precedence: lower is preferred.
    """
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | dns.name.Name | None = None
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError:
            if not gateway.endswith("."):
                raise ValueError(f"gateway name must be fully qualified: {gateway!r}") from None
            gw = dns.name.from_text(gateway)
    return str(ipseckey.ipseckey_rdata_for(public, gw, precedence).to_text())


def ipseckey_key_field(public: PublicKey) -> bytes:
    """The IPSECKEY public key field that publishes `public` (as `resolver.ipseckey` encodes it)."""
    return bytes(ipseckey.ipseckey_rdata_for(public).key)
