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
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.resolverd import ResolverDaemon
from lab.topology import HOSTS, ZONES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PRIMARY = HOSTS[ZONES["example.test."].server].v4
NAME = "bob.example.test"
BOB_MOVED = "198.51.100.111"
LAB_TTL = 60  # lab/topology.py DEFAULT_TTL: what bob's records are put back with


def _env() -> list[str]:
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
    return ["env", f"PYTHONPATH={path}"]


def autosp(lab: Any, host: str, *args: str, control: Path | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m autosp ARGS` inside a lab host (never from the host namespace)."""
    pre = ["--control", str(control)] if control is not None else []
    result: subprocess.CompletedProcess[str] = lab.exec(
        host, [*_env(), sys.executable, "-m", "autosp", *pre, *args], timeout=timeout,
        check=False)
    return result


def publish(lab: Any, *args: str) -> subprocess.CompletedProcess[str]:
    r = autosp(lab, "bob", "publish", NAME, "--server", PRIMARY, "--tsig-key",
               str(lab.tsig_keyfile), "--resolver", lab.unbound_addr, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def status(lab: Any, control: Path) -> dict[str, Any]:
    """`autosp --json status NAME` (the form for scripts)."""
    r = autosp(lab, "alice", "--json", "status", NAME, control=control)
    assert r.returncode == 0, r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def fingerprint(pem: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    from resolver.ipseckey import fingerprint as fp

    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    return fp(key.public_key())  # type: ignore[arg-type]


def esp_ping(lab: Any, dst: str, family: int = 4, count: int = 3) -> None:
    """alice pings dst; every echo and reply crosses the wire as ESP, none in clear."""
    src = lab.addr("alice", family)
    with _capture(lab, src, dst) as cap:
        r = lab.exec("alice", ["ping", f"-{family}", "-c", str(count), "-i", "0.2", "-W", "2",
                               dst], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(cap.esp(src, dst)) >= count and len(cap.esp(dst, src)) >= count, cap.lines
    assert cap.cleartext_icmp() == [], cap.cleartext_icmp()


@contextlib.contextmanager
def _capture(lab: Any, a: str, b: str) -> Iterator[Any]:
    from lab.wire import Capture

    with Capture(lab.switch_ns, "v-alice", ["host", a, "and", "host", b]) as cap:
        yield cap


def alice_conns(lab: Any) -> dict[str, str]:
    """alice's charon: our ("isk-") CHILD_SAs and their states."""
    from lab import ike

    with lab.vici("alice") as s:
        return {k: v for k, v in ike.child_states(s).items() if k.startswith("isk-")}


# --- the resolver in alice ------------------------------------------------------------------


class AliceResolver(ResolverDaemon):
    """ipseckey-resolver inside alice (lab.resolverd); control socket and state in the run dir.

    Port 5300 and no XFRM shunts, so the test's own pings and captures see only what the
    tunnels do; debug logs so a failure message shows the daemon's reasoning.
    """

    def __init__(self, lab: Any) -> None:
        shutil.rmtree(lab.run_dir / "alice-resolver", ignore_errors=True)  # no state carried over
        super().__init__(lab, "alice", port=5300, sections={
            "log": {"level": "debug"}, "provision": {"shunts": "none"}})

    def autosp(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return autosp(self.lab, "alice", *args, control=self.control, timeout=timeout)

    def wait_tunnel(self, want: str = "up", timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = status(self.lab, self.control)
            if st.get("tunnel") == want:
                return st
            time.sleep(0.5)
        raise AssertionError(f"tunnel not {want} after {timeout} s: {st}\n{self.tail()}")


@pytest.fixture
def resolver(lab: Any) -> Iterator[AliceResolver]:
    r = AliceResolver(lab)
    try:
        yield r
    finally:
        r.stop()
        _remove_alice_conns(lab)


def _remove_alice_conns(lab: Any) -> None:
    from lab import ike

    with contextlib.suppress(Exception), lab.vici("alice") as s:
        for conn in list(s.list_conns()):
            for name in conn:
                n = name.decode() if isinstance(name, bytes) else str(name)
                if n.startswith("isk-"):
                    ike.close(s, n)


@pytest.fixture
def bob_restored(lab: Any) -> Iterator[None]:
    """Whatever the test does to bob, put him back: address, charon (key), records."""
    original = lab.addr("bob")
    try:
        yield
    finally:
        if lab.addr("bob") != original:
            lab.move("bob", original)
        lab.stop_charon("bob")
        lab.start_charon("bob")  # the lab key and responder conns again
        autosp(lab, "bob", "publish", NAME, "--server", PRIMARY, "--tsig-key",
               str(lab.tsig_keyfile), "--key", str(lab.private_key("bob")), "--address",
               original, lab.addr("bob", 6), "--ttl", str(LAB_TTL), "--no-check")
        # a rollover back to the lab key leaves the new key beside it: finish it at once
        autosp(lab, "bob", "publish", NAME, "--server", PRIMARY, "--tsig-key",
               str(lab.tsig_keyfile), "--key", str(lab.private_key("bob")), "--address",
               original, lab.addr("bob", 6), "--ttl", str(LAB_TTL), "--no-check",
               "--finish-rollover")
        lab.flush()


def _switch_bob_charon(lab: Any, pem: Path) -> None:
    """bob's charon signs with the new key from now on (what bob's admin does after the
    rollover): load the key, reload the responder conn for alice with the new public key."""
    from cryptography.hazmat.primitives import serialization

    from lab import ike
    from lab.topology import HOSTS as H

    key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    spki = key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with lab.vici("bob") as s:
        s.load_key({"type": "any", "data": der})
        s.load_conn(ike.responder_conn(H["bob"], H["alice"], spki, lab.public_key_pem("alice")))


# --- the story ------------------------------------------------------------------------------


def test_pinned_endpoint_follows_move_rollover_and_restart(
        lab: Any, resolver: AliceResolver, bob_restored: None, tmp_path: Path) -> None:
    bob4, bob6 = lab.addr("bob"), lab.addr("bob", 6)
    old_fp = fingerprint(lab.private_key("bob"))

    # 1. bob publishes his address and key (short TTL: a travelling host's records change).
    publish(lab, "--key", str(lab.private_key("bob")), "--ttl", "5")
    lab.flush()
    resolver.start()

    # 2. alice pins bob: a tunnel per address, ESP on the wire for IPv4 and IPv6.
    r = resolver.autosp("add", NAME)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    assert f"added {NAME}." in r.stdout and re.search(r"^tunnel:\s+up$", r.stdout, re.M), \
        r.stdout
    assert "['" not in r.stdout  # aligned text, not Python reprs
    st = status(lab, resolver.control)
    assert st["addresses"] == [bob4, bob6] and st["security"] == "secure"
    assert st["fingerprint"] == old_fp and st["algorithm"] == "ed25519"
    assert len(alice_conns(lab)) == 2 and set(alice_conns(lab).values()) == {"INSTALLED"}
    esp_ping(lab, bob4)
    esp_ping(lab, bob6, family=6)
    listing = resolver.autosp("list")
    assert listing.returncode == 0 and re.search(
        rf"^{re.escape(NAME)}\.\s+up\s+secure\s+ed25519\s+in \d+ (s|min)\s+{re.escape(bob4)}\n"
        rf"\s+{re.escape(bob6)}$", listing.stdout, re.M), listing.stdout
    assert all(len(line) <= 80 for line in listing.stdout.splitlines()), listing.stdout

    # 3. bob moves and publishes again; after `autosp refresh` alice's tunnel follows.
    lab.move("bob", BOB_MOVED)
    publish(lab, "--key", str(lab.private_key("bob")), "--ttl", "5")
    lab.flush()
    r = resolver.autosp("refresh", NAME)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    st = resolver.wait_tunnel()
    assert st["addresses"] == [BOB_MOVED, bob6], st
    esp_ping(lab, BOB_MOVED)
    assert len(alice_conns(lab)) == 2  # the tunnel to the old address is gone

    # 4. bob rolls his key over, make before break.
    new_pem = tmp_path / "bob-new.pem"
    k = autosp(lab, "bob", "keygen", "--out", str(new_pem), "--name", f"{NAME}.")
    assert k.returncode == 0, k.stderr
    new_fp = fingerprint(new_pem)
    #    Phase 1: both keys published. alice keeps the key in use (bob still signs with it).
    publish(lab, "--key", str(new_pem), "--ttl", "5", "--no-wait", "--no-check")
    lab.flush()
    r = resolver.autosp("refresh", NAME)
    assert r.returncode == 0, r.stdout + r.stderr
    st = status(lab, resolver.control)
    assert st["keys_published"] == 2 and st["fingerprint"] == old_fp and st["tunnel"] == "up"
    esp_ping(lab, BOB_MOVED)
    #    Phase 2: the old key is withdrawn and bob's charon signs with the new one. alice moves
    #    to the new key while a ping runs: the old SA carries it until the new one is up.
    publish(lab, "--key", str(new_pem), "--ttl", "5", "--finish-rollover", "--no-check")
    _switch_bob_charon(lab, new_pem)
    lab.flush()
    pinger = lab.popen("alice", ["ping", "-4", "-c", "30", "-i", "0.1", "-W", "1", BOB_MOVED],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    r = resolver.autosp("refresh", NAME)
    out, _ = pinger.communicate(timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr + resolver.tail()
    assert pinger.returncode == 0 and " 0% packet loss" in out, out
    st = status(lab, resolver.control)
    assert st["fingerprint"] == new_fp and st["keys_published"] == 1 and st["tunnel"] == "up"
    esp_ping(lab, BOB_MOVED)
    esp_ping(lab, bob6, family=6)

    # 5. kill -9 and restart: the same endpoint, its tunnels come back.
    before = resolver.autosp("--json", "list").stdout
    resolver.kill9()
    assert resolver.autosp("list").returncode == 3  # daemon not running: exit 3
    resolver.start()
    st = resolver.wait_tunnel()
    assert st["addresses"] == [BOB_MOVED, bob6] and st["fingerprint"] == new_fp
    after = resolver.autosp("--json", "list").stdout
    assert _rows(after) == _rows(before), (before, after)
    assert len(alice_conns(lab)) == 2 and set(alice_conns(lab).values()) == {"INSTALLED"}
    esp_ping(lab, BOB_MOVED)

    # 6. Harder: the resolver is killed and alice's charon restarted too (every SA gone). The
    #    restarted resolver must build the tunnels again, not just find them.
    resolver.kill9()
    lab.stop_charon("alice")
    lab.start_charon("alice")
    assert alice_conns(lab) == {}
    resolver.start()
    st = resolver.wait_tunnel()
    assert st["fingerprint"] == new_fp
    assert len(alice_conns(lab)) == 2 and set(alice_conns(lab).values()) == {"INSTALLED"}
    esp_ping(lab, BOB_MOVED)
    esp_ping(lab, bob6, family=6)


def _rows(listing: str) -> list[dict[str, Any]]:
    """`autosp --json list` endpoints without their times (they move on)."""
    times = ("next_refresh", "last_refresh", "added")
    return [{k: v for k, v in e.items() if k not in times}
            for e in json.loads(listing)["endpoints"]]


def test_add_refuses_names_without_a_secure_key(lab: Any, resolver: AliceResolver) -> None:
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
