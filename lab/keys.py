"""Host key pairs behind the lab's IPSECKEY records, and their IPSECKEY encoding.

Private keys are generated with `cryptography` the first time the lab comes up and cached as
PKCS#8 PEM in the state directory's key cache, so the published records stay stable across runs.

The IPSECKEY encoder here is a small private copy for the lab (RFC 4025, RFC 3110, RFC 9373 key
fields, as measured in lab-notes). It should be replaced by `resolver.ipseckey` once that module
exists, so that there is one encoder in the project.
"""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from lab.topology import KeyKind

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def generate(kind: KeyKind) -> PrivateKey:
    """A fresh private key of the given kind."""
    if kind is KeyKind.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if kind is KeyKind.RSA2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def load_or_create(path: Path, kind: KeyKind) -> PrivateKey:
    """Load the cached key at `path`, or generate one and write it there (mode 0600).

    A cached key of the wrong kind (topology changed) is replaced.
    """
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if _kind_of(key) is kind:
            return key  # type: ignore[return-value]
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


def ipseckey_key_field(public: PublicKey) -> tuple[int, bytes]:
    """(IPSECKEY algorithm number, public key field) for a public key."""
    if isinstance(public, ed25519.Ed25519PublicKey):
        return 4, public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(public, rsa.RSAPublicKey):
        nums = public.public_numbers()
        exp = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        mod = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        # RFC 3110: one length octet, or zero followed by two length octets for long exponents.
        head = bytes([len(exp)]) if len(exp) < 256 else b"\x00" + len(exp).to_bytes(2, "big")
        return 2, head + exp + mod
    size = (public.curve.key_size + 7) // 8
    point = public.public_numbers()
    return 3, point.x.to_bytes(size, "big") + point.y.to_bytes(size, "big")


def ipseckey_rdata_text(public: PublicKey, gateway: str | None = None, precedence: int = 10) -> str:
    """IPSECKEY rdata in zone-file presentation form.

    Args:
        public: the key to publish.
        gateway: None, an IPv4/IPv6 address, or a fully qualified name ending in ".".
        precedence: lower is preferred.
    """
    alg, blob = ipseckey_key_field(public)
    if gateway is None:
        gtype, gtext = 0, "."
    else:
        try:
            addr = ipaddress.ip_address(gateway)
            gtype, gtext = (1 if addr.version == 4 else 2), str(addr)
        except ValueError:
            if not gateway.endswith("."):
                raise ValueError(f"gateway name must be fully qualified: {gateway!r}") from None
            gtype, gtext = 3, gateway
    return f"{precedence} {gtype} {alg} {gtext} {base64.b64encode(blob).decode()}"


def public_key_from_ipseckey(algorithm: int, blob: bytes) -> PublicKey:
    """The inverse of `ipseckey_key_field`: IPSECKEY algorithm + key field -> public key.

    Raises:
        ValueError: unknown algorithm or malformed key field.
    """
    if algorithm == 4:
        return ed25519.Ed25519PublicKey.from_public_bytes(blob)
    if algorithm == 2:
        if not blob:
            raise ValueError("empty RSA key field")
        if blob[0]:
            elen, off = blob[0], 1
        else:
            if len(blob) < 3:
                raise ValueError("truncated RSA exponent length")
            elen, off = int.from_bytes(blob[1:3], "big"), 3
        exp, mod = blob[off:off + elen], blob[off + elen:]
        if len(exp) != elen or not mod:
            raise ValueError("truncated RSA key field")
        return rsa.RSAPublicNumbers(int.from_bytes(exp, "big"),
                                    int.from_bytes(mod, "big")).public_key()
    if algorithm == 3:
        curves: dict[int, ec.EllipticCurve] = {64: ec.SECP256R1(), 96: ec.SECP384R1()}
        if len(blob) not in curves:
            raise ValueError(f"ECDSA key field of {len(blob)} bytes (want 64 or 96)")
        return ec.EllipticCurvePublicKey.from_encoded_point(curves[len(blob)], b"\x04" + blob)
    raise ValueError(f"unsupported IPSECKEY algorithm {algorithm}")
