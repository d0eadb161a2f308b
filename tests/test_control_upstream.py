"""The control socket's `upstream` request: what `autosp upstream` shows, in both daemon kinds
(with tunnels: beside the endpoint requests; without: a status-only socket)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from autosp import output
from autosp.cli import main as autosp_main
from resolver.endpoints.control import ControlServer, start_status_socket
from resolver.endpoints.protocol import EndpointError, check_request
from resolver.errors import ConfigError
from tests.helpers import aio
from tests.test_control import ENDPOINT, ask, serve

WHEN = 1_800_000_000.0
STATUS = {"mode": "auto", "path": "iterate", "using": [],
          "reason": "198.51.100.13:53 strips or mangles DNSSEC (. DNSKEY: bogus: no RRSIG)",
          "since": WHEN - 12, "forwarders": ["198.51.100.13:53"], "source": "/etc/resolv.conf",
          "last_probe": WHEN - 2, "probes": [{"server": "198.51.100.13:53", "status": "strips",
                                              "reason": ". DNSKEY: bogus: no RRSIG"}]}


class Config:
    def __init__(self, sections: dict[str, Any]) -> None:
        self.path = None
        self.sections = sections


def test_the_request_takes_no_name() -> None:
    assert check_request("upstream").op == "upstream"
    with pytest.raises(EndpointError, match="upstream takes no name"):
        check_request("upstream", "bob.example.test.")


@aio
async def test_upstream_beside_the_endpoint_requests(tmp_path: Path) -> None:
    seen: list[float] = []

    async def status(now: float) -> Any:
        seen.append(now)
        return STATUS

    server, ops, path = await serve(tmp_path, extra={"upstream": status})
    try:
        assert await ask(path, "upstream") == STATUS
        assert await ask(path, "list") == {"endpoints": [ENDPOINT]}  # endpoints as before
        assert seen == [WHEN] and ops.calls == [("list", WHEN)]
    finally:
        await server.close()


@aio
async def test_a_daemon_that_does_not_report_its_upstream_says_so(tmp_path: Path) -> None:
    server, _ops, path = await serve(tmp_path)
    try:
        with pytest.raises(ConfigError, match="upstream is not enabled in this resolver"):
            await ask(path, "upstream")
    finally:
        await server.close()


@aio
async def test_a_plain_resolver_listens_only_with_a_control_table(tmp_path: Path) -> None:
    async def status(_now: float) -> Any:
        return STATUS

    ops = {"upstream": status}
    assert await start_status_socket(Config({}), ops) is None  # no default path taken
    sock = tmp_path / "run" / "control.sock"
    server = await start_status_socket(Config({"control": {"socket": str(sock)}}), ops)
    assert isinstance(server, ControlServer)
    try:
        assert await ask(sock, "upstream") == STATUS
        with pytest.raises(ConfigError, match="keeps no endpoints"):
            await ask(sock, "list")
        code = await asyncio.to_thread(autosp_main, ["--control", str(sock), "upstream"])
        assert code == 0
    finally:
        await server.close()


def test_autosp_upstream_output() -> None:
    text = output.upstream(STATUS, now=WHEN)
    assert text.splitlines() == [
        "mode:        auto",
        "path:        iterate",
        "reason:      198.51.100.13:53 strips or mangles DNSSEC (. DNSKEY: bogus: no RRSIG)",
        f"since:       {output.when(WHEN - 12, WHEN)}",
        "forwarders:  198.51.100.13:53 (from /etc/resolv.conf)",
        f"last probe:  {output.when(WHEN - 2, WHEN)}",
        "  198.51.100.13:53: strips: . DNSKEY: bogus: no RRSIG",
    ]
    assert output.when(WHEN - 12, WHEN).endswith("(12 s ago)")
    forwarding = {**STATUS, "path": "forward", "using": ["198.51.100.53:53"], "probes": [],
                  "forwarders": []}
    lines = output.upstream(forwarding, now=WHEN).splitlines()
    assert lines[1] == "path:        forward to 198.51.100.53:53"
    assert lines[-1] == "forwarders:  - (from /etc/resolv.conf)"
