"""SIGHUP reload: what changed is listed and applied in place; a bad file changes nothing."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdatatype
import pytest

from resolver.cache import WireCache, WireEntry
from resolver.cli import build_anchors, check_sections
from resolver.config import Config, HostPort, load
from resolver.policy import Group, Policy, PolicyConfig
from resolver.resolve import Fetch, PlainHandler, Resolution, Validating
from resolver.service.reload import Reloader, Running, changes
from resolver.upstream.select import UpstreamSelector
from resolver.validator.anchors import TrustAnchors
from resolver.validator.response import Limits, Security, ValidatedAnswer, Validator, Verdict
from tests.dnssec_fixtures import WHEN, build_world
from tests.helpers import run
from tests.test_upstream_select import Net

HOST = dns.name.from_text("host.corp.example.")
ADDR = ipaddress.ip_address("192.0.2.7")
BASE = """
[identity]
fqdn = "alice.example.test"
private_key = "/nonexistent/key.pem"
[provision]
backend = "dryrun"
[upstream]
servers = ["192.0.2.1"]
probe_ds = "test."
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["world.key"]
"""


class Daemon:
    """The swappable parts of a daemon, built from a config file the test rewrites."""

    def __init__(self, tmp_path: Path, text: str) -> None:
        self.path = tmp_path / "resolver.toml"
        self.rc = tmp_path / "resolv.conf"
        self.rc.write_text("nameserver 192.0.2.53\n")
        root_ksk = build_world()["."].ksk.dnskey
        (tmp_path / "world.key").write_text(
            f". IN DS {dns.dnssec.make_ds(dns.name.root, root_ksk, 'SHA256').to_text()}\n")
        self.path.write_text(text)
        self.config = self.load()
        self.net = Net(**{"192_0_2_1": "good", "192_0_2_2": "good"})
        self.made: list[tuple[TrustAnchors, Limits]] = []
        self.selector = UpstreamSelector(self.config.upstream, self.validator_for_world,
                                         clock=lambda: WHEN, make_forwarder=self.net.forwarder,
                                         make_iterator=self.net.iterator)
        self.resolution = Resolution(self.selector, self.validator_for_world)
        self.plain = PlainHandler(self.resolution)
        self.wire = WireCache(100)
        self.policy = Policy(PolicyConfig.from_section(self.config.sections.get("policy", {})))
        self.reloader = Reloader(
            self.config, self.load,
            Running(self.resolution, self.selector, self.wire, None, self.policy, self.plain),
            build_anchors=build_anchors, check=check_sections, new_validator=self.new_validator)

    def load(self) -> Config:
        return load(self.path, resolv_conf=self.rc)

    def validator_for_world(self, fetch: Fetch) -> Validating:
        return Validator(build_world().anchors, fetch, Limits())

    def new_validator(self, anchors: TrustAnchors, limits: Limits, fetch: Fetch) -> Validating:
        self.made.append((anchors, limits))
        return Validator(anchors, fetch, limits)

    def rewrite(self, text: str) -> None:
        self.path.write_text(text)

    def reload(self) -> bool:
        return run(self.reloader.reload(), 10)

    def cache_something(self) -> None:
        """A final reply and a secure verdict, as a lookup would have left them."""
        self.wire.put((b"x", 1, 1, 0), WireEntry(b"", WHEN, (), 0), WHEN + 60)
        www = dns.name.from_text("www.example.test.")
        ans = ValidatedAnswer(Verdict(Security.SECURE), 0, [], [], 300)
        self.resolution.answers.put((www, int(dns.rdatatype.A)), (WHEN + 300, ans), WHEN + 300)


def test_changes_lists_each_key_that_differs(tmp_path: Path) -> None:
    d = Daemon(tmp_path, BASE)
    new = load(_write(tmp_path, BASE.replace('"192.0.2.1"', '"192.0.2.2"') +
                      '[policy]\nprivate = ["corp.example."]\n[log]\nlevel = "debug"\n'),
               resolv_conf=d.rc)
    found = {str(c) for c in changes(d.config, new)}
    assert found == {"[upstream] servers: [192.0.2.1:53] -> [192.0.2.2:53]",
                     "[log] level: info -> debug",
                     "[policy] private: (unset) -> [corp.example.]"}
    assert not any(c.needs_restart for c in changes(d.config, new))
    assert changes(d.config, d.config) == []


def _write(tmp_path: Path, text: str) -> Path:
    other = tmp_path / "other.toml"
    other.write_text(text)
    return other


def test_a_changed_policy_applies_and_keeps_the_verdicts(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    d = Daemon(tmp_path, BASE)
    assert d.policy.group_for(HOST, (ADDR,)) is Group.PRIVATE_OR_CLEAR
    d.cache_something()
    d.rewrite(BASE + '[policy]\nprivate = ["corp.example."]\n')
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert d.reload()
    assert d.policy.group_for(HOST, (ADDR,)) is Group.PRIVATE  # the same object, new groups
    assert len(d.wire) == 0  # final replies depended on the old policy
    assert len(d.resolution.answers) == 1  # verdicts did not
    assert any(r.getMessage().startswith("event=reload ") and "[policy] private: (unset) -> "
               "[corp.example.]" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("text", "why"), [
    ("[upstream\n", "not valid TOML"),
    (BASE + '[policy]\nprivate = ["10.0.0.0/33"]\n', "[policy] key 'private'"),
    (BASE.replace('servers = ["192.0.2.1"]', 'servers = ["tls://192.0.2.1"]'), "#NAME"),
    (BASE.replace('"world.key"', '"missing.key"'), "no such file"),
    (BASE + "[limits]\nmax_ds = 0\n", "must be at least 1"),
])
def test_a_broken_file_keeps_the_running_configuration(tmp_path: Path, text: str, why: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    d = Daemon(tmp_path, BASE + '[policy]\nprivate = ["corp.example."]\n')
    d.cache_something()
    validator = d.resolution.validator
    d.rewrite(text)
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert not d.reload()
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.startswith(f"event=reload-failed file={d.path} reason=")
    assert why in line and line.endswith('; keeping the running configuration"')
    assert d.policy.group_for(HOST, (ADDR,)) is Group.PRIVATE
    assert d.selector.config.servers == (HostPort("192.0.2.1"),)
    assert d.resolution.validator is validator and len(d.wire) == 1
    assert d.reloader.config == d.config


def test_new_forwarders_and_limits_are_applied(tmp_path: Path) -> None:
    d = Daemon(tmp_path, BASE)
    d.rewrite(BASE.replace('"192.0.2.1"', '"192.0.2.2"') + "[limits]\nmax_ds = 3\n")

    async def main() -> None:
        d.selector.start()
        try:
            assert await d.reloader.reload()
            async with asyncio.timeout(5):
                while d.selector.choice.servers != (HostPort("192.0.2.2"),):
                    await asyncio.sleep(0.01)
        finally:
            await d.selector.close()

    run(main(), 10)
    # A new validator with the new limits, for answers and for the probes.
    assert d.made and {lim.max_ds for _a, lim in d.made} == {3}
    assert d.resolution.validator.limits.max_ds == 3  # type: ignore[attr-defined]
    assert d.selector.limits.max_ds == 3


def test_new_trust_anchors_drop_every_verdict(tmp_path: Path) -> None:
    key = tmp_path / "root.key"
    key.write_text(". IN DS 20326 8 2 " + "e0" * 32 + "\n")
    d = Daemon(tmp_path, BASE)
    d.cache_something()
    d.rewrite(BASE.replace('"world.key"', '"root.key"'))
    assert d.reload()
    assert len(d.resolution.answers) == 0 and len(d.wire) == 0
    anchors, _ = d.made[-1]
    assert anchors == build_anchors(d.reloader.config)


def test_what_needs_a_restart_is_said_and_kept(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    d = Daemon(tmp_path, BASE)
    d.rewrite(BASE + '[server]\nlisten = ["127.0.0.1:5353"]\n[cache]\nmax_ttl = 600\n')
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert d.reload()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("event=reload-needs-restart")
    assert "[server] listen" in warned[0]
    assert d.plain.max_ttl == 600 and d.resolution.config.max_ttl == 600  # applied
    # The running listen addresses are what the next reload compares against: it says so again.
    assert d.reloader.config.server.listen == d.config.server.listen
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert d.reload()
    assert ["[server] listen" in r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING] == [True]


def test_forwarders_the_file_watch_follows_are_not_a_reload_change(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = Daemon(tmp_path, BASE.replace('servers = ["192.0.2.1"]\n', ""))
    assert d.config.upstream.from_resolv_conf
    d.rc.write_text("nameserver 192.0.2.2\n")  # DHCP; the watch has told the selector
    with caplog.at_level(logging.INFO, logger="resolver"):
        assert d.reload()
    assert [r.getMessage() for r in caplog.records] == [
        f"event=reload file={d.path} changes=none"]
