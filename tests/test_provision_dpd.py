"""[provision] dpd_delay: parsed with errors naming file, table and key, and carried on every
conn the real backends build (the initiator's load-conn payload, the responder's).

The payloads are the ones `ViciBackend.connection` and `responder_conn` hand to load-conn,
built from backends made by the daemon's own factories (`make_backend`,
`make_daemon_backend`) from a parsed [provision] table; charon listing the value for a loaded
conn is tests/integration/test_dead_peer.py.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import ConfigError
from resolver.ipseckey import IpsecKey
from resolver.responder.core import Admit, conn_name, responder_conn
from resolver.tunnels.backend import make_backend, make_daemon_backend
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.tunnels.intents import tunnel_spec
from resolver.tunnels.vici import ViciBackend

BOB = dns.name.from_text("bob.example.test.")
PEER = IpsecKey.from_public_key(BOB, ed25519.Ed25519PrivateKey.generate().public_key())
BOB4 = IPv4Address("198.51.100.11")


def parsed(**keys: object) -> ProvisionConfig:
    return ProvisionConfig.from_section({"vici_socket": "unix:///nonexistent/charon.vici",
                                         **keys}, "r.toml")


def identity(tmp_path: Path) -> Identity:
    key = tmp_path / "key.pem"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    return Identity("alice.example.test", key, (IPv4Address("198.51.100.10"),))


@pytest.mark.parametrize(("raw", "expected"), [({"dpd_delay": 7}, 7), ({"dpd_delay": 0}, 0),
                                               ({}, 30)])
def test_dpd_delay_parses(raw: dict[str, object], expected: int) -> None:
    assert parsed(**raw).dpd_delay == expected


@pytest.mark.parametrize(("value", "problem"), [
    (-1, "must be a number of seconds, 0 (off) or more"),
    (86401, "must be at most 86400 seconds"),
    ("30s", "expected an integer, got a string"),
    (2.5, "expected an integer, got a float"),
    (True, "expected an integer, got a boolean"),
])
def test_dpd_delay_errors_name_file_table_and_key(value: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(
            f"r.toml: [provision] key 'dpd_delay': {problem}")):
        parsed(dpd_delay=value)


@pytest.mark.parametrize(("delay", "sent"), [(7, "7s"), (0, "0s"), (None, "30s")])
def test_initiator_conn_carries_dpd_delay(tmp_path: Path, delay: int | None, sent: str) -> None:
    config = parsed() if delay is None else parsed(dpd_delay=delay)
    backend = make_backend(config, identity(tmp_path))
    vici = backend.tunnels
    assert isinstance(vici, ViciBackend)
    try:
        spec = tunnel_spec(PEER, BOB4, None)
        conn = vici.connection(spec)[spec.name]
        assert conn["dpd_delay"] == sent
        assert "dpd_timeout" not in conn  # IKEv1 only: charon ignores it for IKEv2
        # DPD's verdict closes the CHILD_SA; the watch repairs (no second initiate by charon)
        assert conn["children"][spec.name]["dpd_action"] == "clear"
    finally:
        vici.close()


@pytest.mark.parametrize("worker_process", [True, False])
def test_responder_conn_carries_dpd_delay(tmp_path: Path, worker_process: bool) -> None:
    ident = identity(tmp_path)
    _, vici = make_daemon_backend(parsed(dpd_delay=11, worker_process=worker_process), ident)
    assert vici is not None
    try:
        admit = Admit(BOB, (PEER,), (BOB4,), (BOB4,))
        conn = responder_conn(admit, ident.fqdn, vici.own_spki, ident.addresses,
                              vici.dpd_delay)[conn_name(BOB)]
        assert conn["dpd_delay"] == "11s"
        assert conn["children"][conn_name(BOB)]["dpd_action"] == "clear"
    finally:
        if isinstance(vici, ViciBackend):
            vici.close()
