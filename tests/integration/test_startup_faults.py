"""Issue 10 items 2-5 and issue 12's missing charon, end to end: the real daemon in alice.

Each test starts `ipseckey-resolver` as a program in alice (lab/resolverd.py) and looks at the
outcome where it is: alice's charon (its conns and the IKE_SAs' unique ids, which change when
a tunnel is rebuilt), alice's XFRM policies, the wire, and the daemon's exit status and
stderr. One behaviour per test:

- a second daemon (same state directory; or another state directory, same listen address)
  exits 2 with one line and the first daemon's tunnels, conns and shunts are untouched;
- a corrupt state file (empty, truncated, random bytes, wrong schema, a directory) removes
  no tunnel: the file is kept as .bad, the daemon serves, the tunnels carry traffic;
- a full or read-only state directory: a lookup that needs a new tunnel gets SERVFAIL with
  EDE 0 "cannot record tunnel state", no CHILD_SA is left behind, no later NOERROR; a start on
  a read-only state directory exits 2 before touching charon or XFRM;
- a daemon started before charon serves DNS, answers capture lookups SERVFAIL EDE 14, and
  brings the tunnel up on a lookup once charon runs.

Run: `LAB_ID=u .venv/bin/python -m pytest -q tests/integration/test_startup_faults.py`
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.rcode
import pytest

from lab import Lab
from lab.net import poll
from lab.probes import python_argv
from lab.resolverd import ResolverDaemon
from tests.helpers import (
    blocked_ping,
    children,
    clean_alice,
    ede,
    esp_ping,
    our_conns,
    shunted,
)

pytestmark = pytest.mark.integration

PRIVATE = {"default": "private"}

# --- helpers ----------------------------------------------------------------------------------


def held(lab: Lab) -> tuple[dict[str, str], set[str], set[str]]:
    """What a daemon may touch in alice: our IKE_SAs (conn -> unique id), our conns, shunts."""
    sas = {name: str(sa["uniqueid"]) for name, sa in lab.ike_sas("alice")
           if name.startswith("isk-")}
    return sas, set(our_conns(lab)), shunted(lab)


def own_daemon(lab: Lab, name: str, policy: dict[str, Any] | None = None,
               provision: dict[str, Any] | None = None,
               state: Path | None = None) -> ResolverDaemon:
    """A daemon of this test (fresh directory); `state`: where its state files go."""
    shutil.rmtree(lab.run_dir / name, ignore_errors=True)
    sections: dict[str, dict[str, Any]] = {"policy": policy or PRIVATE,
                                           "provision": dict(provision or {})}
    if state is not None:
        sections["provision"]["state_file"] = str(state / "provision.json")
        sections["control"] = {"state_file": str(state / "endpoints.json")}
    return ResolverDaemon(lab, "alice", sections=sections, name=name)


def run_once(lab: Lab, d: ResolverDaemon, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the daemon of `d`'s configuration in alice and wait for it to exit (a start that
    is expected to be refused)."""
    return lab.exec("alice", python_argv("-m", "resolver", "--config", str(d.config)),
                    timeout=timeout, check=False)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr  # one line, no traceback, no log
    return lines[0]


def up(d: ResolverDaemon, *names: str) -> None:
    for n in names:
        reply = d.query(f"{n}.example.test.")
        assert reply.rcode() == dns.rcode.NOERROR, f"{reply}\n{d.tail()}"


@pytest.fixture
def alice(lab: Lab) -> Iterator[Lab]:
    """alice without traces of the resolver before and after the test."""
    clean_alice(lab)
    try:
        yield lab
    finally:
        clean_alice(lab)


@pytest.fixture
def tmpfs(lab: Lab) -> Iterator[Path]:
    """A 1 MiB tmpfs for a daemon's state directory (mounted before the daemon starts, so its
    mount namespace sees it; filling it up or remounting it read-only reaches the daemon)."""
    path = lab.run_dir / "h9-tmpfs"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its file system is full."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


# --- item 2: one owner ----------------------------------------------------------------------


def test_second_instance_exits_and_touches_nothing(alice: Lab) -> None:
    lab = alice
    a = own_daemon(lab, "h9-owner")
    a.start()
    try:
        up(a, "bob", "carol")
        assert a.query("plain.example.test.").rcode() == dns.rcode.SERVFAIL  # + drop shunt
        before = held(lab)
        assert len(before[0]) == 2 and lab.addr("plain") in before[2]
        assert a.proc is not None

        # B: the same configuration (same state directory, same listen address)
        b = run_once(lab, a)
        assert b.returncode == 2
        line = one_line(b.stderr)
        assert f"another ipseckey-resolver is running (pid {a.proc.pid})" in line, line
        assert held(lab) == before

        # C: another state directory, the same listen address
        c = own_daemon(lab, "h9-intruder")
        r = run_once(lab, c)
        assert r.returncode == 2
        assert one_line(r.stderr) == \
            "ipseckey-resolver: cannot listen on 127.0.0.1:53: Address already in use"
        assert held(lab) == before  # its reconcile never ran: nothing of A's was removed

        # A serves as before: tunnels carry traffic, the private destination stays dropped
        up(a, "carol")
        esp_ping(lab, lab.addr("carol"), port="carol", count=2)
        reply = a.query("plain.example.test.")
        assert reply.rcode() == dns.rcode.SERVFAIL and ede(reply)[0] == 28
        blocked_ping(lab, lab.addr("plain"), port="plain")
    finally:
        a.stop()


# --- item 3: state that cannot destroy tunnels ----------------------------------------------

def corrupt(state: Path, kind: str) -> bytes | None:
    """Damage the state file; returns what the .bad copy must hold (None: a directory)."""
    data = {"empty": b"",
            "truncated": state.read_bytes()[: len(state.read_bytes()) // 2],
            "random": bytes((i * 37 + 11) % 256 for i in range(700)),
            "wrong schema": json.dumps({"version": 1, "tunnels": "bob", "shunts": []}).encode()}
    if kind == "directory":
        state.unlink()
        state.mkdir()
        (state / "x").write_text("x")
        return None
    state.write_bytes(data[kind])
    return data[kind]


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "wrong schema", "directory"])
def test_corrupt_state_file_removes_no_tunnel(alice: Lab, kind: str) -> None:
    lab = alice
    d = own_daemon(lab, f"h9-corrupt-{kind.replace(' ', '-')}")
    d.start()
    try:
        up(d, "bob", "carol")
        assert d.query("plain.example.test.").rcode() == dns.rcode.SERVFAIL
        assert d.stop() == 0
        before = held(lab)
        assert len(before[0]) == 2 and lab.addr("plain") in before[2]
        state = d.dir / "provision.json"
        kept = corrupt(state, kind)

        d.start()
        assert held(lab) == before  # no tunnel, conn or shunt removed, none rebuilt
        bad = d.dir / "provision.json.bad"
        if kept is None:
            assert (bad / "x").read_text() == "x"
        else:
            assert bad.read_bytes() == kept
        doc = json.loads(state.read_text())  # a fresh file, recording what was adopted
        assert sorted(e["name"] for e in doc["adopted"]) == sorted(before[1])
        assert "no trustworthy state: adopting 2 tunnel(s) and 1 drop shunt(s)" in d.tail()

        esp_ping(lab, lab.addr("carol"), port="carol", count=2)  # adopted: still carrying
        up(d, "bob")  # a lookup sets bob's up again under the key in DNS
        esp_ping(lab, lab.addr("bob"), port="bob", count=2)
        assert children(lab, "isk-bob-") == {n: "INSTALLED" for n in before[1]
                                              if n.startswith("isk-bob-")}
        reply = d.query("plain.example.test.")
        assert reply.rcode() == dns.rcode.SERVFAIL
        blocked_ping(lab, lab.addr("plain"), port="plain")
        assert "Traceback" not in d.tail(200)
    finally:
        d.stop()


# --- item 4: state directory full or read-only ------------------------------------------------


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_unwritable_state_directory_gives_clear_ede_and_no_orphan_sa(
        alice: Lab, tmpfs: Path, fault: str) -> None:
    lab = alice
    d = own_daemon(lab, f"h9-{fault}", provision={"failure_hold": 0}, state=tmpfs)
    d.start()
    filler: Path | None = None
    try:
        up(d, "bob")  # a tunnel recorded while there was room
        if fault == "full":
            filler, why = fill(tmpfs), "No space left on device"
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
            why = "Read-only file system"
        carol = lab.addr("carol")
        for _ in range(2):  # and again: never a NOERROR over an SA the state does not hold
            reply = d.query("carol.example.test.")
            assert reply.rcode() == dns.rcode.SERVFAIL, reply
            code, text = ede(reply)
            assert code == 0 and text.startswith(f"cannot record tunnel state: {why}"), text
            assert children(lab, "isk-carol-") == {}  # the SA it made was undone
            assert our_conns(lab, "carol-") == []
            assert carol in shunted(lab)  # private: dropped, not sent in clear
        blocked_ping(lab, carol, port="carol", eperm=False)
        esp_ping(lab, lab.addr("bob"), port="bob", count=2)  # the recorded one is untouched
        log = d.tail(200)
        assert "bug: handler failed" not in log and "Traceback" not in log

        # a start on this state directory is refused before it touches charon or XFRM
        before = held(lab)
        assert d.stop() == 0
        if fault == "full":
            r = run_once(lab, d)
            assert r.returncode == 2 and one_line(r.stderr) == (
                f"ipseckey-resolver: state directory {tmpfs} is not writable: {why}")
            assert held(lab) == before
            filler.unlink()  # room again: the same lookup now succeeds
        else:
            r = run_once(lab, d)
            assert r.returncode == 2 and one_line(r.stderr) == (
                f"ipseckey-resolver: state directory {tmpfs} is not writable: {why}")
            assert held(lab) == before
            subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
        d.start()
        up(d, "carol")
        esp_ping(lab, carol, port="carol", count=2)
        names = [e["name"] for e in json.loads((tmpfs / "provision.json").read_text())["tunnels"]]
        assert any(n.startswith("isk-carol-") for n in names), names
    finally:
        d.stop()
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=False)


# --- item 5 / issue 12: the daemon before charon ----------------------------------------------


def test_daemon_started_before_charon_serves_dns_then_tunnels(alice: Lab) -> None:
    lab = alice
    policy = {"default": "private-or-clear", "private": [f"{lab.addr('bob')}/32"]}
    d = own_daemon(lab, "h9-before-charon", policy=policy)
    try:
        with lab.charon_stopped("alice"):
            d.start()  # no traceback, no exit: DNS is up
            warned = [ln for ln in d.tail().splitlines() if "IKE daemon not" in ln]
            assert len(warned) == 2, d.tail()  # the check's warning and the provisioner's
            plain = d.query("plain.example.test.")
            assert plain.rcode() == dns.rcode.NOERROR  # plain names answer
            reply = d.query("bob.example.test.")
            assert reply.rcode() == dns.rcode.SERVFAIL
            code, text = ede(reply)
            assert code == 14 and "not ready" in text, text
            assert lab.addr("bob") in shunted(lab)  # private: dropped meanwhile
        # charon runs again: the retry connects (every 2 s) and the next lookup tunnels
        t0 = time.monotonic()
        ok = poll(lambda: d.query("bob.example.test.").rcode() == dns.rcode.NOERROR, 15, 0.5)
        assert ok, d.tail()
        esp_ping(lab, lab.addr("bob"), port="bob", count=2)
        assert "IKE daemon connected" in d.tail()
        assert time.monotonic() - t0 < 15
        reply = d.query("plain.example.test.")
        assert reply.rcode() == dns.rcode.NOERROR
    finally:
        d.stop()
