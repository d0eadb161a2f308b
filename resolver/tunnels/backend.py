"""The backend interface (httpcore's NetworkBackend in spirit), the composite, and the factory.

Backends are edges: they import the intents (`resolver.tunnels.intents`), never the
Provisioner, and the Provisioner imports only this interface. `make_backend` is the one place
that knows which implementations exist (`make_daemon_backend` puts them in the tunnel worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from resolver.errors import ConfigError, ProvisioningError
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.tunnels.dryrun import DryRunBackend
from resolver.tunnels.events import BackendEvent, HeldSa
from resolver.tunnels.intents import InstallTunnel, Intent, ItemKind, PolicyKey, RemoveTunnel
from resolver.tunnels.process import ProcessBackend, RemoteVici
from resolver.tunnels.vici import ViciBackend
from resolver.tunnels.xfrm import XfrmBackend

log = logging.getLogger(__name__)


class ProvisioningBackend(Protocol):
    """The edge (httpcore's NetworkBackend in spirit). Raise only ProvisioningError subclasses."""

    async def apply(self, intent: Intent) -> None: ...

    async def installed(self) -> frozenset[PolicyKey]: ...


@runtime_checkable
class WatchableBackend(Protocol):
    """A backend that reports its daemon's events and what it holds
    (resolver/provisioning/watch.py)."""

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        """Start reporting to `sink` (on the running loop); False: nothing to watch."""
        ...

    async def live(self) -> frozenset[HeldSa]: ...


class CompositeBackend:
    """Tunnels to one backend (VICI), shunts and floors to another (XFRM); `None` drops
    those intents."""

    def __init__(self, tunnels: ProvisioningBackend, shunts: ProvisioningBackend | None) -> None:
        self.tunnels = tunnels
        self.shunts = shunts

    async def apply(self, intent: Intent) -> None:
        if isinstance(intent, InstallTunnel | RemoveTunnel):
            await self.tunnels.apply(intent)
        elif self.shunts is not None:
            await self.shunts.apply(intent)

    async def installed(self) -> frozenset[PolicyKey]:
        found = {k for k in await self.tunnels.installed() if k.kind is ItemKind.TUNNEL}
        if self.shunts is not None:
            found |= {k for k in await self.shunts.installed()
                      if k.kind in (ItemKind.SHUNT, ItemKind.FLOOR)}
        return frozenset(found)

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        """Watch the tunnel backend (False for one that cannot be watched: the dry run)."""
        return isinstance(self.tunnels, WatchableBackend) and self.tunnels.watch(sink)

    async def live(self) -> frozenset[HeldSa]:
        if isinstance(self.tunnels, WatchableBackend):
            return await self.tunnels.live()
        return frozenset()


def make_backend(config: ProvisionConfig, identity: Identity | None, *,
                 netns: str | None = None, source: str = "config") -> CompositeBackend:
    """The backends the configuration asks for: tunnels over VICI (or the dry run, only when
    `backend = "dryrun"` is written down: nothing falls back to it), shunts over XFRM.

    Raises:
        ConfigError: VICI without an [identity], or an unreadable private key.
    """
    tunnels: ProvisioningBackend
    if config.backend == "dryrun":
        log.warning("provisioning is a DRY RUN: tunnels are logged, not built; private "
                    "destinations are answered without protection")
        tunnels = DryRunBackend()
    else:
        if identity is None:
            raise ConfigError(f"{source}: [identity] is required with [provision] backend 'vici'")
        try:
            tunnels = ViciBackend(config.vici_socket, identity, dpd_delay=config.dpd_delay)
        except (ProvisioningError, ConfigError) as exc:  # unreadable, too open, not a key
            raise ConfigError(f"{source}: [identity] key 'private_key': {exc}") from None
    shunts = XfrmBackend(netns) if config.shunts == "xfrm" else None
    return CompositeBackend(tunnels, shunts)


def make_daemon_backend(config: ProvisionConfig, identity: Identity | None, *,
                        source: str = "config"
                        ) -> tuple[ProvisioningBackend, ViciBackend | RemoteVici | None]:
    """The daemon's backend, and the responder's access to VICI (None: no VICI, the dry run).

    `make_backend`'s backends, run in the tunnel worker process (resolver/tunnels/process.py),
    or in the daemon's own threads with `worker_process = false`. The checks `make_backend`
    makes (the key file) run here, in the daemon, so a bad key still stops the start with one
    line.

    Raises:
        ConfigError: as `make_backend`.
    """
    process = ProcessBackend(config, identity, log_level=logging.getLogger().getEffectiveLevel())
    if config.worker_process and config.backend == "dryrun":
        return process, None  # nothing to check here (the worker says it is a dry run)
    backend = make_backend(config, identity, source=source)
    vici = backend.tunnels if isinstance(backend.tunnels, ViciBackend) else None
    if not config.worker_process:
        return backend, vici
    if vici is not None and identity is not None:
        process.vici = RemoteVici(process, identity, vici.own_spki, config.dpd_delay)
        vici.close()  # built to check the key; the worker builds its own
    return process, process.vici
