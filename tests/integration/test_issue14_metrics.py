"""Issue 14: the daemon's numbers, scraped live from its Prometheus listener in alice after
lookups, a tunnel and failures, checked by the real `promtool check metrics`, and counted
against what the test made happen. `autosp stats` (the control socket) shows the same.

Run: `LAB_ID=d .venv/bin/python -m pytest -q tests/integration/test_issue14_metrics.py`
"""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import dns.rcode
import pytest

from lab import Lab
from lab.resolverd import ResolverDaemon
from tests.helpers import clean_alice

pytestmark = pytest.mark.integration

PORT = 9153


def scrape(lab: Lab) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(r.read().decode())

    text: str = lab.call_in("alice", get)
    return text


def value(text: str, sample: str) -> float:
    """The value of one sample line, given as it appears before the value."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    out = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            out += float(m.group(2))
    return out


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[ResolverDaemon]:
    clean_alice(lab)
    shutil.rmtree(lab.run_dir / "t14-metrics", ignore_errors=True)
    d = ResolverDaemon(lab, "alice", name="t14-metrics", sections={
        "policy": {"default": "private"}, "metrics": {"listen": f"127.0.0.1:{PORT}"}})
    d.start()
    try:
        yield d
    finally:
        d.stop()
        clean_alice(lab)


def test_live_scrape_counts_what_happened_and_passes_promtool(lab: Lab,
                                                              daemon: ResolverDaemon) -> None:
    n = "ipseckey_resolver_"
    before = scrape(lab)  # the start-up SOA probe of lab.resolverd is in here
    assert value(before, n + "tunnels_up") == 0
    # A tunnel: bob (secure key), asked twice; the second is a wire-cache hit.
    for _ in range(2):
        assert daemon.query("bob.example.test.").rcode() == dns.rcode.NOERROR
    # Refused: plain has no IPSECKEY (private: SERVFAIL, EDE 28); bogus: a bad signature.
    assert daemon.query("plain.example.test.").rcode() == dns.rcode.SERVFAIL
    assert daemon.query("host.badsig.test.", "IPSECKEY").rcode() == dns.rcode.SERVFAIL
    # A failed setup: carol's charon is down, so the tunnel times out.
    with lab.charon_stopped("carol"):
        assert daemon.query("carol.example.test.").rcode() == dns.rcode.SERVFAIL
    text = scrape(lab)

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing (Debian package prometheus; lab/setup.sh installs it)"
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    def delta(name: str, **labels: str) -> float:
        return total(text, n + name, **labels) - total(before, n + name, **labels)

    assert delta("queries_total", type="A", rcode="NOERROR") == 2
    assert delta("queries_total", type="A", rcode="SERVFAIL") == 2  # plain, carol
    assert delta("queries_total", type="IPSECKEY", rcode="SERVFAIL") == 1
    assert delta("cache_hits_total") == 1  # bob's second ask
    assert delta("cache_misses_total") == 4
    assert value(text, n + "tunnels_up") == 1
    assert delta("tunnel_setup_seconds_count") == 1
    assert 0 < delta("tunnel_setup_seconds_sum") < 3
    assert delta("tunnel_setup_failures_total", reason="timeout") == 1
    assert delta("tunnel_setup_failures_total", reason="rejected") == 0
    assert value(text, n + "tunnel_setups_in_flight") == 0
    assert delta("captured_queries_total", outcome="tunnelled") == 1
    assert delta("captured_queries_total", outcome="refused") == 2  # plain, carol
    assert delta("answers_total", security="bogus") >= 1
    assert delta("answers_total", security="secure") >= 4  # A and IPSECKEY of bob, carol
    server = f'server="{lab.unbound_addr}:53"'
    assert delta("upstream_queries_total") >= 4
    assert f"{n}upstream_rtt_seconds_count{{{server}}}" in text
    assert delta("upstream_failures_total") == 0
    assert value(text, n + 'endpoints{state="up"}') == 0

    stats = lab.autosp("alice", "stats", control=daemon.control)
    assert stats.returncode == 0, stats.stderr
    line = f'{n}tunnel_setup_failures_total{{reason="timeout"}} '
    assert any(ln.startswith(line) and float(ln.split()[-1]) == total(
        text, n + "tunnel_setup_failures_total", reason="timeout") for ln in
        stats.stdout.splitlines()), stats.stdout
