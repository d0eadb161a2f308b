"""The whole lookup path in alice: Forwarder -> Resolution -> our Validator -> CaptureHandler ->
Provisioner -> charon (VICI) + XFRM, against the lab's signed zones (root anchor = the lab's).

The asyncio loop runs in a thread inside alice's network namespace (`lab.call_in`), so every
DNS packet starts in alice; the VICI socket is a file and reachable from there.

Scenarios: bob (secure key) -> tunnel up before the answer and the answer is AD; the
bad-signature IPSECKEY -> SERVFAIL; the unsigned zone's key -> no tunnel (private: SERVFAIL,
no key); plain (no IPSECKEY, secure denial) under private-or-clear -> clear answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest

from lab import Lab
from resolver.capture import CaptureHandler
from resolver.config import HostPort
from resolver.policy import Policy, PolicyConfig
from resolver.resolve import Fetch, PlainHandler, Resolution
from resolver.upstream.forward import Forwarder
from resolver.validator.anchors import TrustAnchors
from resolver.validator.response import Validator
from tests.helpers import AliceTunnels, ede

pytestmark = pytest.mark.integration


def run_in_alice(lab: Lab, group: str, names: list[str]) -> dict[str, Any]:
    """Ask `names` (A) through a fresh resolver stack in alice; returns replies, tunnel states."""
    anchors = TrustAnchors.from_file(lab.root_anchor_file)

    async def scenario() -> dict[str, Any]:
        def make_validator(fetch: Fetch) -> Validator:
            return Validator(anchors, fetch)

        resolution = Resolution(Forwarder([HostPort(lab.unbound_addr)]), make_validator)
        tunnels = AliceTunnels(lab, joined=True)  # this thread is in alice's namespace already
        policy = Policy(PolicyConfig.from_section({"default": group}),
                        own_addresses=tunnels.ident.addresses)
        handler = CaptureHandler(PlainHandler(resolution), resolution, policy,
                                 tunnels.provisioner)
        out: dict[str, Any] = {}
        try:
            for name in names:
                q = dns.message.make_query(name, "A", want_dnssec=True, use_edns=0)
                t0 = time.perf_counter()
                out[name] = await handler.handle(q, time.time())
                out[name + " ms"] = (time.perf_counter() - t0) * 1000
            out["states"] = await tunnels.vici.child_states()
        finally:
            await tunnels.cleanup()
        return out

    result: dict[str, Any] = lab.call_in("alice", lambda: asyncio.run(scenario()), timeout=60)
    return result


def test_private_through_our_validator(lab: Lab) -> None:
    out = run_in_alice(lab, "private", ["bob.example.test.", "host.badsig.test.",
                                        "host.unsigned.test."])
    bob = out["bob.example.test."]
    assert bob.rcode() == dns.rcode.NOERROR and bob.flags & dns.flags.AD
    assert [s for s in out["states"].values()] == ["INSTALLED"]
    print(f"\nfirst lookup of bob through capture (tunnel included): "
          f"{out['bob.example.test. ms']:.1f} ms")
    badsig = out["host.badsig.test."]
    assert badsig.rcode() == dns.rcode.SERVFAIL and ede(badsig)[0] in (6, 7, 9, 10)
    unsigned = out["host.unsigned.test."]
    assert unsigned.rcode() == dns.rcode.SERVFAIL and ede(unsigned)[0] == 28


def test_private_or_clear_without_key(lab: Lab) -> None:
    out = run_in_alice(lab, "private-or-clear", ["plain.example.test."])
    plain = out["plain.example.test."]
    assert plain.rcode() == dns.rcode.NOERROR and plain.flags & dns.flags.AD
    assert out["states"] == {}
