"""Private key files: generate one (`autosp keygen`) and load one safely (autosp and the resolver).

Theory of operation: a private key is written exactly once, atomically, and is never readable by
anyone but its owner, not even for a moment:

1. the key is written to a fresh temporary file in the target directory, created with
   O_CREAT|O_EXCL and mode 0600 (the umask can only take bits away, and we fchmod to 0600
   afterwards in case it took the owner's away too), then fsync'ed;
2. without --force the temporary file is hard-linked to the final name, which fails if that name
   exists (no check-then-write race); with --force it is renamed over it;
3. the temporary name is removed and the directory fsync'ed.

`load_private_key` refuses a file that group or others can read or write, or that belongs to
someone else, as ssh does: a key others could read is no longer secret, and a key others could
write lets them choose our identity.
"""

from __future__ import annotations

import contextlib
import enum
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from resolver.errors import ConfigError
from resolver.keyfile import read_private_key_file

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

# RSA keys are made at 3072 bits (NIST's 128-bit level); 2048 is still accepted when loading.
RSA_BITS = 3072
RSA_MIN_BITS = 2048


class Algorithm(enum.Enum):
    """Key algorithms `autosp keygen` makes; values are the command-line spellings."""

    ED25519 = "ed25519"
    ECDSA_P256 = "ecdsa-p256"
    RSA = "rsa"


def generate(algorithm: Algorithm) -> PrivateKey:
    """A fresh private key of the given algorithm."""
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm is Algorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def pkcs8_pem(key: PrivateKey) -> bytes:
    """The unencrypted PKCS#8 PEM encoding of a private key (what charon and we load)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_key(path: Path, pem: bytes, *, force: bool = False) -> None:
    """Write `pem` to `path` with mode 0600, atomically (see the module docstring).

    Args:
        path: the key file to create.
        pem: the file's contents.
        force: replace an existing file instead of refusing.

    Raises:
        ConfigError: the file exists and `force` is not set, or the directory cannot be written.
    """
    if path.exists() and not force:
        raise ConfigError(f"{path}: exists; not overwriting a key file without --force")
    directory = path.parent if str(path.parent) else Path(".")
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create key file: {exc.strerror}") from exc
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(
                    f"{path}: exists; not overwriting a key file without --force"
                ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write key file: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # Makes the new directory entry durable; best effort (some filesystems refuse it).
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_private_key(path: Path | str) -> PrivateKey:
    """Load a PEM private key, refusing files that others can read or write (as ssh does).

    The permission check is made on the opened file descriptor, so the file checked is the file
    read.

    Args:
        path: a PEM private key (PKCS#8 or the traditional formats), unencrypted.

    Returns:
        The key: Ed25519, ECDSA (P-256 or P-384) or RSA of at least 2048 bits.

    Raises:
        ConfigError: the file is missing, too open, owned by someone else, not an unencrypted
            PEM private key, or of an unsupported kind. The message names the file.
    """
    path = Path(path)
    data = read_private_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the private key is encrypted; autosp needs an unencrypted "
                          "key file (protected by its mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key") from None
    return _check_key_kind(path, key)


def _check_key_kind(path: Path, key: object) -> PrivateKey:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1 | ec.SECP384R1):
            return key
        raise ConfigError(f"{path}: ECDSA curve {key.curve.name} is not usable in IPSECKEY "
                          "(P-256 or P-384 only)")
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size >= RSA_MIN_BITS:
            return key
        raise ConfigError(f"{path}: RSA key of {key.key_size} bits is too short "
                          f"(at least {RSA_MIN_BITS})")
    raise ConfigError(f"{path}: unsupported key type {type(key).__name__} "
                      "(Ed25519, ECDSA P-256/P-384 or RSA)")
