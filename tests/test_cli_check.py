"""`ipseckey-resolver --check-config` covers every table, including the ones other modules parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.cli import main

GOOD = """
[upstream]
servers = ["192.0.2.1"]
[identity]
fqdn = "alice.example.com"
private_key = "/nonexistent/key.pem"
[provision]
backend = "vici"
[policy]
default = "private-or-clear"
private = ["10.1.0.0/16", "corp.example.com."]
[control]
socket = "/run/ipseckey-resolver/control.sock"
[responder]
accept = ["example.com."]
"""


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "r.toml"
    path.write_text(text)
    code = main(["--config", str(path), "--check-config"])
    return code, capsys.readouterr().err


def test_good_config_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, GOOD, capsys) == (0, "")


@pytest.mark.parametrize(("old", "new", "named"), [
    ('"corp.example.com."', '".corp.example.com."', "[policy] key 'private'"),
    ('default = "private-or-clear"', 'default = "secret"', "[policy] key 'default'"),
    ('backend = "vici"', 'backend = "racoon"', "[provision] key 'backend'"),
    ('fqdn = "alice.example.com"', 'fqdn = 7', "[identity] key 'fqdn'"),
    ('socket = "/run', 'sockt = "/run', "[control] key 'sockt'"),
    ('accept = ["example.com."]', 'accept = "all"', "[responder] key 'accept'"),
])
def test_bad_key_in_a_delegated_table_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               old: str, new: str, named: str) -> None:
    assert old in GOOD
    code, err = check(tmp_path, GOOD.replace(old, new), capsys)
    assert code == 2
    assert named in err and str(tmp_path / "r.toml") in err


def test_policy_without_identity_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(tmp_path, '[upstream]\nservers = ["192.0.2.1"]\n[policy]\n'
                                'default = "private"\n', capsys)
    assert code == 2 and "[policy] needs [identity]" in err


def test_responder_without_identity_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(tmp_path, '[upstream]\nservers = ["192.0.2.1"]\n[responder]\n'
                                'accept = "any"\n', capsys)
    assert code == 2 and "[responder] needs [identity]" in err
