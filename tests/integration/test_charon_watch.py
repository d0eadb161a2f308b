"""Issue 10, items 1 and 8, end to end: the daemon watches charon, and one address has one key.

The real daemon runs in alice (lab.resolverd, [policy] default = "private") over alice's real
charon; the outcome is looked at where it is: DNS replies from inside alice, alice's charon over
VICI, alice's XFRM policies, the daemon's log, and the wire (tcpdump on the lab switch, so a
packet "in clear" is one a LAN observer saw).

Item 1, "watch charon, do not trust the picture":
  * alice's charon stops with a private tunnel (carol) and a pinned endpoint (dave) up: at once
    a drop shunt, SERVFAIL with an EDE, no ping in clear on carol's switch port, `autosp
    status` no longer says up, the log says why; charon starts again: within RECOVERY seconds
    the tunnels are back (measured and printed), the lookup answers, the ping goes over ESP.
  * bob terminates the SA from his side: the daemon sees child-updown and brings it back.
  * a rekey (CHILD_SA and IKE_SA) is not a "down": no log line, no shunt, same answers.
Item 8, "one address, two names, two keys": multi.example.test has bob's address and, at its
best precedence, bob's key: answered over bob's tunnel, which is neither replaced nor re-keyed.
A name published with another key for bob's address is SERVFAIL (EDE 28, "bound") and bob's
tunnel is untouched.

Run: `LAB_ID=w .venv/bin/python -m pytest -q tests/integration/test_charon_watch.py`
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import pytest
from cryptography.hazmat.primitives import serialization

from lab import Lab
from lab.resolverd import ResolverDaemon
from lab.wire import Capture
from resolver.ipseckey import ipseckey_rdata_for
from tests.integration.test_issue4_daemon import (
    addresses,
    ask,
    children,
    clean_alice,
    conns,
    edes,
    ike_sas,
    ping,
    shunted,
    update,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EDE_POLICY = 28  # Unable to conform to policy: the address is bound to another name's key
EDE_NOT_READY = 14  # the IKE daemon is unreachable
RECOVERY = 10.0  # seconds from charon's restart until the tunnels must be back
SQUATTER = "squatter.example.test"


def wait_for(check: Callable[[], Any], timeout: float, what: str, pause: float = 0.05) -> float:
    """Poll `check` until it is true; returns the seconds it took (AssertionError if never)."""
    t0 = time.monotonic()
    while True:
        if check():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(pause)


def autosp(lab: Lab, control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m autosp --control SOCK ARGS` inside alice."""
    result: subprocess.CompletedProcess[str] = lab.exec(
        "alice", ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "autosp", "--control",
                  str(control), *args], timeout=60, check=False)
    return result


def endpoint_tunnel(lab: Lab, control: Path, name: str) -> str:
    """The `tunnel:` line of `autosp status NAME`."""
    r = autosp(lab, control, "status", name)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    return lines.get("tunnel", "")


def installed(lab: Lab, label: str) -> bool:
    states = children(lab, f"isk-{label}-")
    return bool(states) and set(states.values()) == {"INSTALLED"}


def ike_ids(lab: Lab, label: str) -> set[str]:
    return {str(sa["uniqueid"]) for name, sa in ike_sas(lab) if name.startswith(f"isk-{label}-")}


def esp_ping(lab: Lab, host: str, count: int = 2) -> None:
    a, b = lab.addr("alice"), lab.addr(host)
    with Capture(lab.switch_ns, f"v-{host}", ["host", a, "and", "host", b]) as cap:
        rc, out = ping(lab, b, count)
    assert rc == 0, out
    assert cap.esp(a, b) and cap.esp(b, a), cap.lines
    assert cap.cleartext_icmp() == [], cap.lines


class Log:
    """The daemon's log from a mark on (what it said about one step)."""

    def __init__(self, daemon: ResolverDaemon) -> None:
        self.daemon = daemon
        self.mark()

    def mark(self) -> None:
        self.offset = self.daemon.log.stat().st_size if self.daemon.log.exists() else 0

    def since(self) -> str:
        with open(self.daemon.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")


@pytest.fixture
def daemon(lab: Lab) -> Iterator[ResolverDaemon]:
    """A private-policy daemon of its own in alice (fresh state); charon put back afterwards."""
    clean_alice(lab)
    shutil.rmtree(lab.run_dir / "watch-resolver", ignore_errors=True)
    d = ResolverDaemon(lab, "alice", name="watch-resolver",
                       sections={"policy": {"default": "private", "max_ttl": 5}})
    d.start()
    try:
        yield d
    finally:
        d.stop()
        lab.start_charon("alice")  # a no-op unless a test left it stopped
        clean_alice(lab)


# --- item 1 -----------------------------------------------------------------------------------


def stop_charon(lab: Lab, how: str) -> None:
    """Stop alice's charon: "stop" (SIGTERM: it deletes its SAs and says so on VICI first) or
    "crash" (SIGKILL: no event at all, the VICI session just closes)."""
    if how == "crash":
        pid = int((lab.run_dir / "pids" / "charon-alice.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    lab.stop_charon("alice")  # (after a crash: reaps it and removes its pid file and socket)


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_charon_restart_fails_closed_then_tunnels_return(lab: Lab, daemon: ResolverDaemon,
                                                         how: str) -> None:
    carol, dave = lab.addr("carol"), lab.addr("dave")
    log = Log(daemon)
    assert ask(lab, "carol.example.test.").rcode() == dns.rcode.NOERROR
    r = autosp(lab, daemon.control, "add", "dave.example.test")
    assert r.returncode == 0 and "tunnel: up" in r.stdout, r.stdout + r.stderr + daemon.tail()
    assert installed(lab, "carol") and installed(lab, "dave")

    stop_charon(lab, how)
    took = wait_for(lambda: {carol, dave} <= shunted(lab), 3.0, "drop shunts after charon died")
    print(f"\ncharon {how} -> drop shunts for carol and dave in {took:.2f} s")
    reply = ask(lab, "carol.example.test.")
    assert reply.rcode() == dns.rcode.SERVFAIL, reply
    assert edes(reply) == [EDE_NOT_READY], reply
    with Capture(lab.switch_ns, "v-carol", ["host", carol]) as cap:
        rc, out = ping(lab, carol, 2)
    assert rc != 0, out
    assert cap.cleartext_icmp() == [], cap.lines
    assert endpoint_tunnel(lab, daemon.control, "dave.example.test") != "up"
    said = log.since()
    assert "charon connection lost" in said, said

    t0 = time.monotonic()
    lab.start_charon("alice")  # returns once charon answers on VICI (the lab's conns loaded)
    started = time.monotonic() - t0
    back = wait_for(lambda: installed(lab, "carol") and installed(lab, "dave"), RECOVERY,
                    "tunnels back after charon restarted", pause=0.02)
    up = wait_for(lambda: endpoint_tunnel(lab, daemon.control, "dave.example.test") == "up",
                  RECOVERY - back, "autosp status up again", pause=0.2)
    print(f"charon start took {started:.2f} s; then CHILD_SAs (carol, dave v4+v6) INSTALLED "
          f"after {back:.2f} s; `autosp status` up {up:.2f} s later")
    wait_for(lambda: not ({carol, dave} & shunted(lab)), 3.0, "shunts removed")
    reply = ask(lab, "carol.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [carol], reply
    esp_ping(lab, "carol")
    esp_ping(lab, "dave")


def test_sa_terminated_by_the_peer_comes_back(lab: Lab, daemon: ResolverDaemon) -> None:
    log = Log(daemon)
    assert ask(lab, "bob.example.test.").rcode() == dns.rcode.NOERROR
    before = ike_ids(lab, "bob")
    assert len(before) == 1
    with lab.vici("bob") as s:
        for _ in s.terminate({"ike": "peer-alice", "force": "yes", "timeout": 2000}):
            pass
    took = wait_for(lambda: installed(lab, "bob") and ike_ids(lab, "bob") - before, RECOVERY,
                    "bob's tunnel re-established")
    print(f"\nSA terminated by bob -> new CHILD_SA INSTALLED after {took:.2f} s")
    said = log.since()
    assert f"tunnel to bob.example.test ({lab.addr('bob')}) went down" in said, said
    assert ask(lab, "bob.example.test.").rcode() == dns.rcode.NOERROR
    esp_ping(lab, "bob")


def test_rekey_is_not_a_down(lab: Lab, daemon: ResolverDaemon) -> None:
    assert ask(lab, "bob.example.test.").rcode() == dns.rcode.NOERROR
    name = next(iter(children(lab, "isk-bob-")))
    log = Log(daemon)
    with lab.vici("alice") as s:
        for _ in s.rekey({"child": name}):
            pass
        time.sleep(0.5)
        for _ in s.rekey({"ike": name}):
            pass
    time.sleep(1.5)  # events delivered and (if it were wrong) acted on
    said = log.since()
    assert "went down" not in said and "lost" not in said, said
    assert lab.addr("bob") not in shunted(lab)
    assert installed(lab, "bob")
    assert ask(lab, "bob.example.test.").rcode() == dns.rcode.NOERROR
    esp_ping(lab, "bob")


# --- item 8 -----------------------------------------------------------------------------------


def _publish_squatter(lab: Lab) -> Callable[[], None]:
    """squatter.example.test: bob's address with carol's key (secure: the zone signs it)."""
    key = serialization.load_pem_private_key(lab.private_key("carol").read_bytes(), None)
    rdata = ipseckey_rdata_for(key.public_key())  # type: ignore[arg-type]
    update(lab, lambda m: (m.replace("squatter", 60, "A", lab.addr("bob")),
                           m.replace("squatter", 60, rdata)))
    return lambda: update(lab, lambda m: m.delete("squatter"))


def test_one_address_two_names_two_keys(lab: Lab, daemon: ResolverDaemon) -> None:
    bob = lab.addr("bob")
    assert ask(lab, "bob.example.test.").rcode() == dns.rcode.NOERROR
    bob_conn = next(iter(children(lab, "isk-bob-")))
    before = ike_ids(lab, "bob")

    # Same address, same key (multi's best IPSECKEY is bob's): answered over bob's tunnel.
    reply = ask(lab, "multi.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [bob], reply
    assert [c for c in conns(lab) if c.startswith("isk-multi-")] == []
    assert ike_ids(lab, "bob") == before and bob_conn in conns(lab)

    # Same address, another key: SERVFAIL saying why; bob's tunnel is not touched.
    undo = _publish_squatter(lab)
    try:
        log = Log(daemon)
        reply = ask(lab, f"{SQUATTER}.")
        assert reply.rcode() == dns.rcode.SERVFAIL, reply
        ede = [o for o in reply.options if isinstance(o, dns.edns.EDEOption)]
        assert [int(o.code) for o in ede] == [EDE_POLICY], reply
        assert "bound" in (ede[0].text or "") and "bob.example.test" in (ede[0].text or "")
        assert [c for c in conns(lab) if c.startswith("isk-squatter-")] == []
        assert "replacing tunnel" not in log.since()
        assert ike_ids(lab, "bob") == before and installed(lab, "bob")
        assert bob not in shunted(lab)
        esp_ping(lab, "bob")
    finally:
        undo()
