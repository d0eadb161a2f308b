"""autosp.tsig: tsig-keygen files, good and each malformed form (errors name FILE:LINE)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import dns.name
import dns.tsig
import pytest

from autosp.tsig import load_tsig_key, parse_tsig_keys
from resolver.errors import ConfigError

SECRET = base64.b64encode(bytes(range(32))).decode()
GOOD = f'key "ddns-key" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'


def test_good_file_as_tsig_keygen_writes_it() -> None:
    (key,) = parse_tsig_keys(GOOD, "k")
    assert key.name == dns.name.from_text("ddns-key")
    assert key.algorithm == "hmac-sha256"
    assert key.secret == bytes(range(32))
    dk = key.to_dnspython()
    assert dk.algorithm == dns.tsig.HMAC_SHA256
    assert dk.secret == bytes(range(32))


def test_real_tsig_keygen_output_parses(tmp_path: Path) -> None:
    exe = shutil.which("tsig-keygen")
    assert exe, "tsig-keygen missing: apt install bind9-utils"
    for alg in ("hmac-sha256", "hmac-sha512", "hmac-sha1"):
        text = subprocess.run([exe, "-a", alg, "my.key"], capture_output=True, text=True,
                              check=True).stdout
        f = tmp_path / f"{alg}.key"
        f.write_text(text)
        key = load_tsig_key(f)
        assert key.algorithm == alg
        assert key.name == dns.name.from_text("my.key")


def test_comments_and_unquoted_name_and_case() -> None:
    text = (f"# comment\n// another\n/* multi\nline */ key ddns-key {{ algorithm HMAC-SHA512;"
            f' secret "{SECRET}"; }}; // trailing\n')
    (key,) = parse_tsig_keys(text)
    assert key.algorithm == "hmac-sha512"


def test_several_keys_need_a_name(tmp_path: Path) -> None:
    f = tmp_path / "two.key"
    f.write_text(GOOD + GOOD.replace("ddns-key", "other"))
    with pytest.raises(ConfigError, match=r"several keys.*--tsig-name"):
        load_tsig_key(f)
    assert load_tsig_key(f, "other").name == dns.name.from_text("other")
    with pytest.raises(ConfigError, match="no key named 'third'"):
        load_tsig_key(f, "third")


MALFORMED = [
    # (text, line, fragment of the message)
    ("", 1, "no 'key' statement"),
    ("# only a comment\n", 1, "no 'key' statement"),
    (f'key "k" {{\n algorithm hmac-sha256\n secret "{SECRET}";\n}};\n', 3,
     "expected ';', found 'secret'"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret "{SECRET}";\n}}\n', 4,
     "unexpected end of file, expected ';'"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret "{SECRET}";\n', 3,
     "unexpected end of file"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret "{SECRET};\n}};\n', 3,
     "string is not closed on this line"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret "{SECRET}";\n}};\n/* open\n', 5,
     "comment '/*' is never closed"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret "{SECRET}";\n keyid 5;\n}};\n', 4,
     "unknown clause 'keyid'"),
    (f'key "k" {{\n secret "{SECRET}";\n}};\n', 1, "has no 'algorithm'"),
    ('key "k" {\n algorithm hmac-sha256;\n};\n', 1, "has no 'secret'"),
    (f'key "k" {{\n algorithm hmac-sha999;\n secret "{SECRET}";\n}};\n', 2,
     "unsupported TSIG algorithm 'hmac-sha999'"),
    ('key "k" {\n algorithm hmac-sha256;\n secret "not*base64!";\n};\n', 3,
     "not valid base64"),
    ('key "k" {\n algorithm hmac-sha256;\n secret "";\n};\n', 3, "secret is empty"),
    (f'key "k" {{\n algorithm hmac-sha256;\n secret {SECRET};\n}};\n', 3,
     "must be a quoted base64 string"),
    (f'key "k" {{\n algorithm hmac-sha256;\n algorithm hmac-sha1;\n secret "{SECRET}";\n}};\n',
     3, "'algorithm' given twice"),
    (f'options {{ }};\n{GOOD}', 1, "expected 'key', found 'options'"),
    (f'key {{\n algorithm hmac-sha256;\n secret "{SECRET}";\n}};\n', 1,
     "expected a key name, found '{'"),
    (f'key "k" \n algorithm hmac-sha256;\n secret "{SECRET}";\n}};\n', 2,
     "expected '{', found 'algorithm'"),
]


@pytest.mark.parametrize(("text", "line", "fragment"), MALFORMED)
def test_malformed_names_file_and_line(tmp_path: Path, text: str, line: int,
                                       fragment: str) -> None:
    f = tmp_path / "bad.key"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_tsig_key(f)
    message = str(info.value)
    assert message.startswith(f"{f}:{line}: "), message
    assert fragment in message, message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read TSIG key file"):
        load_tsig_key(tmp_path / "missing.key")
    (tmp_path / "bin.key").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_tsig_key(tmp_path / "bin.key")
