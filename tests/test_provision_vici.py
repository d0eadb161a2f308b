"""resolver.tunnels.vici without a daemon: the load-conn payload and error translation."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import IkeDaemonUnreachable, TunnelRejected
from resolver.ipseckey import IpsecKey
from resolver.tunnels.config import Identity
from resolver.tunnels.intents import InstallShunt, InstallTunnel, tunnel_spec
from resolver.tunnels.vici import ViciBackend

OWN = ed25519.Ed25519PrivateKey.generate()
PEM = OWN.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption())
IDENT = Identity("alice.example.test", Path("/unused"),
                 (IPv4Address("198.51.100.10"), IPv6Address("2001:db8:100::10")))
PEER = IpsecKey.from_public_key(dns.name.from_text("bob.example.test."),
                                ed25519.Ed25519PrivateKey.generate().public_key())


def backend(uri: str = "unix:///nonexistent/charon.vici", ident: Identity = IDENT) -> ViciBackend:
    return ViciBackend(uri, ident, PEM)


def test_connection_payload() -> None:
    b = backend()
    spec = tunnel_spec(PEER, IPv4Address("198.51.100.11"), None)
    conn = b.connection(spec)[spec.name]
    assert conn["remote_addrs"] == ["198.51.100.11"]
    assert conn["local_addrs"] == ["198.51.100.10"]
    assert conn["local"]["id"] == "alice.example.test"
    assert conn["local"]["pubkeys"][0].startswith("-----BEGIN PUBLIC KEY-----")
    assert conn["remote"] == {"auth": "pubkey", "id": "bob.example.test",
                              "pubkeys": [PEER.spki_pem()]}
    child = conn["children"][spec.name]
    assert child == {"mode": "tunnel", "local_ts": ["198.51.100.10/32"],
                     "remote_ts": ["198.51.100.11/32"], "start_action": "trap",
                     "dpd_action": "clear"}
    assert conn["dpd_delay"] == "30s"  # [provision] dpd_delay's default
    b.close()


def test_connection_payload_gateway_and_ipv6() -> None:
    b = backend(ident=Identity("alice.example.test", Path("/unused"),
                               (IPv4Address("198.51.100.10"),)))
    key = IpsecKey.from_public_key(dns.name.from_text("srv.example.test."),
                                   ed25519.Ed25519PrivateKey.generate().public_key(),
                                   gateway=IPv4Address("198.51.100.20"))
    spec = tunnel_spec(key, IPv6Address("2001:db8:113::21"), None)
    conn = b.connection(spec)[spec.name]
    assert conn["remote_addrs"] == ["198.51.100.20"] and conn["remote"]["id"] == "198.51.100.20"
    assert "local_addrs" not in conn  # no own IPv6 address configured: charon picks by route
    assert conn["children"][spec.name]["local_ts"] == ["dynamic"]
    assert conn["children"][spec.name]["remote_ts"] == ["2001:db8:113::21/128"]
    b.close()


def test_unreachable_daemon_is_translated() -> None:
    b = backend()
    spec = tunnel_spec(PEER, IPv4Address("198.51.100.11"), None)
    with pytest.raises(IkeDaemonUnreachable, match="nonexistent"):
        asyncio.run(b.apply(InstallTunnel(spec, 1.0)))
    with pytest.raises(IkeDaemonUnreachable):
        asyncio.run(b.installed())
    with pytest.raises(TunnelRejected, match="not a VICI intent"):
        asyncio.run(b.apply(InstallShunt(IPv4Address("198.51.100.11"))))
    b.close()


def test_bad_private_key() -> None:
    with pytest.raises(TunnelRejected, match="private key"):
        ViciBackend("unix:///x", IDENT, b"not a key")
