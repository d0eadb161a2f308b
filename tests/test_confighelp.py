"""--help's configuration summary: what it prints parses, and its defaults are the real ones."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.cli import main
from resolver.config import PASSTHROUGH_TABLES, HostPort
from resolver.confighelp import EXAMPLES, NOTES, SECTIONS
from resolver.configtable import Table, toml_value
from resolver.errors import ConfigError
from resolver.policy import Group


def help_toml(capsys: pytest.CaptureFixture[str]) -> str:
    """The indented TOML of `ipseckey-resolver --help`, dedented."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    block = text.split("configuration file (TOML)", 1)[1]
    return "\n".join(line[2:] for line in block.splitlines() if line.startswith("  "))


def test_everything_help_prints_parses(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    doc = tomllib.loads(help_toml(capsys))
    # --check-config also checks this machine (key file, state directory, listen addresses,
    # resolver/startup.py): point those at what exists here; every other value is the help's.
    key = tmp_path / "key.pem"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        doc["server"]["listen"] = [f"127.0.0.1:{s.getsockname()[1]}"]
    doc["identity"]["private_key"] = str(key)
    doc["provision"]["state_file"] = str(tmp_path / "state" / "provision.json")
    doc["control"]["state_file"] = str(tmp_path / "state" / "endpoints.json")
    path = tmp_path / "from-help.toml"
    path.write_text("".join(f"[{table}]\n" + "".join(f"{k} = {toml_value(v)}\n"
                                                     for k, v in values.items())
                            for table, values in doc.items()))
    assert main(["--config", str(path), "--check-config"]) == 0, capsys.readouterr().err


def test_every_table_is_shown() -> None:
    shown = [name for name, _ in SECTIONS]
    assert sorted(shown) == sorted({"server", "upstream", "dnssec", "cache", "limits", "log",
                                    *PASSTHROUGH_TABLES})


def test_the_defaults_shown_are_the_real_ones(capsys: pytest.CaptureFixture[str]) -> None:
    doc = tomllib.loads(help_toml(capsys))
    for name, parse in SECTIONS:
        # Every key the help prints, parsed, gives what the examples alone give: so each value
        # that is not an example is the parser's default.
        assert parse(Table("help", name, doc[name])) == \
            parse(Table("help", name, dict(EXAMPLES.get(name, {})))), name


def test_every_known_key_is_shown(capsys: pytest.CaptureFixture[str]) -> None:
    doc = tomllib.loads(help_toml(capsys))
    for name, parse in SECTIONS:
        raw: dict[str, Any] = {**doc[name], "zz_not_a_key": 1}
        with pytest.raises(ConfigError) as err:
            parse(Table("help", name, raw))
        # The parser's own list of its keys is the help's list, in the same order.
        assert str(err.value).endswith(f"(known keys: {', '.join(doc[name])})"), name


def test_notes_name_real_keys(capsys: pytest.CaptureFixture[str]) -> None:
    doc = tomllib.loads(help_toml(capsys))
    for name, key in NOTES:
        assert key in doc[name], (name, key)


@pytest.mark.parametrize(("value", "parsed"), [
    (True, True), (0, 0), (1.5, 1.5), (10.0, 10.0), ("a \"q\" \\ é\n", "a \"q\" \\ é\n"),
    (Path("/etc/x y.pem"), "/etc/x y.pem"), (HostPort("::1", 5353), "[::1]:5353"),
    (Group.PRIVATE, "private"), ((), []), (["a", 1, [True]], ["a", 1, [True]]),
])
def test_toml_value_round_trips(value: object, parsed: object) -> None:
    assert tomllib.loads(f"k = {toml_value(value)}")["k"] == parsed
