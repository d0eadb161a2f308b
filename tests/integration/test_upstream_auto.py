"""Real networks, in the lab: `[upstream] mode = "auto"` following a resolv.conf the test rewrites.

The daemon runs in `plain`, listening on 127.0.0.1:53 there, with no `servers`: its forwarders
are the nameservers of a resolv.conf file in its run directory (what NetworkManager or a DHCP
hook keeps current), and its root hint is the lab root, so it can iterate. The "home router" is
lab/stripper.py in `dave` (198.51.100.13:53), in front of the lab Unbound, switched between
`strip` (RRSIG/NSEC/NSEC3 removed), `pass` (repaired) and `drop` (dead) while the daemon runs.
Which path answered is read from three sides: the daemon's control socket (`autosp upstream`),
the router's query log, and the authoritative servers' query logs (only an iterating daemon
asks them from plain's own address).

SIGHUP is tested with a capturing daemon in alice: a changed [policy] applies at once without
dropping the tunnel already up, and a broken file changes nothing while the daemon serves on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.flags
import dns.message
import dns.rcode
import pytest

from lab.net import wait_until
from lab.querylog import QueryLog
from lab.resolverd import ResolverDaemon
from lab.stripper import Stripper
from lab.topology import HOSTS, ZONES
from tests.helpers import clean_alice, ede

if TYPE_CHECKING:
    from lab.core import Lab

pytestmark = pytest.mark.integration

HOST = "plain"
ROOT = HOSTS[ZONES["."].server]
ROUTER = "dave"
DEAD = "198.51.100.249"  # nothing listens there (the lab's dead name server address)


def write_resolv_conf(path: Path, *nameservers: str) -> None:
    """Replace the file as NetworkManager does: write a new one, rename it over the old."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# written by the test\n" + "".join(f"nameserver {n}\n" for n in nameservers))
    os.replace(tmp, path)


class AutoDaemon:
    """The daemon in plain, following `self.resolv_conf`."""

    def __init__(self, lab: Lab, name: str, *nameservers: str, **upstream: Any) -> None:
        self.lab = lab
        run = lab.run_dir / name
        run.mkdir(parents=True, exist_ok=True)
        self.resolv_conf = run / "resolv.conf"
        write_resolv_conf(self.resolv_conf, *nameservers)
        self.daemon = ResolverDaemon(lab, HOST, name=name, tunnels=False, sections={"upstream": {
            "servers": None, "resolv_conf": str(self.resolv_conf), "timeout": 0.5,
            "root_hints": [ROOT.v4, ROOT.v6], "probe_interval": 1, **upstream}})
        self.n = 0

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        return self.daemon.query(name, rdtype, dnssec=True, timeout=8)

    def fresh_name(self) -> str:
        """A name nobody asked before (NXDOMAIN, signed denial): it cannot come from a cache."""
        self.n += 1
        return f"nx-{os.getpid()}-{time.monotonic_ns()}-{self.n}.example.test."

    def upstream(self) -> dict[str, Any]:
        return self.daemon.upstream()

    def wait_path(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        return wait_until(lambda: (s := self.upstream())["path"] == path and s, timeout,
                          f"upstream path {path}: {self.upstream()}\n{self.daemon.tail()}")

    def switch_lines(self) -> list[str]:
        return [line for line in self.daemon.tail(400).splitlines()
                if "event=upstream-switch " in line]


@pytest.fixture
def router(lab: Lab) -> Iterator[Stripper]:
    with Stripper(lab, ROUTER, mode="strip") as s:
        yield s


@pytest.fixture
def auto(lab: Lab, request: pytest.FixtureRequest) -> Iterator[AutoDaemon]:
    """An AutoDaemon; the test starts it (its resolv.conf first)."""
    made: list[AutoDaemon] = []

    def make(*nameservers: str) -> AutoDaemon:
        d = AutoDaemon(lab, f"auto-{request.node.name[:20]}", *nameservers)
        made.append(d)
        d.daemon.start(timeout=20)
        return d

    yield make  # type: ignore[misc]
    for d in made:
        code = d.daemon.stop()
        assert code == 0, f"exit status {code}:\n{d.daemon.tail(60)}"


def secure(reply: dns.message.Message, rcode: int = dns.rcode.NOERROR) -> bool:
    return reply.rcode() == rcode and bool(reply.flags & dns.flags.AD)


def test_stripping_router_makes_auto_iterate_then_forward_once_repaired(
        lab: Lab, router: Stripper, auto: Any) -> None:
    log = QueryLog(lab, HOST)
    log.mark()
    d: AutoDaemon = auto(lab.addr(ROUTER))
    reply = d.ask("bob.example.test.", "IPSECKEY")
    assert secure(reply), f"{reply}\n{d.daemon.tail()}"
    status = d.upstream()
    assert status["path"] == "iterate" and status["mode"] == "auto", status
    assert f"{lab.addr(ROUTER)}:53 strips or mangles DNSSEC (. DNSKEY" in status["reason"]
    assert [p["status"] for p in status["probes"]] == ["strips"]
    assert log.since("ns-example"), "an iterating daemon asks the authoritative servers itself"
    assert len(d.switch_lines()) == 1, d.switch_lines()
    # The router is repaired: the next probe (probe_interval = 1 s) sees it, auto forwards.
    router.mode = "pass"
    status = d.wait_path("forward")
    assert status["using"] == [f"{lab.addr(ROUTER)}:53"]
    log.mark()
    name = d.fresh_name()
    assert secure(d.ask(name), dns.rcode.NXDOMAIN)
    assert ("pass", name.lower(), "A") in router.queries()
    assert not [q for q in log.since() if q.name.startswith("nx-")], "forwarded, not iterated"
    lines = d.switch_lines()
    assert len(lines) == 2 and "path=forward" in lines[1], lines


def test_router_that_starts_stripping_is_left_and_its_bogus_answers_forgotten(
        lab: Lab, router: Stripper, auto: Any) -> None:
    router.mode = "pass"
    d: AutoDaemon = auto(lab.addr(ROUTER))
    assert d.upstream()["path"] == "forward"
    router.mode = "strip"  # no resolv.conf change: the router itself changed
    name = "carol.example.test."  # not asked before through this daemon
    first = d.ask(name)
    # The stripped answer does not validate; the bogus verdict makes the daemon probe again.
    assert first.rcode() == dns.rcode.SERVFAIL and ede(first)[0] in (6, 9, 10, 12), first
    d.wait_path("iterate")
    # The switch flushed the bogus entry (bogus_ttl is 60 s): asked again, secure, now.
    assert secure(d.ask(name)), d.daemon.tail()


def test_unreachable_forwarder_iterates_from_the_start_and_when_it_dies(
        lab: Lab, router: Stripper, auto: Any) -> None:
    d: AutoDaemon = auto(DEAD)
    assert secure(d.ask("bob.example.test.")), d.daemon.tail()
    status = d.upstream()
    assert status["path"] == "iterate" and "does not answer" in status["reason"], status
    # A working router appears; then it dies (drop): auto notices the timeouts and iterates.
    router.mode = "pass"
    write_resolv_conf(d.resolv_conf, lab.addr(ROUTER))
    d.wait_path("forward")
    router.mode = "drop"
    start = time.monotonic()

    def resolves_again() -> bool:
        return secure(d.ask(d.fresh_name()), dns.rcode.NXDOMAIN)

    wait_until(resolves_again, 20, f"resolution after the router died\n{d.daemon.tail()}",
               interval=0.2)
    took = time.monotonic() - start
    status = d.upstream()
    assert status["path"] == "iterate" and "does not answer" in status["reason"], status
    print(f"router died -> names resolve again (iterating) after {took:.2f} s")


def test_resolv_conf_rewrite_moves_to_the_new_forwarder_without_restart(
        lab: Lab, router: Stripper, auto: Any) -> None:
    router.mode = "pass"
    d: AutoDaemon = auto(lab.unbound_addr)
    pid = d.daemon.proc.pid if d.daemon.proc else None
    status = d.upstream()
    assert (status["path"], status["using"]) == ("forward", [f"{lab.unbound_addr}:53"]), status
    assert status["source"] == str(d.resolv_conf)
    start = time.monotonic()
    write_resolv_conf(d.resolv_conf, lab.addr(ROUTER))  # DHCP: a new network, a new resolver

    def via_router() -> bool:
        name = d.fresh_name()
        reply = d.ask(name)
        return secure(reply, dns.rcode.NXDOMAIN) and ("pass", name.lower(), "A") in \
            router.queries()

    wait_until(via_router, 10, f"an answer through the new forwarder\n{d.daemon.tail()}",
               interval=0.05)
    took = time.monotonic() - start
    assert d.daemon.proc is not None and d.daemon.proc.pid == pid  # no restart
    assert d.upstream()["using"] == [f"{lab.addr(ROUTER)}:53"]
    assert took < 5, took
    print(f"resolv.conf rewritten -> first answer via the new forwarder in {took:.2f} s")


def test_only_ourselves_in_resolv_conf_starts_and_iterates(lab: Lab, auto: Any) -> None:
    # The README's old order: `echo "nameserver 127.0.0.1" > /etc/resolv.conf`, then a
    # restart. That used to fail with "no usable nameserver ... set [upstream] servers".
    d: AutoDaemon = auto("127.0.0.1")
    assert secure(d.ask("bob.example.test.")), d.daemon.tail()
    status = d.upstream()
    assert status["path"] == "iterate" and status["forwarders"] == [], status
    assert "no forwarder in" in status["reason"]


# --- SIGHUP ------------------------------------------------------------------------------------


@pytest.fixture
def capturing(lab: Lab) -> Iterator[ResolverDaemon]:
    clean_alice(lab)
    d = ResolverDaemon(lab, "alice", name="hup", sections={"policy": {
        "default": "private-or-clear", "max_ttl": 300}})
    d.start()
    try:
        yield d
    finally:
        code = d.stop()
        clean_alice(lab)
    assert code == 0, d.tail(60)


def wait_log(d: ResolverDaemon, needle: str, timeout: float = 10) -> str:
    return wait_until(lambda: next((line for line in d.tail(200).splitlines()
                                    if needle in line), None), timeout,
                      f"{needle!r} in the log:\n{d.tail()}")


def test_sighup_applies_a_changed_policy_and_keeps_the_tunnel(lab: Lab,
                                                                capturing: ResolverDaemon
                                                                ) -> None:
    d = capturing
    bob = d.query("bob.example.test.", "A")
    assert bob.rcode() == dns.rcode.NOERROR, d.tail()
    sas = {n: s for n, s in lab.child_states("alice", "isk-").items() if s == "INSTALLED"}
    assert sas, lab.child_states("alice")
    plain = d.query("plain.example.test.", "A")
    assert plain.rcode() == dns.rcode.NOERROR  # private-or-clear, no key: clear
    d.tables["policy"] = {"default": "private-or-clear", "max_ttl": 300,
                          "block": ["plain.example.test."]}
    d.write_config()
    d.hup()
    line = wait_log(d, "event=reload ")
    assert "[policy] block: (unset) -> [plain.example.test.]" in line, line
    blocked = d.query("plain.example.test.", "A")
    assert blocked.rcode() == dns.rcode.SERVFAIL and ede(blocked)[0] == 15, blocked  # Blocked
    # The tunnel to bob was not touched: the same CHILD_SAs are still installed.
    after = lab.child_states("alice", "isk-")
    assert all(after.get(n) == "INSTALLED" for n in sas), (sas, after)
    assert d.query("bob.example.test.", "A").rcode() == dns.rcode.NOERROR


def test_sighup_with_a_broken_file_keeps_serving(lab: Lab, capturing: ResolverDaemon) -> None:
    d = capturing
    assert d.query("plain.example.test.", "A").rcode() == dns.rcode.NOERROR
    good = d.config.read_text()
    d.config.write_text(good + "\n[policy\nblock = [\"plain.example.test.\"]\n")
    d.hup()
    line = wait_log(d, "event=reload-failed")
    assert "keeping the running configuration" in line and "not valid TOML" in line
    assert d.proc is not None and d.proc.poll() is None
    assert d.query("plain.example.test.", "A").rcode() == dns.rcode.NOERROR
    # A semantically bad file is refused the same way, with the key named.
    d.config.write_text(good.replace('default = "private-or-clear"', 'default = "sometimes"'))
    d.hup()
    wait_until(lambda: "key 'default'" in d.tail(50), 10, d.tail())
    assert d.query("plain.example.test.", "A").rcode() == dns.rcode.NOERROR
