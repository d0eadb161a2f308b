"""autosp's command line: help for every subcommand, exit statuses, control socket, addresses."""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import threading
from pathlib import Path

import pytest

from autosp import addresses as ad
from autosp.cli import EXIT_HELP, build_parser, main

COMMANDS = ["add", "remove", "list", "status", "refresh", "stats", "keygen", "publish"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([cmd, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: autosp {cmd}")
    assert "exit status: 0 ok, 1 operation failed, 2 bad input" in out


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"    {cmd}" in out


def test_publish_help_documents_rollover_and_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["publish", "--help"])
    out = capsys.readouterr().out
    for needle in ("make before break", "--finish-rollover", "published, secure", "--nsupdate",
                   "prerequisites"):
        assert needle in out


@pytest.mark.parametrize("argv", [["add", "vpn.example.com"], ["list"], ["status", "x.test"],
                                  ["remove", "x.test"], ["refresh"], ["stats"], ["upstream"]])
def test_commands_that_ask_the_daemon_exit_3_without_it(
        tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--control", str(tmp_path / "none.sock"), *argv]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "control socket" in err and "Traceback" not in err
    assert f"`autosp {argv[0]}` needs" in err  # not "the endpoint commands" for stats


def test_readme_exit_3_row_names_every_command_that_asks_the_daemon() -> None:
    """README's exit table: 3 is for the commands whose --help promises it (EXIT_HELP)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| 3 |"))
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    asking = [n for n, p in sub.choices.items() if p.epilog == EXIT_HELP]
    endpoint = {"add", "remove", "list", "status", "refresh"}
    assert endpoint <= set(asking) and "endpoint commands" in row, row
    for cmd in set(asking) - endpoint:
        assert f"`{cmd}`" in row, (cmd, row)


def _serve_once(path: Path, reply: dict[str, object], seen: list[dict[str, object]]) -> None:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            seen.append(json.loads(conn.makefile().readline()))
            conn.sendall(json.dumps(reply).encode() + b"\n")

    threading.Thread(target=run, daemon=True).start()


def test_control_protocol_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "c.sock"
    seen: list[dict[str, object]] = []
    endpoint = {"name": "vpn.example.com.", "addresses": ["198.51.100.11"],
                "algorithm": "ed25519", "fingerprint": "SHA256:abc", "security": "secure",
                "tunnel": "installed", "next_refresh": None, "error": ""}
    _serve_once(sock, {"ok": True, "result": {"endpoints": [endpoint]}}, seen)
    assert main(["--control", str(sock), "list"]) == 0
    assert seen == [{"op": "list"}]
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "TUNNEL", "DNSSEC", "KEY", "REFRESH", "ADDRESSES"]
    assert out[1].split() == ["vpn.example.com.", "installed", "secure", "ed25519", "-",
                              "198.51.100.11"]
    sock.unlink()
    _serve_once(sock, {"ok": False, "error": "vpn.example.com: no secure key",
                       "code": "no-secure-key"}, seen)
    assert main(["--control", str(sock), "add", "vpn.example.com", "--group", "private"]) == 1
    assert seen[1] == {"op": "add", "name": "vpn.example.com.", "group": "private"}
    assert "no secure key" in capsys.readouterr().err


def _ia(text: str, scope: int = 0, flags: int = 0, up: bool = True) -> ad.InterfaceAddress:
    return ad.InterfaceAddress(ipaddress.ip_address(text), "eth0", scope, flags, up)


def test_address_selection() -> None:
    entries = [
        _ia("127.0.0.1", scope=254), _ia("::1", scope=254), _ia("fe80::1", scope=253),
        _ia("2001:db8:100::11"), _ia("198.51.100.11"), _ia("198.51.100.11"),
        _ia("2001:db8:100::abcd", flags=ad.IFA_F_TEMPORARY),
        _ia("2001:db8:100::dead", flags=ad.IFA_F_DEPRECATED),
        _ia("2001:db8:100::beef", flags=ad.IFA_F_TENTATIVE),
        _ia("2001:db8:100::bad", flags=ad.IFA_F_DADFAILED),
        _ia("192.0.2.99", up=False), _ia("169.254.1.1"), _ia("10.1.2.3"),
    ]
    assert [str(a) for a in ad.select_published(entries)] == [
        "10.1.2.3", "198.51.100.11", "2001:db8:100::11"]


def test_read_interface_addresses_sees_loopback() -> None:
    found = ad.read_interface_addresses()
    assert any(e.address == ipaddress.ip_address("127.0.0.1") for e in found)
    assert all(not e.address.is_loopback for e in
               [x for x in found if x.address in ad.select_published(found)])


@pytest.mark.parametrize("argv", [["status", "a..b"], ["remove", "."]])
def test_bad_input_is_refused_before_connecting(tmp_path: Path, argv: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The client checks a request as the daemon does (one protocol module): exit 2, not 3."""
    assert main(["--control", str(tmp_path / "none.sock"), *argv]) == 2
    err = capsys.readouterr().err
    assert "control socket" not in err and err.startswith("autosp: ")
