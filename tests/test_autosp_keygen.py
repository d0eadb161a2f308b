"""autosp keygen and load_private_key: modes, refusal, permissions, printed record."""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.IPSECKEY
import dns.zone
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from autosp import keygen
from autosp.cli import main
from resolver.errors import ConfigError
from resolver.ipseckey import IpsecKey


@pytest.fixture
def umask0() -> Iterator[None]:
    """The most permissive umask: the key file must still be 0600."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("alg", list(keygen.Algorithm))
def test_write_is_0600_under_umask_0(tmp_path: Path, umask0: None, alg: keygen.Algorithm) -> None:
    out = tmp_path / "host.pem"
    key = keygen.generate(alg)
    keygen.write_private_key(out, keygen.pkcs8_pem(key))
    assert mode(out) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
    loaded = keygen.load_private_key(out)
    assert loaded.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "host.pem"
    out.write_bytes(b"precious")
    out.chmod(0o600)
    with pytest.raises(ConfigError, match="exists; not overwriting"):
        keygen.write_private_key(out, b"new")
    assert out.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [out]
    keygen.write_private_key(out, b"new", force=True)
    assert out.read_bytes() == b"new" and mode(out) == 0o600


def test_force_replaces_a_too_open_file_with_a_0600_one(tmp_path: Path) -> None:
    out = tmp_path / "host.pem"
    out.write_bytes(b"old")
    out.chmod(0o644)
    keygen.write_private_key(out, b"new", force=True)
    assert mode(out) == 0o600


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create key file"):
        keygen.write_private_key(tmp_path / "missing-dir" / "k.pem", b"x")


def _key_file(tmp_path: Path, file_mode: int, key: object | None = None) -> Path:
    k = key if key is not None else ed25519.Ed25519PrivateKey.generate()
    p = tmp_path / "k.pem"
    p.write_bytes(keygen.pkcs8_pem(k))  # type: ignore[arg-type]
    p.chmod(file_mode)
    return p


@pytest.mark.parametrize("bad", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660, 0o666])
def test_load_refuses_group_or_other_access(tmp_path: Path, bad: int) -> None:
    p = _key_file(tmp_path, bad)
    with pytest.raises(ConfigError) as info:
        keygen.load_private_key(p)
    assert f"permissions {bad:04o} are too open" in str(info.value)
    assert f"chmod 600 {p}" in str(info.value)


@pytest.mark.parametrize("good", [0o600, 0o400])
def test_load_accepts_owner_only(tmp_path: Path, good: int) -> None:
    assert isinstance(keygen.load_private_key(_key_file(tmp_path, good)),
                      ed25519.Ed25519PrivateKey)


def test_load_rejects_other_owner(tmp_path: Path) -> None:
    p = _key_file(tmp_path, 0o600)
    os.chown(p, 4242, 4242)  # tests run as root (CI); a key of another user is refused
    with pytest.raises(ConfigError, match="owned by uid 4242"):
        keygen.load_private_key(p)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"not a key", "not a PEM private key"),
    (ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")), "encrypted"),
    (keygen.pkcs8_pem(rsa.generate_private_key(65537, 1024)), "1024 bits is too short"),
    (keygen.pkcs8_pem(ec.generate_private_key(ec.SECP521R1())), "secp521r1"),
])
def test_load_rejects_unusable_keys(tmp_path: Path, content: bytes, fragment: str) -> None:
    p = tmp_path / "k.pem"
    p.write_bytes(content)
    p.chmod(0o600)
    with pytest.raises(ConfigError, match=fragment):
        keygen.load_private_key(p)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open private key"):
        keygen.load_private_key(tmp_path / "nope.pem")


def _expected_key_field(pub: object) -> tuple[int, bytes]:
    """The IPSECKEY key field computed independently of resolver.ipseckey (RFC 9373/8005/3110)."""
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return 4, pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(pub, ec.EllipticCurvePublicKey):
        n = pub.public_numbers()
        return 3, n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")
    assert isinstance(pub, rsa.RSAPublicKey)
    n2 = pub.public_numbers()
    e = n2.e.to_bytes(3, "big")
    return 2, bytes([len(e)]) + e + n2.n.to_bytes(pub.key_size // 8, "big")


@pytest.mark.parametrize("alg", [a.value for a in keygen.Algorithm])
def test_cli_keygen_prints_a_record_that_parses_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], alg: str) -> None:
    out = tmp_path / "bob.pem"
    assert main(["keygen", "--algorithm", alg, "--out", str(out),
                 "--name", "bob.example.test"]) == 0
    captured = capsys.readouterr()
    line = captured.out.strip()
    assert line.startswith("bob.example.test. 3600 IN IPSECKEY 10 0 ")
    assert "mode 0600" in captured.err
    assert mode(out) == 0o600
    zone = dns.zone.from_file(io.StringIO(line + "\n"), origin="example.test.",
                              relativize=False, check_origin=False)
    rds = zone.find_rdataset("bob.example.test.", dns.rdatatype.IPSECKEY)
    (rd,) = rds
    assert isinstance(rd, dns.rdtypes.IN.IPSECKEY.IPSECKEY)
    assert rds.ttl == 3600 and rd.precedence == 10 and rd.gateway_type == 0
    pub = keygen.load_private_key(out).public_key()
    assert (rd.algorithm, rd.key) == _expected_key_field(pub)
    # ...and it round-trips through the resolver's own IPSECKEY reader.
    ipk = IpsecKey.from_rdata(rds_owner := dns.name.from_text("bob.example.test."), rd, 3600)
    assert ipk.owner == rds_owner
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert ipk.crypto_key().public_bytes(*der) == pub.public_bytes(*der)


def test_cli_keygen_placeholder_name_is_flagged(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k.pem")]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("host.example.com. 3600 IN IPSECKEY 10 0 4 . ")
    assert "placeholder" in captured.err


def test_cli_keygen_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k.pem"), "--name", "srv.example.test",
                 "--gateway", "198.51.100.20", "--precedence", "20"]) == 0
    assert " IPSECKEY 20 1 4 198.51.100.20 " in capsys.readouterr().out


def test_cli_keygen_refuses_existing_file_exit_2(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "k.pem"
    out.write_text("keep me")
    assert main(["keygen", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "--force" in captured.err
    assert "Traceback" not in captured.err
    assert out.read_text() == "keep me"
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    assert mode(out) == 0o600


def test_cli_keygen_bad_gateway_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--out", str(tmp_path / "k.pem"), "--gateway", "com"]) == 2
    assert not (tmp_path / "k.pem").exists()  # input checked before anything is written
