"""What autosp prints and its exit statuses, case by case as the README documents them:
aligned text (no Python reprs), --json, times both ways, 80 columns, help, bad input."""

from __future__ import annotations

import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from autosp import output
from autosp.cli import main

NOW = 1_800_000_000.0
BOB = {"name": "bob.example.test.", "addresses": ["198.51.100.11", "2001:db8:100::11"],
       "algorithm": "ed25519", "fingerprint": "SHA256:q5ab9FmeCPnHX1", "security": "secure",
       "tunnel": "up", "next_refresh": NOW + 40, "error": "", "group": "private",
       "keys_published": 1, "tunnels": "198.51.100.11 up, 2001:db8:100::11 up",
       "last_refresh": NOW - 20, "added": NOW - 3600}


def serve(path: Path, replies: list[dict[str, Any]], seen: list[dict[str, Any]]) -> None:
    """A control socket answering one request per reply, in order."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen()

    def run() -> None:
        with srv:
            for reply in replies:
                conn, _ = srv.accept()
                with conn:
                    seen.append(json.loads(conn.makefile().readline()))
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize(("delta", "text"), [
    (5, "in 5 s"), (-5, "5 s ago"), (0.4, "now"), (-0.4, "now"), (-1.4, "1 s ago"),
    (300, "in 5 min"), (-7300, "2 h ago"), (3 * 86400, "in 3 d")])
def test_relative_times_both_ways(delta: float, text: str) -> None:
    assert output.relative(delta) == text


def test_status_is_aligned_text_with_times_absolute_and_relative() -> None:
    lines = output.endpoint({**BOB, "error": "peer timed out", "code": "tunnel-failed"},
                            NOW).splitlines()
    colon = {ln.index(":") for ln in lines}
    values = {len(ln) - len(ln.split(":", 1)[1].lstrip()) for ln in lines}
    assert len(values) == 1, lines  # every value starts in the same column
    assert lines[0].split() == ["name:", "bob.example.test."]
    assert "addresses:" in lines[3] and lines[3].endswith("198.51.100.11, 2001:db8:100::11")
    assert any(ln.endswith("2027-01-15 08:00:40 UTC (in 40 s)") for ln in lines)
    assert any(ln.endswith("2027-01-15 07:59:40 UTC (20 s ago)") for ln in lines)
    assert lines[-1].split(None, 1) == ["error:", "peer timed out (tunnel-failed)"]
    assert not any("[" in ln or "None" in ln for ln in lines), lines
    assert colon  # labels end in ':'
    unknown = output.endpoint({**BOB, "added": None, "last_refresh": None}, NOW).splitlines()
    assert [ln.split() for ln in unknown if ln.startswith(("added", "last"))] == [
        ["last", "refresh:", "-"], ["added:", "-"]]


def test_list_fits_80_columns_with_addresses_one_per_line() -> None:
    eps = [BOB, {**BOB, "name": "vpn.branch.example.test.", "tunnel": "partial",
                 "next_refresh": NOW - 3}]
    lines = output.table(eps, NOW).splitlines()
    assert all(len(ln) <= 80 for ln in lines), [len(ln) for ln in lines]
    assert lines[1].split() == ["bob.example.test.", "up", "secure", "ed25519", "in", "40", "s",
                                "198.51.100.11"]
    assert lines[2].strip() == "2001:db8:100::11"
    assert "3 s ago" in lines[3]
    assert output.table([], NOW).startswith("no endpoints")


def test_add_prints_aligned_text_and_json_for_scripts(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sock, seen = tmp_path / "c.sock", []
    serve(sock, [{"ok": True, "result": BOB}] * 2, seen)
    assert main(["--control", str(sock), "add", "bob.example.test", "--group", "private"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "added bob.example.test."
    assert "['" not in out and "addresses:" in out
    assert main(["--control", str(sock), "--json", "status", "bob.example.test"]) == 0
    assert json.loads(capsys.readouterr().out) == BOB
    assert seen == [{"op": "add", "name": "bob.example.test.", "group": "private"},
                    {"op": "status", "name": "bob.example.test."}]


def test_stats_prints_one_line_per_sample(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    snap = [{"name": "x_total", "type": "counter", "help": "h",
             "samples": [{"name": "x_total", "labels": {"reason": "timeout"}, "value": 2.0}]}]
    sock, seen = tmp_path / "c.sock", []
    serve(sock, [{"ok": True, "result": {"now": NOW, "metrics": snap}}], seen)
    assert main(["--control", str(sock), "stats"]) == 0
    assert capsys.readouterr().out == 'x_total{reason="timeout"} 2\n'
    assert seen == [{"op": "stats"}]


@pytest.mark.parametrize("argv", [["add", "bad name!!"], ["add", "a..b"],
                                  ["status", "-bad-.example."],
                                  ["add", "ok.example.", "--group", "secret"],
                                  ["add", "ok.example.", "--group", "clear"],
                                  ["add", "ok.example.", "--group", "block"]])
def test_bad_input_exits_2_without_asking_the_daemon(tmp_path: Path, argv: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:  # argparse's own errors exit 2 as well
        raise SystemExit(main(["--control", str(tmp_path / "none.sock"), *argv]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "control socket" not in err and "Traceback" not in err


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    def help_of(*cmd: str) -> str:
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        return capsys.readouterr().out

    add = " ".join(re.sub(r"-\s+", "-", help_of("add")).split())  # argparse wraps at hyphens
    # The groups a pinned endpoint may have, and the others named as refused (exit 2 below).
    assert "private or private-or-clear (block, clear-or-private, clear make no tunnel" in add
    for cmd in ("status", "remove", "refresh"):
        text = help_of(cmd)
        positional = text.split("positional arguments:")[1].split("options:")[0]
        assert "name" in positional and len(positional.split()) > 2, text
    for cmd in ("keygen", "publish"):
        text = help_of(cmd)
        assert "3 " not in text.split("exit status:")[1], text
    assert "3 resolver not running" in " ".join(help_of("add").split())


def test_keygen_prints_the_key_unsplit(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--algorithm", "rsa", "--out", str(tmp_path / "k.pem"),
                 "--name", "h.example.test."]) == 0
    line = capsys.readouterr().out.strip()
    fields = line.split()
    assert fields[:4] == ["h.example.test.", "3600", "IN", "IPSECKEY"]
    assert len(fields) == 9 and len(fields[-1]) > 300  # one base64 word of a 3072-bit key
