"""Metrics: the metered server, resolution core and forwarder over real sockets against a
scripted upstream, counted against what was sent; the exposition checked by the real
`promtool check metrics`; the HTTP listener and the control socket's `stats` op."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rcode
import pytest

from autosp import control as client
from resolver.cache import WireCache
from resolver.config import HostPort, ServerConfig
from resolver.endpoints.control import ControlServer
from resolver.errors import TunnelRejected, TunnelTimeout
from resolver.metrics.http import MetricsListener
from resolver.metrics.metered import (
    DaemonMetrics,
    MeteredBackend,
    MeteredForwarder,
    MeteredResolution,
    MeteredServer,
    question_type,
)
from resolver.metrics.registry import Registry, flat_lines
from resolver.resolve import PlainHandler
from resolver.service.config import MetricsConfig
from resolver.service.runtime import ServiceRuntime
from resolver.validator.response import Security, Verdict
from tests.helpers import aio
from tests.scripted_upstream import FakeValidator, ScriptedUpstream, answer
from tests.test_control import FakeOps

WHEN = 1_800_000_000.0


def sample(m: DaemonMetrics, name: str, **labels: str) -> float:
    """One sample's value from the snapshot (0 when the series does not exist)."""
    for family in m.registry.snapshot():
        for s in family["samples"]:
            if s["name"] == "ipseckey_resolver_" + name and s["labels"] == labels:
                return float(s["value"])
    return 0.0


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool missing (Debian package prometheus; lab/setup.sh installs it)"
    return subprocess.run([exe, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


def script(q: dns.message.Message, _t: str) -> Any:
    name = q.question[0].name.to_text()
    if name.startswith("refused"):
        return answer(q, rcode=dns.rcode.REFUSED)
    if name.startswith("silent"):
        return None
    return answer(q, f"{name} 300 IN A 192.0.2.1")


async def udp(port: int, q: dns.message.Message) -> dns.message.Message:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, q.to_wire())
        return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(s, 65535), 5))
    finally:
        s.close()


@aio
async def test_counts_follow_the_queries_sent() -> None:
    m = DaemonMetrics(clock=lambda: WHEN)
    async with ScriptedUpstream(script) as up:
        dead = HostPort("127.0.0.1", 9)  # nothing listens: ICMP refused -> error
        bogus = {"bad.example.test.": Verdict(Security.BOGUS, "expired",
                                              dns.edns.EDECode.SIGNATURE_EXPIRED)}
        fwd = MeteredForwarder([dead, up.endpoint], timeout=0.3, attempts=1).meter(m)
        res = MeteredResolution(fwd, lambda f: FakeValidator(f, bogus)).meter(m)
        cfg = ServerConfig(listen=(HostPort("127.0.0.1", 0),))
        server = MeteredServer(PlainHandler(res), cfg, cache=WireCache(100),
                               clock=lambda: WHEN).meter(m)
        await server.start(cfg.listen)
        port = server.bound[0][1]
        try:
            for _ in range(3):  # one miss, then two wire-cache hits
                r = await udp(port, dns.message.make_query("www.example.test.", "A"))
                assert r.rcode() == dns.rcode.NOERROR
            r = await udp(port, dns.message.make_query("bad.example.test.", "AAAA", use_edns=0))
            assert r.rcode() == dns.rcode.SERVFAIL
            r = await udp(port, dns.message.make_query("refused.example.test.", "MX"))
            assert r.rcode() == dns.rcode.SERVFAIL
        finally:
            await server.stop()
    assert sample(m, "queries_total", type="A", rcode="NOERROR") == 3
    assert sample(m, "queries_total", type="AAAA", rcode="SERVFAIL") == 1
    assert sample(m, "queries_total", type="MX", rcode="SERVFAIL") == 1
    assert sample(m, "cache_hits_total") == 2 and sample(m, "cache_misses_total") == 3
    assert sample(m, "answers_total", security="secure", ede="none") == 1
    assert sample(m, "answers_total", security="bogus", ede="SIGNATURE_EXPIRED") == 1
    assert sample(m, "answers_total", security="indeterminate",
                  ede="NO_REACHABLE_AUTHORITY") == 1
    # Three questions went upstream; each tried the dead server first. The bogus one was asked
    # again before it was believed: over TCP, the next server (up) first (resolve.py re-check).
    assert sample(m, "upstream_failures_total", server=str(dead), reason="error") == 3
    assert sample(m, "upstream_queries_total", server=str(up.endpoint), transport="udp") == 3
    assert sample(m, "upstream_queries_total", server=str(up.endpoint), transport="tcp") == 1
    assert sample(m, "upstream_failures_total", server=str(up.endpoint), reason="REFUSED") == 1
    assert sample(m, "upstream_rtt_seconds_count", server=str(up.endpoint)) == 4
    assert sample(m, "validations_total") == 3  # bogus twice; REFUSED never reached it
    result = promtool(m.registry.render())
    assert result.returncode == 0, result.stdout + result.stderr


class _Backend:
    def __init__(self) -> None:
        self.outcomes: list[BaseException | None] = []

    async def apply(self, intent: Any) -> None:
        await asyncio.sleep(0.01)
        exc = self.outcomes.pop(0)
        if exc is not None:
            raise exc

    async def installed(self) -> frozenset[Any]:
        return frozenset()


@aio
async def test_backend_wrapper_times_setups_and_counts_failures_by_reason() -> None:
    from resolver.tunnels.intents import InstallTunnel, RemoveTunnel

    m = DaemonMetrics()
    real = _Backend()
    real.outcomes = [None, TunnelTimeout("t"), TunnelRejected("r"), None]
    b = MeteredBackend(real, m)
    spec: Any = object()
    await b.apply(InstallTunnel(spec, 1.0))
    for _ in range(2):
        with pytest.raises((TunnelTimeout, TunnelRejected)):
            await b.apply(InstallTunnel(spec, 1.0))
    await b.apply(RemoveTunnel("isk-x"))  # not a setup: not timed
    assert sample(m, "tunnel_setup_seconds_count") == 1
    assert 0.01 <= sample(m, "tunnel_setup_seconds_sum") < 1.0
    assert sample(m, "tunnel_setup_failures_total", reason="timeout") == 1
    assert sample(m, "tunnel_setup_failures_total", reason="rejected") == 1
    assert sample(m, "tunnel_setup_failures_total", reason="daemon-unreachable") == 0
    assert sample(m, "tunnel_setups_in_flight") == 0


@aio
async def test_backend_wrapper_keeps_the_backend_watchable() -> None:
    """The daemon wraps its backend in MeteredBackend; the watch (resolver/provisioning/watch.py)
    must
    still find charon's events and SAs through it, or it silently does not run."""
    from resolver.provision import Provisioner
    from resolver.provisioning.watch import TunnelWatch
    from resolver.tunnels.events import BackendEvent, HeldSa

    class Watchable(_Backend):
        def __init__(self) -> None:
            super().__init__()
            self.sinks: list[Any] = []

        def watch(self, sink: Any) -> bool:
            self.sinks.append(sink)
            return True

        async def live(self) -> frozenset[HeldSa]:
            return frozenset({HeldSa("isk-x", "1", "2")})

    real = Watchable()
    watch = TunnelWatch(Provisioner(MeteredBackend(real, DaemonMetrics())), interval=0)
    assert watch.start() and len(real.sinks) == 1
    await watch.close()
    assert await MeteredBackend(real, DaemonMetrics()).live() == {HeldSa("isk-x", "1", "2")}
    events: list[BackendEvent] = []
    assert not MeteredBackend(_Backend(), DaemonMetrics()).watch(events.append)  # the dry run


def test_exposition_format_details() -> None:
    r = Registry("x_")
    c = r.counter("events_total", "Events with \\ and\nnewline in help.", ("why",))
    c.inc('quote " backslash \\ newline \n')
    h = r.histogram("wait_seconds", "Waits.", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 7.0):
        h.observe(v)
    text = r.render()
    assert 'x_events_total{why="quote \\" backslash \\\\ newline \\n"} 1' in text
    assert 'x_wait_seconds_bucket{le="0.1"} 2' in text  # le is inclusive
    assert 'x_wait_seconds_bucket{le="1"} 3' in text
    assert 'x_wait_seconds_bucket{le="+Inf"} 4' in text
    assert "x_wait_seconds_count 4" in text and "x_wait_seconds_sum 7.65" in text
    result = promtool(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'x_wait_seconds_bucket{le="+Inf"} 4' in flat_lines(r.snapshot())


def test_question_type_by_slicing() -> None:
    for rdtype in ("A", "AAAA", "IPSECKEY", "TYPE65000"):
        wire = dns.message.make_query("a.b.example.", rdtype).to_wire()
        assert question_type(wire) == dns.rdatatype.from_text(rdtype)
    assert question_type(b"\x00" * 12 + b"\x03ab") is None
    assert question_type(b"\x00" * 12 + b"\xc0\x0c\x00\x01") is None


def test_metrics_config() -> None:
    assert MetricsConfig.from_section({}).listen is None
    assert MetricsConfig.from_section({"listen": "127.0.0.1"}).listen == HostPort("127.0.0.1",
                                                                                  9153)
    assert MetricsConfig.from_section({"listen": "[::1]:9100"}).listen == HostPort("::1", 9100)
    from resolver.errors import ConfigError

    for bad, words in (({"listen": "localhost:9153"}, "not an IP address"),
                       ({"listen": 9153}, "expected a string"), ({"port": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=words) as e:
            MetricsConfig.from_section(bad, "f.toml")
        assert "f.toml: [metrics]" in str(e.value)


async def http_get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


@aio
async def test_listener_serves_metrics_and_nothing_else() -> None:
    m = DaemonMetrics()
    m.queries.inc("A", "NOERROR")
    listener = MetricsListener(m.registry, HostPort("127.0.0.1", 0))
    await listener.start()
    assert listener.bound is not None
    port = listener.bound[1]
    try:
        ok = await http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert b"text/plain; version=0.0.4" in head
        assert b'ipseckey_resolver_queries_total{type="A",rcode="NOERROR"} 1' in body
        assert promtool(body.decode()).returncode == 0
        assert (await http_get(port, b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await http_get(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(
            b"HTTP/1.0 405")
        assert (await http_get(port, b"nonsense\r\n\r\n")).startswith(b"HTTP/1.0 400")
        huge = b"GET /metrics HTTP/1.0\r\nX: " + b"y" * 20000 + b"\r\n\r\n"
        assert (await http_get(port, huge)).startswith(b"HTTP/1.0 400")
    finally:
        await listener.close()


@aio
async def test_stats_and_debug_hang_through_the_control_socket(tmp_path: Path) -> None:
    m = DaemonMetrics()
    m.setup_failures.inc("timeout")
    plain = ServiceRuntime(m, {}, "t.toml")
    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, FakeOps(), clock=lambda: WHEN, extra=plain.control_ops())
    await server.start()
    try:
        got = await asyncio.to_thread(client.request, path, "stats", 5.0)
        assert got["now"] == WHEN
        lines = flat_lines(got["metrics"])
        assert 'ipseckey_resolver_tunnel_setup_failures_total{reason="timeout"} 1' in lines
        with pytest.raises(Exception, match="debug-hang is not enabled"):
            await asyncio.to_thread(client.request, path, "debug-hang", 5.0)
        with pytest.raises(Exception, match="stats takes no name"):
            await asyncio.to_thread(client.request, path, "stats", 5.0, name="x.")
    finally:
        await server.close()
    allowed = ServiceRuntime(m, {"debug": {"allow_hang": True}}, "t.toml")
    assert set(allowed.control_ops()) == {"stats", "debug-hang"}
