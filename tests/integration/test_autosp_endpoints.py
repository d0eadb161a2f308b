"""`autosp add` in the lab: a pinned endpoint follows its peer's address and key.

The story of issue 5, with the real pieces: the resolver (capture + provisioning over VICI +
control socket) runs inside alice with its control socket and state in the lab's run dir; bob
publishes his records with `autosp publish` (TSIG UPDATE to the real BIND primary); alice runs
`autosp add bob.example.test` and pings bob over ESP (seen on the wire by lab.wire.Capture);
bob moves (lab.move) and publishes again, `autosp refresh` makes alice's tunnel follow; bob
rolls his key over (make before break, in the two steps `--no-wait` / `--finish-rollover`,
checking alice in between) and the tunnel survives with no lost ping; after `kill -9` and a
restart of alice's resolver, `autosp list` shows the same endpoint and its tunnels come back
(also when alice's charon was restarted meanwhile and every SA is gone).

bob.example.test is a lab host that other integration tests use too: everything changed here is
put back in `finally` (bob's address, his records with the lab key and TTL, his charon).

The resolver is the real daemon, `python -m resolver --config FILE`, started in alice's
namespace with `lab.popen` (so `kill -9` hits the daemon itself).
Run with LAB_ID=k (a private lab instance) when others use the default one.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import Lab, keys
from lab.net import poll
from lab.resolverd import ResolverDaemon
from tests.helpers import children, clean_alice, endpoint_status, esp_ping, publish

pytestmark = pytest.mark.integration

NAME = "bob.example.test"
BOB_MOVED = "198.51.100.111"
LAB_TTL = 60  # lab/topology.py DEFAULT_TTL: what bob's records are put back with


def fingerprint(pem: Path) -> str:
    from resolver.ipseckey import fingerprint as fp

    return fp(keys.load_private(pem).public_key())


# --- the resolver in alice ------------------------------------------------------------------


class AliceResolver(ResolverDaemon):
    """ipseckey-resolver inside alice (lab.resolverd); control socket and state in the run dir.

    Port 5300 and no XFRM shunts, so the test's own pings and captures see only what the
    tunnels do; debug logs so a failure message shows the daemon's reasoning.
    """

    def __init__(self, lab: Lab) -> None:
        shutil.rmtree(lab.run_dir / "alice-resolver", ignore_errors=True)  # no state carried over
        super().__init__(lab, "alice", port=5300, sections={
            "log": {"level": "debug"}, "provision": {"shunts": "none"}})

    def autosp(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.lab.autosp("alice", *args, control=self.control, timeout=timeout)

    def wait_tunnel(self, want: str = "up", timeout: float = 30) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        def tunnel_is() -> bool:
            seen.append(endpoint_status(self.lab, self.control, NAME))
            return seen[-1].get("tunnel") == want

        if not poll(tunnel_is, timeout, 0.5):
            raise AssertionError(f"tunnel not {want} after {timeout} s: {seen[-1]}\n"
                                 f"{self.tail()}")
        return seen[-1]


@pytest.fixture
def resolver(lab: Lab) -> Iterator[AliceResolver]:
    r = AliceResolver(lab)
    try:
        yield r
    finally:
        r.stop()
        with contextlib.suppress(Exception):
            clean_alice(lab)


@pytest.fixture
def bob_restored(lab: Lab) -> Iterator[None]:
    """Whatever the test does to bob, put him back: address, charon (key), records."""
    original = lab.addr("bob")
    try:
        yield
    finally:
        if lab.addr("bob") != original:
            lab.move("bob", original)
        lab.restart_charon("bob")  # the lab key and responder conns again
        lab_records = ("--key", str(lab.private_key("bob")), "--address", original,
                       lab.addr("bob", 6), "--ttl", str(LAB_TTL), "--no-check")
        publish(lab, NAME, *lab_records)
        # a rollover back to the lab key leaves the new key beside it: finish it at once
        publish(lab, NAME, *lab_records, "--finish-rollover")
        lab.flush()


def _switch_bob_charon(lab: Lab, pem: Path) -> None:
    """bob's charon signs with the new key from now on (what bob's admin does after the
    rollover): load the key, reload the responder conn for alice with the new public key."""
    key = keys.load_private(pem)
    with lab.vici("bob") as s:
        s.load_key({"type": "any", "data": keys.pkcs8_der(key)})
    lab.respond_as("bob", spki=keys.spki_pem(key.public_key()))


# --- the story ------------------------------------------------------------------------------


def test_pinned_endpoint_follows_move_rollover_and_restart(
        lab: Lab, resolver: AliceResolver, bob_restored: None, tmp_path: Path) -> None:
    bob4, bob6 = lab.addr("bob"), lab.addr("bob", 6)
    old_fp = fingerprint(lab.private_key("bob"))

    # 1. bob publishes his address and key (short TTL: a travelling host's records change).
    publish(lab, NAME, "--key", str(lab.private_key("bob")), "--ttl", "5", check=True)
    lab.flush()
    resolver.start()

    # 2. alice pins bob: a tunnel per address, ESP on the wire for IPv4 and IPv6.
    r = resolver.autosp("add", NAME)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    assert f"added {NAME}." in r.stdout and re.search(r"^tunnel:\s+up$", r.stdout, re.M), \
        r.stdout
    assert "['" not in r.stdout  # aligned text, not Python reprs
    st = endpoint_status(lab, resolver.control, NAME)
    assert st["addresses"] == [bob4, bob6] and st["security"] == "secure"
    assert st["fingerprint"] == old_fp and st["algorithm"] == "ed25519"
    assert len(children(lab)) == 2 and set(children(lab).values()) == {"INSTALLED"}
    esp_ping(lab, bob4, wait=2)
    esp_ping(lab, bob6, family=6, wait=2)
    listing = resolver.autosp("list")
    assert listing.returncode == 0 and re.search(
        rf"^{re.escape(NAME)}\.\s+up\s+secure\s+ed25519\s+in \d+ (s|min)\s+{re.escape(bob4)}\n"
        rf"\s+{re.escape(bob6)}$", listing.stdout, re.M), listing.stdout
    assert all(len(line) <= 80 for line in listing.stdout.splitlines()), listing.stdout

    # 3. bob moves and publishes again; after `autosp refresh` alice's tunnel follows.
    lab.move("bob", BOB_MOVED)
    publish(lab, NAME, "--key", str(lab.private_key("bob")), "--ttl", "5", check=True)
    lab.flush()
    r = resolver.autosp("refresh", NAME)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    st = resolver.wait_tunnel()
    assert st["addresses"] == [BOB_MOVED, bob6], st
    esp_ping(lab, BOB_MOVED, wait=2)
    assert len(children(lab)) == 2  # the tunnel to the old address is gone

    # 4. bob rolls his key over, make before break.
    new_pem = tmp_path / "bob-new.pem"
    k = lab.autosp("bob", "keygen", "--out", str(new_pem), "--name", f"{NAME}.")
    assert k.returncode == 0, k.stderr
    new_fp = fingerprint(new_pem)
    #    Phase 1: both keys published. alice keeps the key in use (bob still signs with it).
    publish(lab, NAME, "--key", str(new_pem), "--ttl", "5", "--no-wait", "--no-check", check=True)
    lab.flush()
    r = resolver.autosp("refresh", NAME)
    assert r.returncode == 0, r.stdout + r.stderr
    st = endpoint_status(lab, resolver.control, NAME)
    assert st["keys_published"] == 2 and st["fingerprint"] == old_fp and st["tunnel"] == "up"
    esp_ping(lab, BOB_MOVED, wait=2)
    #    Phase 2: the old key is withdrawn and bob's charon signs with the new one. alice moves
    #    to the new key while a ping runs: the old SA carries it until the new one is up.
    publish(lab, NAME, "--key", str(new_pem), "--ttl", "5", "--finish-rollover", "--no-check",
            check=True)
    _switch_bob_charon(lab, new_pem)
    lab.flush()
    pinger = lab.popen("alice", ["ping", "-4", "-c", "30", "-i", "0.1", "-W", "1", BOB_MOVED],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    r = resolver.autosp("refresh", NAME)
    out, _ = pinger.communicate(timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    assert pinger.returncode == 0 and " 0% packet loss" in out, out
    st = endpoint_status(lab, resolver.control, NAME)
    assert st["fingerprint"] == new_fp and st["keys_published"] == 1 and st["tunnel"] == "up"
    esp_ping(lab, BOB_MOVED, wait=2)
    esp_ping(lab, bob6, family=6, wait=2)

    # 5. kill -9 and restart: the same endpoint, its tunnels come back.
    before = resolver.autosp("--json", "list").stdout
    resolver.kill9()
    assert resolver.autosp("list").returncode == 3  # daemon not running: exit 3
    resolver.start()
    st = resolver.wait_tunnel()
    assert st["addresses"] == [BOB_MOVED, bob6] and st["fingerprint"] == new_fp
    after = resolver.autosp("--json", "list").stdout
    assert _rows(after) == _rows(before), (before, after)
    assert len(children(lab)) == 2 and set(children(lab).values()) == {"INSTALLED"}
    esp_ping(lab, BOB_MOVED, wait=2)

    # 6. Harder: the resolver is killed and alice's charon restarted too (every SA gone). The
    #    restarted resolver must build the tunnels again, not just find them.
    resolver.kill9()
    lab.restart_charon("alice")
    assert children(lab) == {}
    resolver.start()
    st = resolver.wait_tunnel()
    assert st["fingerprint"] == new_fp
    assert len(children(lab)) == 2 and set(children(lab).values()) == {"INSTALLED"}
    esp_ping(lab, BOB_MOVED, wait=2)
    esp_ping(lab, bob6, family=6, wait=2)


def _rows(listing: str) -> list[dict[str, Any]]:
    """`autosp --json list` endpoints without their times (they move on)."""
    times = ("next_refresh", "last_refresh", "added")
    return [{k: v for k, v in e.items() if k not in times}
            for e in json.loads(listing)["endpoints"]]


def test_add_refuses_names_without_a_secure_key(lab: Lab, resolver: AliceResolver) -> None:
    resolver.start()
    r = resolver.autosp("add", "plain.example.test")  # signed zone, no IPSECKEY
    assert r.returncode == 1 and "no DNSSEC-secure IPSECKEY" in r.stderr, r.stderr
    r = resolver.autosp("add", "host.unsigned.test")  # an IPSECKEY, but in an unsigned zone
    assert r.returncode == 1 and "IPSECKEY" in r.stderr, r.stderr
    r = resolver.autosp("add", "nosuchhost.example.test")
    assert r.returncode == 1 and "does not exist" in r.stderr, r.stderr
    r = resolver.autosp("add", "bob.example.test", "--group", "clear")
    assert r.returncode == 2 and "private or private-or-clear" in r.stderr, r.stderr
    listing = resolver.autosp("list")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 1, listing.stdout
