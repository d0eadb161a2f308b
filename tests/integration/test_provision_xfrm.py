"""XfrmBackend against the real kernel, in two throwaway namespaces of our own.

Scenario: namespaces A and B joined by a veth pair (192.0.2.1 <-> 192.0.2.2, 2001:db8:ff::1/2).
A shunt for B's address in A makes `ping` from A fail with EPERM, drops B's packets to A (counted
as XfrmInPolBlock) and shows up in `ip xfrm policy` as block policies of ours; removing it makes
ping work again; dump/flush leave a foreign policy alone. Nothing here touches the lab or the
host namespace's policies.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest

from resolver.tunnels.intents import InstallShunt, PolicyKey, RemoveShunt
from resolver.tunnels.xfrm import BLOCK_PRIORITY, XfrmBackend

pytestmark = pytest.mark.integration

B4, B6 = IPv4Address("192.0.2.2"), IPv6Address("2001:db8:ff::2")


def ip(*argv: str) -> str:
    return subprocess.run(["ip", *argv], check=True, capture_output=True, text=True,
                          timeout=10).stdout


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces, XFRM)")
    a, b = f"isk-ptest-{os.getpid()}-a", f"isk-ptest-{os.getpid()}-b"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip("-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        for ns, dev, v4, v6 in ((a, "va", "192.0.2.1/24", "2001:db8:ff::1/64"),
                                (b, "vb", "192.0.2.2/24", "2001:db8:ff::2/64")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", v4, "dev", dev)
            ip("-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def ping(ns: str, addr: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", str(addr)],
                          capture_output=True, text=True, timeout=10)


def in_policy_blocks(ns: str) -> int:
    """Packets the kernel of `ns` dropped on an inbound BLOCK policy (XfrmInPolBlock)."""
    stat = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/xfrm_stat"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    return next(int(line.split()[1]) for line in stat.splitlines()
                if line.startswith("XfrmInPolBlock"))


def test_block_shunt_blocks_and_unblocks(pair: tuple[str, str]) -> None:
    a, b = pair
    for _ in range(30):  # a fresh veth pair needs a moment (carrier, IPv6 neighbours)
        if ping(a, B4).returncode == 0 and ping(a, B6).returncode == 0:
            break
    else:
        pytest.fail("the namespace pair never became reachable without shunts")

    async def scenario() -> None:
        x = XfrmBackend(a)
        try:
            # someone else's policy, which we must never touch
            ip("-n", a, "xfrm", "policy", "add", "dst", "198.51.100.77/32", "dir", "out",
               "action", "block", "priority", "100")
            await x.apply(InstallShunt(B4))
            await x.apply(InstallShunt(B6))
            await x.apply(InstallShunt(B4))  # idempotent
            shown = ip("-n", a, "xfrm", "policy")
            assert f"dst {B4}/32" in shown and f"dst {B6}/128" in shown
            assert f"action block priority {BLOCK_PRIORITY}" in shown
            assert await x.installed() == {PolicyKey.shunt(B4), PolicyKey.shunt(B6)}
            for dest in (B4, B6):
                r = ping(a, dest)
                assert r.returncode != 0 and "Operation not permitted" in r.stderr, r
            # inbound too: B's echo requests are dropped by A's in policy, and counted
            before = in_policy_blocks(a)
            for dest in ("192.0.2.1", "2001:db8:ff::1"):
                assert ping(b, dest).returncode != 0
            assert in_policy_blocks(a) >= before + 2
            await x.apply(RemoveShunt(B4))
            await x.apply(RemoveShunt(B4))  # idempotent
            assert ping(a, B4).returncode == 0
            assert ping(a, B6).returncode != 0
            assert await x.installed() == {PolicyKey.shunt(B6)}
            # B6: each way udp 500, udp 4500, icmpv6 135/136; block out, in and forward
            assert await x.flush() == 11
            assert ping(a, B6).returncode == 0
            assert await x.installed() == frozenset()
            assert "198.51.100.77/32" in ip("-n", a, "xfrm", "policy")  # not ours: kept
        finally:
            await x.aclose()

    asyncio.run(scenario())
