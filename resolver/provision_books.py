"""The Provisioner's books: what it holds, leases, counters, and the state file's snapshot.

Part of the Provisioner (resolver/provision.py has its Rules; DESIGN.md step 7). This module
holds the values every part of it reads and writes, and the small helpers that keep them
consistent: the books themselves (tunnels with their state and lease, shunts, failures held,
pins, adopted conns, setups in flight), the counters, the read-only queries, the shunt helpers
that every path uses, and the link to the state file (Rule 5: `_save` soon, `_persist` and
wait). The setup path is resolver/provision_setup.py, start-up resolver/provision_reconcile.py,
what the watch reports resolver/provision_watch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from resolver.errors import ProvisioningError, StateWriteFailed
from resolver.statefile import Encode, StateFile
from resolver.tunnels.backend import ProvisioningBackend
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import InstallShunt, Intent, TunnelSpec
from resolver.tunnels.statedoc import Snapshot, dump

log = logging.getLogger("resolver.provision")  # one logger for the Provisioner's parts

Address = IPv4Address | IPv6Address

ADOPTED_LEASE: Final = 60.0  # seconds (at most [provision] lease) an adopted conn lives unused
IKE_RETRY: Final = 2.0  # seconds between connection attempts to an IKE daemon absent at start-up


class TunnelState(enum.Enum):
    PENDING = "pending"
    INSTALLED = "installed"
    DOWN = "down"  # wanted (leased or pinned), but the IKE daemon does not hold it (Rule 6)


@dataclass(slots=True)
class Tunnel:
    spec: TunnelSpec
    state: TunnelState
    expires_at: float  # lease end; teardown at expires_at + grace
    saved_expires_at: float = 0.0  # the lease end in the last snapshot given to the state file
    private: bool = False  # dropped (shunt) whenever it is not up: ensured with shunt=True


@dataclass(slots=True)
class Counters:
    """For `autosp status` and the logs."""

    setups: int = 0
    failures: int = 0
    replacements: int = 0
    teardowns: int = 0
    coalesced: int = 0
    active: int = 0
    shunts: int = 0
    lost: int = 0  # tunnels found gone in the IKE daemon (Rule 6)
    down: int = 0  # of which still down
    bound: int = 0  # lookups refused: the address is bound to another name's key (Rule 7)
    adopted: int = 0  # conns of ours kept without a trustworthy state file (Rule 8)


@dataclass(frozen=True, slots=True)
class Failure:
    until: float
    error: ProvisioningError


@dataclass(slots=True)
class Books:
    tunnels: dict[Address, Tunnel] = field(default_factory=dict)
    shunts: dict[Address, float] = field(default_factory=dict)
    failed: dict[Address, Failure] = field(default_factory=dict)
    pinned: set[Address] = field(default_factory=set)
    adopted: dict[str, float] = field(default_factory=dict)  # conn name -> lease end (Rule 8)
    inflight: dict[Address, tuple[TunnelSpec, asyncio.Task[float]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `reconcile` starts from; `trusted` False: the state file was corrupt (Rule 8)."""

    tunnels: list[tuple[TunnelSpec, float]]
    shunts: dict[Address, float]
    adopted: dict[str, float]
    trusted: bool = True


class ProvisionerBooks:
    """The books and their helpers; resolver/provision.py's Provisioner is built on it."""

    def __init__(self, backend: ProvisioningBackend, config: ProvisionConfig | None = None, *,
                 must_drop: Callable[[TunnelSpec], bool] | None = None) -> None:
        """`must_drop(spec)`: whether the policy makes the destination private, for tunnels
        not (yet) ensured with shunt=True since start-up (restored from the state file)."""
        self.backend = backend
        self.config = config or ProvisionConfig()
        self.counters = Counters()
        self.must_drop = must_drop
        # Called (synchronously, on the loop) when tunnels are lost: the answer caches must not
        # hand out again what was answered for them (Rule 6).
        self.on_lost: list[Callable[[], None]] = []
        self._epoch = 0  # IKE daemon connections lost so far (a setup spanning one fails)
        # Measured: 200 setups at once overran charon (IKE_SAs failing within ~1 s) once our
        # own loop stopped being the bottleneck. A bounded number in flight keeps each within
        # its timeout; the wait for a slot counts against that timeout (fail closed).
        self._slots = asyncio.Semaphore(self.config.max_setups)
        self._b = Books()
        path = self.config.state_file
        self._state = StateFile(path, self._snapshot) if path is not None else None
        self.ike_ready = True  # False: the IKE daemon was unreachable at start-up (Rule 8)
        self._pending: Loaded | None = None  # loaded, not reconciled yet
        self._reconciled = False
        self._reconciling = asyncio.Lock()

    def lease_left(self, destination: Address, now: float) -> float | None:
        """Seconds until the lease of the tunnel to `destination` ends (None: no tunnel)."""
        t = self._b.tunnels.get(destination)
        if t is None or t.state is not TunnelState.INSTALLED:
            return None
        return max(0.0, t.expires_at - now)

    def tunnels(self) -> dict[Address, TunnelSpec]:
        """Tunnels charon holds, by destination (for the control socket: `autosp status` and
        `list`). Not just what we set up: the watch takes out what charon lost (Rule 6)."""
        return {d: t.spec for d, t in self._b.tunnels.items() if t.state is TunnelState.INSTALLED}

    def shunted(self) -> frozenset[Address]:
        return frozenset(self._b.shunts)

    async def _install_shunts(self, destinations: tuple[Address, ...] | list[Address],
                              now: float) -> bool:
        """`shunt` without waiting for the state file; True if a shunt was added."""
        changed = False
        for dest in destinations:
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED:
                continue
            if dest not in self._b.shunts:
                await self.backend.apply(InstallShunt(dest))
                changed = True
            self._b.shunts[dest] = max(self._b.shunts.get(dest, 0.0), now + self.config.lease)
        self._count()
        if changed:
            self._save()
        return changed

    async def _shunt_now(self, dests: list[Address], now: float) -> list[Address]:
        """Shunt `dests` at once, all in one batch (the XFRM backend sends concurrent intents
        together), even if their tunnels still count as up; a failure is logged loudly: this
        is the one thing that must work. Returns the destinations newly shunted."""
        new = [d for d in dests if d not in self._b.shunts]
        results = await asyncio.gather(*(self.backend.apply(InstallShunt(d)) for d in new),
                                       return_exceptions=True)
        done = []
        for dest, res in zip(new, results, strict=True):
            if isinstance(res, ProvisioningError):
                log.error("drop shunt for %s failed: %s", dest, res)
            elif isinstance(res, BaseException):
                raise res
            else:
                done.append(dest)
        for dest in dests:
            if dest in done or dest in self._b.shunts:
                self._b.shunts[dest] = max(self._b.shunts.get(dest, 0.0), now + self.config.lease)
        self._count()
        return done

    def _private(self, t: Tunnel) -> bool:
        return t.private or self._must_drop(t.spec)

    def _must_drop(self, spec: TunnelSpec) -> bool:
        return self.must_drop is not None and self.must_drop(spec)

    def _forget(self, dest: Address, _task: asyncio.Task[float]) -> None:
        self._b.inflight.pop(dest, None)

    def _extend(self, t: Tunnel, now: float) -> float:
        t.expires_at = max(t.expires_at, now + self.config.lease)
        if t.expires_at - t.saved_expires_at > self.config.lease / 4:
            self._save()  # a lease moved far enough that a restart should know
        return t.expires_at

    async def _quietly(self, intent: Intent) -> None:
        """Apply a cleanup intent; a failure is logged (the next reconcile retries it)."""
        try:
            await self.backend.apply(intent)
        except ProvisioningError as exc:
            log.warning("%s failed: %s", type(intent).__name__, exc)

    def _count(self) -> None:
        self.counters.active = sum(
            1 for t in self._b.tunnels.values() if t.state is TunnelState.INSTALLED)
        self.counters.down = sum(
            1 for t in self._b.tunnels.values() if t.state is TunnelState.DOWN)
        self.counters.shunts = len(self._b.shunts)
        self.counters.adopted = len(self._b.adopted)

    def _save(self) -> None:
        """The books changed: have them written soon, without waiting."""
        if self._state is not None:
            self._state.changed()

    async def _persist(self) -> None:
        """Return once a write that includes the books as they are now is on disk.

        Raises:
            StateWriteFailed: the state file cannot be written (the answer becomes SERVFAIL
                rather than an answer a restart would forget).
        """
        if self._state is not None:
            await self._state.persist()

    async def _persist_quietly(self) -> None:
        """`_persist` for changes no answer depends on: a failed write is logged (by the state
        file; it is retried with the next change)."""
        with contextlib.suppress(StateWriteFailed):
            await self._persist()

    def _snapshot(self) -> Encode:
        """The wanted state as values (cheap, on the loop); serialized on the file's thread."""
        # DOWN tunnels are still wanted: only PENDING ones are not written.
        tunnels = [t for t in self._b.tunnels.values() if t.state is not TunnelState.PENDING]
        for t in tunnels:
            t.saved_expires_at = t.expires_at  # what this write (and `_extend`) goes by
        snap = Snapshot(
            tunnels=tuple((t.spec, t.expires_at, t.spec.destination in self._b.pinned)
                          for t in tunnels),
            shunts=tuple(self._b.shunts.items()), adopted=tuple(self._b.adopted.items()))
        return functools.partial(dump, snap)
