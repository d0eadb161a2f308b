"""Iterative mode against the lab's real BIND hierarchy, seen from the authoritative side.

The verdicts (AD / plain / SERVFAIL + EDE, rcodes) of iterative mode are compared with delv's
for every lab name in tests/integration/test_resolver_lab.py (parametrised over both modes).
Here the daemon runs in `plain` with `mode = "iterate"`, the lab root as its only root hint and
no forwarder, and what it sends is read from the authoritative servers' query logs (the lab's
named runs with `querylog yes`), filtered by the daemon's addresses:

* QNAME minimisation: the root only ever sees names of one label, `test.` names of at most
  two, while the full names do reach example.test's server.
* A zone with a dead name server (nothing at its address) and one with a lame name server
  (REFUSED) still resolve, validated (AD), for every kind of answer.
* An NXNSAttack-style delegation (nxns.test., 24 NS names that do not exist) ends in SERVFAIL
  with EDE 22, having sent at most `max_ns_lookups` lookups to the victim zone and at most
  `max_upstream_queries` queries in all.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from lab.topology import HOSTS, NXNS_NAMES, ZONES
from resolver.validator.types import Limits

if TYPE_CHECKING:
    from lab.core import Lab

pytestmark = pytest.mark.integration

HOST = "plain"
LISTEN = "127.0.0.1"
OURS = {HOSTS[HOST].v4, HOSTS[HOST].v6}
SERVERS = sorted({z.server for z in ZONES.values()})
REPO = Path(__file__).resolve().parents[2]
_QUERY = re.compile(r"client @\S+ (\S+)#\d+ \(\S+\): query: (\S+) IN (\S+) ")


class QueryLogs:
    """What the daemon asked each lab named since `mark()` (from named's query log)."""

    def __init__(self, lab: Lab) -> None:
        self.paths = {s: lab.run_dir / s / "named.log" for s in SERVERS}
        self.offsets = dict.fromkeys(SERVERS, 0)

    def mark(self) -> None:
        self.offsets = {s: p.stat().st_size for s, p in self.paths.items()}

    def since(self, server: str) -> list[tuple[str, str]]:
        """(name in lower case, type) of each query from the daemon to ``server``."""
        with open(self.paths[server], "rb") as f:
            f.seek(self.offsets[server])
            text = f.read().decode(errors="replace")
        return [(m.group(2).lower(), m.group(3)) for m in _QUERY.finditer(text)
                if m.group(1) in OURS]


def labels(name: str) -> int:
    return 0 if name == "." else name.rstrip(".").count(".") + 1


def dig(lab: Lab, *args: str) -> str:
    return lab.exec(HOST, ["dig", f"@{LISTEN}", "+time=10", "+tries=1", *args],
                    check=False, timeout=30).stdout


def status(out: str) -> tuple[str, bool]:
    m = re.search(r"status: (\w+)", out)
    flags = re.search(r";; flags: ([a-z ]+);", out)
    assert m and flags, f"no answer:\n{out}"
    return m.group(1), "ad" in flags.group(1).split()


@contextmanager
def iterating_daemon(lab: Lab, work: Path) -> Iterator[Path]:
    """The daemon in `plain`, iterating from the lab root; yields its log; must exit 0."""
    cfg = work / "iterate.toml"
    cfg.write_text(f"""
[server]
listen = ["{LISTEN}:53"]
[upstream]
mode = "iterate"
root_hints = ["{HOSTS[ZONES["."].server].v4}", "{HOSTS[ZONES["."].server].v6}"]
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["{lab.root_anchor_file}"]
""")
    log = work / "iterate.log"
    with open(log, "wb") as out:
        proc = lab.popen(HOST, ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "resolver",
                                "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        # Readiness with ". SOA": it primes the root and nothing below it.
        while "status: NOERROR" not in dig(lab, ".", "SOA"):
            assert proc.poll() is None, f"daemon died:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"daemon not answering:\n{log.read_text()}"
            time.sleep(0.2)
        yield log
    finally:
        proc.terminate()
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon ignored SIGTERM:\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-3000:]


def test_qname_minimisation_is_visible_in_the_query_logs(lab: Lab, tmp_path: Path) -> None:
    logs = QueryLogs(lab)
    with iterating_daemon(lab, tmp_path) as log:
        logs.mark()
        assert status(dig(lab, "+dnssec", "bob.example.test.", "IPSECKEY")) == ("NOERROR", True)
        assert status(dig(lab, "+dnssec", "a.b.c.no-such.example.test.", "A")) == (
            "NXDOMAIN", True), log.read_text()[-2000:]
        root = logs.since("ns-root")
        test = logs.since("ns-test")
        example = logs.since("ns-example")
    assert ("test", "A") in root and ("example.test", "A") in test, (root, test)
    assert all(labels(name) <= 1 for name, _t in root), root
    assert all(labels(name) <= 2 for name, _t in test), test
    # The log does show full names: example.test's server got them.
    assert ("bob.example.test", "IPSECKEY") in example
    assert ("a.b.c.no-such.example.test", "A") in example
    # The DS records came with the referrals (and validated: AD above), not asked again.
    assert not [q for q in root + test + example if q[1] == "DS"]


@pytest.mark.parametrize("zone", ["dead-ns.test.", "lame-ns.test."])
def test_dead_and_lame_name_servers_do_not_stop_resolution(lab: Lab, tmp_path: Path,
                                                            zone: str) -> None:
    expected = [(f"host.{zone}", "A", "NOERROR"), (f"host.{zone}", "AAAA", "NOERROR"),
                (f"host.{zone}", "IPSECKEY", "NOERROR"), (f"host.{zone}", "TXT", "NOERROR"),
                (f"no-such-name.{zone}", "A", "NXDOMAIN"), (zone, "DNSKEY", "NOERROR")]
    logs = QueryLogs(lab)
    with iterating_daemon(lab, tmp_path) as log:
        logs.mark()
        start = time.monotonic()
        for name, rdtype, rcode in expected:
            out = dig(lab, "+dnssec", name, rdtype)
            assert status(out) == (rcode, True), f"{name} {rdtype}:\n{out}\n" + \
                log.read_text()[-2000:]
        elapsed = time.monotonic() - start
        refused = [q for q in logs.since("ns-example") if q[0].endswith(zone.rstrip("."))]
    # At most one wait for the dead server per address family, not one per lookup.
    assert elapsed < 6, elapsed
    print(f"{zone}: {len(expected)} lookups in {elapsed:.2f} s; "
          f"queries to the lame (REFUSED) server: {len(refused)}")


def test_nxns_delegation_stays_within_the_limits(lab: Lab, tmp_path: Path) -> None:
    limits = Limits()
    logs = QueryLogs(lab)
    with iterating_daemon(lab, tmp_path) as log:
        logs.mark()
        start = time.monotonic()
        out = dig(lab, "+dnssec", "x.nxns.test.", "A")
        elapsed = time.monotonic() - start
        assert status(out)[0] == "SERVFAIL" and "EDE: 22" in out, out
        victim = [q for q in logs.since("ns-example") if q[0].startswith("nxns-")]
        total = sum(len(logs.since(s)) for s in SERVERS)
        assert "NS names to resolve" in log.read_text()
    assert 0 < len(victim) <= limits.max_ns_lookups < NXNS_NAMES, victim
    assert total <= limits.max_fetches, total
    assert elapsed < 5, elapsed
