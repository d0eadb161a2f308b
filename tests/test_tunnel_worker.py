"""The tunnel worker (resolver/tunnels/process.py + worker.py): the backends in a child process.

A real child process each time (no fake of the pipe): the dry run for round trips, VICI with a
socket that is not there for errors and the watch, SIGKILL for the worker's death and for the
daemon's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from ipaddress import IPv4Address
from pathlib import Path

import dns.name
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.errors import ConfigError, IkeDaemonUnreachable
from resolver.ipseckey import IpsecKey
from resolver.tunnels.backend import CompositeBackend, make_daemon_backend
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.tunnels.events import BackendEvent, DaemonDisconnected
from resolver.tunnels.intents import InstallTunnel, PolicyKey, RemoveTunnel, tunnel_spec
from resolver.tunnels.process import ProcessBackend, RemoteVici
from resolver.tunnels.vici import ViciBackend
from tests.helpers import aio

SPEC = tunnel_spec(IpsecKey.from_public_key(dns.name.from_text("bob.example.test."),
                                            ed25519.Ed25519PrivateKey.generate().public_key()),
                   IPv4Address("198.51.100.11"), None)
DRY = ProvisionConfig(backend="dryrun", shunts="none")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def identity(tmp_path: Path) -> Identity:
    key = tmp_path / "host.pem"
    key.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    return Identity("alice.example.test", key, (IPv4Address("198.51.100.10"),))


@aio
async def test_calls_run_in_a_child_and_results_come_back() -> None:
    b = ProcessBackend(DRY, None)
    try:
        await b.apply(InstallTunnel(SPEC, 3.0))
        assert b.pid is not None and b.pid != os.getpid() and alive(b.pid)
        assert await b.installed() == {PolicyKey.tunnel(SPEC.name)}  # the child's dry run
        await asyncio.gather(*(b.apply(RemoveTunnel(SPEC.name)) for _ in range(20)))
        assert await b.installed() == frozenset()
        assert not b.watch(lambda e: None)  # the dry run has nothing to watch
    finally:
        pid = b.pid
        await b.aclose()
    assert pid is not None and not alive(pid)


@aio
async def test_errors_cross_as_provisioning_errors(tmp_path: Path) -> None:
    cfg = ProvisionConfig(vici_socket=f"unix://{tmp_path}/no-charon.vici", shunts="none")
    b = ProcessBackend(cfg, identity(tmp_path))
    try:
        with pytest.raises(IkeDaemonUnreachable, match=r"no-charon\.vici"):
            await b.apply(InstallTunnel(SPEC, 1.0))
        with pytest.raises(IkeDaemonUnreachable):
            await b.installed()
    finally:
        await b.aclose()


@aio
async def test_a_dead_worker_is_a_lost_daemon_and_is_replaced(tmp_path: Path) -> None:
    """SIGKILL of the worker: the watch hears DaemonDisconnected (every tunnel counts as lost:
    we cannot see charon any more), and a new worker is started without waiting for a call."""
    cfg = ProvisionConfig(vici_socket=f"unix://{tmp_path}/no-charon.vici", shunts="none")
    b = ProcessBackend(cfg, identity(tmp_path))
    events: list[BackendEvent] = []
    try:
        assert b.watch(events.append)
        for _ in range(200):
            if b.pid is not None and b._writer is not None:
                break
            await asyncio.sleep(0.05)
        first = b.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for _ in range(400):
            if b.pid != first and b._writer is not None:
                break
            await asyncio.sleep(0.05)
        assert [type(e) for e in events] == [DaemonDisconnected]
        assert b.pid != first and b.pid is not None and alive(b.pid)
        assert not alive(first)  # reaped, not a zombie
        with pytest.raises(IkeDaemonUnreachable, match="no-charon"):  # the new one serves
            await b.installed()
    finally:
        await b.aclose()


PARENT = textwrap.dedent("""
    import asyncio, sys
    from resolver.tunnels.config import ProvisionConfig
    from resolver.tunnels.process import ProcessBackend

    async def main():
        b = ProcessBackend(ProvisionConfig(backend="dryrun", shunts="none"), None)
        await b.installed()
        print(b.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def test_the_worker_ends_with_the_daemon_even_on_sigkill() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert parent.stdout is not None
    worker = int(parent.stdout.readline())
    assert alive(worker)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)


def test_the_daemon_checks_the_key_itself_and_builds_a_worker(tmp_path: Path) -> None:
    ident = identity(tmp_path)
    process, remote = make_daemon_backend(ProvisionConfig(shunts="none"), ident)
    assert isinstance(process, ProcessBackend) and isinstance(remote, RemoteVici)
    assert remote.identity == ident and remote.own_spki.startswith("-----BEGIN PUBLIC KEY")
    in_threads, vici = make_daemon_backend(ProvisionConfig(shunts="none", worker_process=False),
                                           ident)
    assert isinstance(in_threads, CompositeBackend) and in_threads.tunnels is vici
    assert isinstance(vici, ViciBackend)
    vici.close()
    assert make_daemon_backend(ProvisionConfig(backend="dryrun", shunts="none"), None)[1] is None
    ident.private_key.chmod(0o644)
    with pytest.raises(ConfigError, match="too open"):  # at start-up, in the daemon
        make_daemon_backend(ProvisionConfig(shunts="none"), ident)
