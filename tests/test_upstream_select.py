"""Upstream selection: the decision table (`choose`) and the selector's switches, with forwarders
that behave as scripted (honest, stripping, silent) over the signed test world, the real probe
and the real validator, and a fake iterator answering from the same world."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import dns.message
import dns.name
import dns.rdatatype
import pytest

from resolver.config import Config, HostPort, UpstreamConfig
from resolver.errors import UpstreamError
from resolver.resolve import Fetch, Resolution, Validating
from resolver.upstream.network import start_network
from resolver.upstream.probe import ProbeResult, ProbeStatus
from resolver.upstream.select import Choice, Route, UpstreamSelector, choose
from resolver.validator.response import Limits, Security, Validator
from tests.dnssec_fixtures import WHEN, build_world
from tests.helpers import run, until
from tests.test_upstream_probe import strip_dnssec

A, B, C = HostPort("192.0.2.1"), HostPort("192.0.2.2"), HostPort("192.0.2.3")
WWW = dns.name.from_text("www.example.test.")
T = dns.rdatatype


def result(server: HostPort, status: ProbeStatus, reason: str = "") -> ProbeResult:
    return ProbeResult(server, status, reason)


@pytest.mark.parametrize(("mode", "servers", "results", "expected"), [
    ("auto", (A, B), [result(A, ProbeStatus.PASSED), result(B, ProbeStatus.PASSED)],
     Choice(Route.FORWARD, (A, B), "passed the DNSSEC probe")),
    ("auto", (A, B), [result(A, ProbeStatus.STRIPS, "x"), result(B, ProbeStatus.PASSED)],
     Choice(Route.FORWARD, (B,), "passed the DNSSEC probe; not used: 192.0.2.1:53 strips "
                                 "or mangles DNSSEC (x)")),
    ("auto", (A, B), [result(A, ProbeStatus.STRIPS, "x"), result(B, ProbeStatus.SILENT, "y")],
     Choice(Route.ITERATE, (), "192.0.2.1:53 strips or mangles DNSSEC (x); 192.0.2.2:53 does "
                               "not answer (y)")),
    ("auto", (), [], Choice(Route.ITERATE, (), "no forwarder in /r (ourselves excluded)")),
    ("forward", (A,), [], Choice(Route.FORWARD, (A,), 'mode = "forward"')),
    ("forward", (), [], Choice(Route.NONE, (), "no forwarder in /r (ourselves excluded)")),
    ("iterate", (A,), [], Choice(Route.ITERATE, (), 'mode = "iterate"')),
])
def test_choose(mode: str, servers: tuple[HostPort, ...], results: list[ProbeResult],
                expected: Choice) -> None:
    assert choose(mode, servers, results, source="/r") == expected


# --- the selector with scripted forwarders -------------------------------------------------


class Net:
    """Forwarders by address: "good", "strip" or "dead"; `asked` logs (server, qname, qtype)."""

    def __init__(self, **behaviour: str) -> None:
        self.behaviour = {HostPort(k.replace("_", ".")): v for k, v in behaviour.items()}
        self.world = build_world().upstream()
        self.asked: list[tuple[str, str, str]] = []
        self.iterated: list[tuple[str, str]] = []

    def set(self, server: HostPort, how: str) -> None:
        self.behaviour[server] = how

    def forwarder(self, servers: Sequence[HostPort], attempts: int) -> Forwarding:
        return Forwarding(self, tuple(servers))

    def iterator(self) -> Iterating:
        return Iterating(self)


class Forwarding:
    def __init__(self, net: Net, servers: tuple[HostPort, ...]) -> None:
        self.net, self.servers = net, servers

    async def query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *,
                    cd: bool = True, recheck: bool = False) -> dns.message.Message:
        for server in self.servers:
            how = self.net.behaviour.get(server, "dead")
            self.net.asked.append((str(server), qname.to_text(), T.to_text(qtype)))
            if how == "dead":
                continue
            msg = await self.net.world.fetch(qname, qtype)
            return strip_dnssec(msg) if how == "strip" else msg
        raise UpstreamError(f"no upstream answered {qname}: timeout")


class Iterating:
    def __init__(self, net: Net) -> None:
        self.net = net

    async def query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *,
                    cd: bool = True, recheck: bool = False) -> dns.message.Message:
        self.net.iterated.append((qname.to_text(), T.to_text(qtype)))
        return await self.net.world.fetch(qname, qtype)


def make_validator(fetch: Fetch) -> Validating:
    return Validator(build_world().anchors, fetch, Limits())


def selector(net: Net, servers: tuple[HostPort, ...], mode: str = "auto",
             probe_interval: float = 60.0) -> UpstreamSelector:
    cfg = UpstreamConfig(mode=mode, servers=servers, probe_ds="test.",
                         probe_interval=probe_interval)
    return UpstreamSelector(cfg, make_validator, clock=lambda: WHEN,
                            make_forwarder=net.forwarder, make_iterator=net.iterator)


async def settle(sel: UpstreamSelector, route: Route, timeout: float = 5.0) -> None:
    await until(lambda: sel.choice.path is route, f"path {route}", timeout)


def test_auto_forwards_to_the_forwarders_that_pass_only() -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "strip", "192_0_2_2": "good"})
        sel = selector(net, (A, B))
        sel.start()
        try:
            await sel.query(WWW, T.A)  # waits for the first decision
            assert (sel.choice.path, sel.choice.servers) == (Route.FORWARD, (B,))
            assert net.asked[-1] == ("192.0.2.2:53", "www.example.test.", "A")
            status = sel.status()
            assert status["path"] == "forward" and status["using"] == ["192.0.2.2:53"]
            assert [p["status"] for p in status["probes"]] == ["strips", "passed"]
            assert "192.0.2.1:53 strips or mangles DNSSEC (. DNSKEY" in status["reason"]
        finally:
            await sel.close()

    run(main(), 10)


@pytest.mark.parametrize("how", ["strip", "dead"])
def test_auto_iterates_when_no_forwarder_passes(how: str) -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": how})
        sel = selector(net, (A,))
        sel.start()
        try:
            reply = await sel.query(WWW, T.A)
            assert reply.answer and net.iterated == [("www.example.test.", "A")]
            assert sel.choice.path is Route.ITERATE
            word = "strips or mangles DNSSEC" if how == "strip" else "does not answer"
            assert word in sel.choice.reason
        finally:
            await sel.close()

    run(main(), 10)


def test_forward_mode_does_not_probe_and_iterate_mode_never_forwards() -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "strip"})
        fwd, it = selector(net, (A,), mode="forward"), selector(net, (A,), mode="iterate")
        for sel in (fwd, it):
            sel.start()
        try:
            await fwd.query(WWW, T.A)
            await it.query(WWW, T.A)
            assert net.asked == [("192.0.2.1:53", "www.example.test.", "A")]  # no probe
            assert net.iterated == [("www.example.test.", "A")]
        finally:
            await fwd.close()
            await it.close()

    run(main(), 10)


def test_forward_mode_without_forwarder_fails_each_question() -> None:
    async def main() -> None:
        sel = selector(Net(), (), mode="forward")
        sel.start()
        try:
            with pytest.raises(UpstreamError, match="no upstream: no forwarder"):
                await sel.query(WWW, T.A)
        finally:
            await sel.close()

    run(main(), 10)


def test_switches_follow_the_forwarders_one_log_line_each(
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "strip", "192_0_2_2": "good"})
        sel = selector(net, (A,), probe_interval=0.1)
        switches: list[tuple[Route, Route]] = []
        sel.on_switch.append(lambda old, new: switches.append((old.path, new.path)))
        sel.start()
        try:
            await settle(sel, Route.ITERATE)
            sel.set_servers((B,), "/etc/resolv.conf")  # the network changed
            await settle(sel, Route.FORWARD)
            assert sel.choice.servers == (B,) and sel.source == "/etc/resolv.conf"
            sel.set_servers((A,))  # back to the stripping router
            await settle(sel, Route.ITERATE)
            net.set(A, "good")  # the router was repaired: the periodic probe sees it
            await settle(sel, Route.FORWARD)
            assert sel.choice.servers == (A,)
        finally:
            await sel.close()
        # NONE -> ITERATE (start), -> FORWARD, -> ITERATE, -> FORWARD; no extra switches
        # while it kept probing the stripping router every 0.1 s.
        assert switches == [(Route.NONE, Route.ITERATE), (Route.ITERATE, Route.FORWARD),
                            (Route.FORWARD, Route.ITERATE), (Route.ITERATE, Route.FORWARD)]
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("event=upstream-switch ")]
        assert len(lines) == 4, lines
        assert lines[0].startswith('event=upstream-switch path=iterate reason="192.0.2.1:53 '
                                   'strips or mangles DNSSEC (. DNSKEY')
        assert lines[1] == ('event=upstream-switch path=forward servers=192.0.2.2:53 '
                            'reason="passed the DNSSEC probe"')

    with caplog.at_level(logging.INFO, logger="resolver"):
        run(main(), 20)


def test_a_forwarder_that_dies_is_suspected_and_left() -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "good"})
        sel = selector(net, (A,))
        sel.start()
        try:
            await sel.query(WWW, T.A)
            assert sel.choice.path is Route.FORWARD
            net.set(A, "dead")  # the old network's resolver is unreachable now
            with pytest.raises(UpstreamError):
                await sel.query(WWW, T.AAAA)
            await settle(sel, Route.ITERATE)
            assert "does not answer" in sel.choice.reason
            await sel.query(WWW, T.AAAA)
            assert net.iterated == [("www.example.test.", "AAAA")]
        finally:
            await sel.close()

    run(main(), 10)


def test_bogus_answers_while_forwarding_make_it_probe_again() -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "good"})
        cfg = Config(upstream=UpstreamConfig(servers=(A,), probe_ds="test."))
        sel = selector(net, (A,))
        res = Resolution(sel, make_validator)
        network = start_network(cfg, sel, res)
        try:
            ans = await res.resolve(WWW, T.A, WHEN)
            assert ans.verdict.security is Security.SECURE and sel.choice.path is Route.FORWARD
            net.set(A, "strip")  # the router starts stripping (no resolv.conf change)
            bad = dns.name.from_text("host.example.test.")
            assert (await res.resolve(bad, T.A, WHEN)).verdict.security is Security.BOGUS
            await settle(sel, Route.ITERATE)  # the bogus verdict made it probe again
            # The switch flushed the bogus answer: asked again, through the iterator, secure.
            again = await res.resolve(bad, T.A, WHEN + 1)
            assert again.verdict.security is Security.SECURE
            assert ("host.example.test.", "A") in net.iterated
        finally:
            await network.close()

    run(main(), 10)


def test_a_forwarder_that_dies_again_soon_after_a_switch_is_left_at_once() -> None:
    async def main() -> None:
        net = Net(**{"192_0_2_1": "good"})
        sel = selector(net, (A,), probe_interval=0.1)
        sel.start()
        try:
            for _round in range(2):  # the second death comes well within SUSPECT_HOLDOFF
                await settle(sel, Route.FORWARD)
                net.set(A, "dead")
                with pytest.raises(UpstreamError):
                    await sel.query(WWW, T.A)
                await settle(sel, Route.ITERATE, timeout=1.0)
                net.set(A, "good")
        finally:
            await sel.close()

    run(main(), 10)


def test_iteration_counts_never_go_back_when_a_reload_rebuilds_the_iterator() -> None:
    """The iterate metrics read `iteration_counts()`: a reload that changes the iterator's
    settings makes a new iterator (fresh IterStats), and the counts carry over, so the
    counters stay monotonic."""
    from resolver.iterate.iterator import Iterator

    cfg = UpstreamConfig(mode="iterate", servers=(), probe_ds="test.")
    sel = UpstreamSelector(cfg, make_validator, clock=lambda: WHEN)
    assert sel.iteration_counts() == {}
    first = sel.iterator()
    assert isinstance(first, Iterator)
    first.stats.sent_udp, first.stats.timeouts = 5, 2
    sel.reconfigure(dataclasses.replace(cfg, timeout=cfg.timeout + 1), Limits(), 1232)
    second = sel.iterator()
    assert isinstance(second, Iterator) and second is not first
    second.stats.sent_udp = 1
    counts = sel.iteration_counts()
    assert (counts["sent_udp"], counts["timeouts"], counts["sent_tcp"]) == (6, 2, 0)
