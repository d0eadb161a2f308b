"""The daemon's own addresses (never tunnelled) on a point-to-point link: IFA_LOCAL is ours,
IFA_ADDRESS is the peer's. Reading IFA_ADDRESS would make the peer "us", and a private
destination at the peer would then be answered in clear. Runs in a throwaway namespace; no
packet is sent."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from lab.probes import python_argv

pytestmark = pytest.mark.integration


def test_point_to_point_peer_is_not_our_address() -> None:
    ns = f"isk-ptp-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", "198.51.100.201", "peer",
                        "198.51.100.202/32", "dev", "lo"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", ns, *python_argv(
                "-c", "from resolver.cli import host_addresses\n"
                "print(' '.join(sorted(str(a) for a in host_addresses())))")],
            check=True, capture_output=True, text=True, timeout=30).stdout.split()
        assert "198.51.100.201" in out
        assert "198.51.100.202" not in out
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
