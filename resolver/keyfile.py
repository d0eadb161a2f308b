"""Reading private key files safely: refuse a key that others can read or write, as ssh does.

Why here and not in autosp: the daemon loads its IKE private key at start-up and must apply the
same rule as `autosp keygen` writes (mode 0600, owned by us or root); autosp imports this module,
the resolver never imports autosp.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from resolver.errors import ConfigError

MAX_KEY_FILE = 1 << 20  # bytes; a PEM key is a few KiB at most


def check_key_file_mode(path: Path, st: os.stat_result) -> None:
    """Raise ConfigError unless `st` is a regular file owned by us or root with mode 0600 or
    stricter (no group or other bits)."""
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"{path}: private key owned by uid {st.st_uid}, not by us "
                          f"(uid {os.geteuid()}) or root; refusing to use it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path}: permissions {mode:04o} are too open: a private key must not "
                          f"be accessible by group or others (run: chmod 600 {path})")


def read_private_key_file(path: Path | str) -> bytes:
    """The bytes of a private key file, after the mode check on the opened descriptor (so the
    file checked is the file read).

    Raises:
        ConfigError: missing, unreadable, too open, owned by someone else. Names the file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open private key: {exc.strerror}") from exc
    try:
        # Before fdopen: it refuses a directory with IsADirectoryError (a traceback, before).
        check_key_file_mode(path, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            return f.read(MAX_KEY_FILE)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read private key: {exc.strerror}") from exc


def load_private_key(path: Path | str) -> PrivateKeyTypes:
    """The private key in a PEM file, after `read_private_key_file`'s checks, as the daemon
    will use it (start-up checks and `--check-config`, resolver/startup.py).

    Raises:
        ConfigError: missing, unreadable, too open, not a PEM private key, or of a type an IKE
            daemon cannot sign with (RSA, ECDSA, Ed25519, Ed448 only). Names the file.
    """
    data = read_private_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a usable PEM private key: {exc}") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ConfigError(f"{path}: unsupported key type {type(key).__name__}")
    return key
