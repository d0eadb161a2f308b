"""The Provisioner: tunnels and shunts from decisions, with leases, coalescing and reconcile.

Theory of operation. The policy says *that* a destination needs a tunnel (`policy.Tunnel`) or a
drop shunt (`policy.Refuse.drop`); the `Provisioner` here turns that into intents
(resolver/tunnels/intents.py) for one `ProvisioningBackend` (resolver/tunnels/backend.py) and
keeps the books:

  Rule 1: one setup in flight per destination. Concurrent lookups of the same name (or of
          names sharing an address) await the same task; fifty lookups make one tunnel. At most
          `max_setups` setups run at once; the wait for a slot counts against the timeout.
  Rule 2: success means the backend said so: `apply(InstallTunnel)` returns only once the IKE
          daemon reports the CHILD_SA INSTALLED, and the provisioner bounds it with `timeout`.
  Rule 3: every tunnel and shunt has a lease. Each answer extends it (`ensure`); `expire(now)`
          tears down what has been unused for lease + grace. A failed setup is remembered for
          `failure_hold` seconds so that a dead peer costs one timeout, not one per query.
          Pinned tunnels (autosp endpoints) have no lease end: only `release` removes them. A
          pinned tunnel whose setup failed keeps its conn loaded (PENDING): the peer may
          initiate to us through it (issue 11: two hosts that pin each other).
  Rule 4: a destination whose published key (or gateway) changed gets its tunnel replaced,
          make before break, inside the same in-flight slot: InstallTunnel(new) while the old
          one carries traffic, then RemoveTunnel(old) (or the connection is replaced in place
          when the name is the same). If the new one fails, the old one stays as it was.
  Rule 5: the wanted state (tunnels and shunts with their lease ends, in POSIX seconds) is kept
          in a state file (resolver/statefile.py: atomic, written off the event loop, group
          commits). `reconcile(now)` at start-up re-applies what is still wanted and removes
          our strays, so `kill -9` and a restart converge.
          "Nothing lost on a crash" means: no answer leaves before the state it depends on is
          on disk. A tunnel is only reported up (and so answered) once a write that includes it
          has completed (`_persist`); a refusal's drop shunt likewise. A negotiating shunt is
          not waited for (`_save`): if we crash before it is written, reconcile removes it as a
          stray, and no answer was given for it. Lease extensions and pins are written soon,
          not waited for: a restart then restores a slightly older lease (endpoints are also
          restored by the endpoints manager from its own state file).

Time: every entry point takes `now` (POSIX seconds, the same clock as RRSIG validity) because
leases must survive a restart in the state file. Real waiting (the setup timeout) uses asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from resolver.errors import ProvisioningError, StateCorrupt, TunnelRejected, TunnelTimeout
from resolver.statefile import Encode, StateFile
from resolver.tunnels.backend import ProvisioningBackend
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import (
    InstallShunt,
    InstallTunnel,
    Intent,
    ItemKind,
    PolicyKey,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
)

log = logging.getLogger(__name__)

Address = IPv4Address | IPv6Address

# --- the provisioner ---------------------------------------------------------------------------


class TunnelState(enum.Enum):
    PENDING = "pending"
    INSTALLED = "installed"


@dataclass(slots=True)
class _Tunnel:
    spec: TunnelSpec
    state: TunnelState
    expires_at: float  # lease end; teardown at expires_at + grace
    saved_expires_at: float = 0.0  # the lease end in the last snapshot given to the state file


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


@dataclass(frozen=True, slots=True)
class _Failure:
    until: float
    error: ProvisioningError


@dataclass(slots=True)
class _Books:
    tunnels: dict[Address, _Tunnel] = field(default_factory=dict)
    shunts: dict[Address, float] = field(default_factory=dict)
    failed: dict[Address, _Failure] = field(default_factory=dict)
    pinned: set[Address] = field(default_factory=set)
    inflight: dict[Address, tuple[TunnelSpec, asyncio.Task[float]]] = field(default_factory=dict)


class Provisioner:
    """Leases, coalescing, state and reconcile on top of one ProvisioningBackend."""

    def __init__(self, backend: ProvisioningBackend, config: ProvisionConfig | None = None) -> None:
        self.backend = backend
        self.config = config or ProvisionConfig()
        self.counters = Counters()
        # Measured: 200 setups at once overran charon (IKE_SAs failing within ~1 s) once our
        # own loop stopped being the bottleneck. A bounded number in flight keeps each within
        # its timeout; the wait for a slot counts against that timeout (fail closed).
        self._slots = asyncio.Semaphore(self.config.max_setups)
        self._b = _Books()
        path = self.config.state_file
        self._state = StateFile(path, self._snapshot) if path is not None else None

    # -- queries ---------------------------------------------------------------------------

    def lease_left(self, destination: Address, now: float) -> float | None:
        """Seconds until the lease of the tunnel to `destination` ends (None: no tunnel)."""
        t = self._b.tunnels.get(destination)
        if t is None or t.state is not TunnelState.INSTALLED:
            return None
        return max(0.0, t.expires_at - now)

    def tunnels(self) -> dict[Address, TunnelSpec]:
        """Installed tunnels by destination (for the control socket)."""
        return {d: t.spec for d, t in self._b.tunnels.items() if t.state is TunnelState.INSTALLED}

    def shunted(self) -> frozenset[Address]:
        return frozenset(self._b.shunts)

    # -- the entry points --------------------------------------------------------------------

    async def ensure(self, spec: TunnelSpec, now: float, *, shunt: bool = False) -> float:
        """Make sure a tunnel per `spec` is up; return its lease end (POSIX seconds).

        Args:
            spec: the tunnel wanted.
            now: the query's time; the lease runs to now + lease.
            shunt: drop traffic to the destination while negotiating, and keep dropping it if
                the setup fails (group private).

        Raises:
            ProvisioningError (TunnelTimeout, IkeDaemonUnreachable, TunnelRejected): no tunnel.
        """
        dest = spec.destination
        for _ in range(3):  # a concurrent setup may have been for another key: look again
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED and t.spec == spec:
                return self._extend(t, now)
            failed = self._b.failed.get(dest)
            if failed is not None and failed.until > now:
                if shunt:
                    await self.shunt([dest], now)
                raise failed.error
            running = self._b.inflight.get(dest)
            if running is None:
                task = asyncio.create_task(self._setup(spec, now, shunt))
                self._b.inflight[dest] = (spec, task)
                task.add_done_callback(functools.partial(self._forget, dest))
                return await asyncio.shield(task)
            self.counters.coalesced += 1
            if running[0] == spec:
                if shunt and dest not in self._b.shunts:
                    await self.shunt([dest], now)
                return await asyncio.shield(running[1])  # its result, or its error
            with contextlib.suppress(ProvisioningError):
                await asyncio.shield(running[1])  # another key's setup: wait, then look again
        raise TunnelRejected(f"tunnel to {dest}: setup kept changing under us")

    async def shunt(self, destinations: tuple[Address, ...] | list[Address], now: float) -> None:
        """Install (or extend) drop shunts for `destinations` (private without a key, block).

        A destination with an INSTALLED tunnel is skipped: its traffic already goes only
        through an authenticated SA, and our BLOCK policy outranks charon's IPsec policies, so
        a shunt would cut that tunnel. (Found by tests/integration/test_issue4_daemon.py: a
        refused lookup of *another* name with the same address, e.g. host.unsigned.test -> bob's
        address, blackholed the working tunnel to bob.)
        """
        if await self._install_shunts(destinations, now):
            await self._persist()

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

    async def expire(self, now: float) -> float | None:
        """Tear down tunnels and shunts whose lease + grace has passed.

        Returns the next time `expire` has work to do, or None.
        """
        grace = self.config.grace
        changed = self._state is not None and self._state.pending
        for dest, t in list(self._b.tunnels.items()):
            if (t.expires_at + grace <= now and dest not in self._b.inflight
                    and dest not in self._b.pinned):
                log.info("lease of tunnel %s to %s ended: tearing down", t.spec.name, dest)
                changed = True
                del self._b.tunnels[dest]
                self.counters.teardowns += 1
                await self._quietly(RemoveTunnel(t.spec.name))
        for dest, until in list(self._b.shunts.items()):
            if until + grace <= now:
                changed = True
                del self._b.shunts[dest]
                await self._quietly(RemoveShunt(dest))
        self._b.failed = {d: f for d, f in self._b.failed.items() if f.until > now}
        self._count()
        if changed:
            await self._persist()
        ends = [t.expires_at + grace for d, t in self._b.tunnels.items()
                if d not in self._b.pinned]
        ends += [u + grace for u in self._b.shunts.values()]
        return min(ends) if ends else None

    def pin(self, destination: Address, pinned: bool = True) -> None:
        """Pinned tunnels (autosp endpoints) are never torn down by `expire`; only `release`
        (or unpinning and a lease that then ends) removes them. Kept in the state file."""
        if pinned:
            self._b.pinned.add(destination)
        else:
            self._b.pinned.discard(destination)
        self._save()

    async def release(self, destination: Address, now: float) -> None:
        """Tear the tunnel to `destination` down now (autosp remove, a moved endpoint).

        Idempotent; waits for a setup in flight first. `now` is for symmetry (and the log).
        """
        running = self._b.inflight.get(destination)
        if running is not None:
            with contextlib.suppress(ProvisioningError):
                await asyncio.shield(running[1])
        self._b.pinned.discard(destination)
        t = self._b.tunnels.pop(destination, None)
        if t is not None:
            log.info("releasing tunnel %s to %s at %.0f", t.spec.name, destination, now)
            self.counters.teardowns += 1
            await self._quietly(RemoveTunnel(t.spec.name))
        self._count()
        await self._persist()

    async def reconcile(self, now: float) -> None:
        """At start-up: restore the wanted state from the state file, remove our strays."""
        tunnels, shunts = self._load(now)
        installed = await self.backend.installed()
        wanted = {PolicyKey.tunnel(s.name) for s, _ in tunnels}
        wanted |= {PolicyKey.shunt(d) for d in shunts}
        for stray in sorted(installed - wanted, key=lambda k: (k.kind.value, k.ident)):
            log.info("reconcile: removing stray %s %s", stray.kind.value, stray.ident)
            if stray.kind is ItemKind.TUNNEL:
                await self._quietly(RemoveTunnel(stray.ident))
            else:
                await self._quietly(RemoveShunt(ipaddress.ip_address(stray.ident)))
        for dest, until in shunts.items():
            await self._quietly(InstallShunt(dest))
            self._b.shunts[dest] = until
        for spec, until in tunnels:
            try:
                await self.ensure(spec, now)
            except ProvisioningError as exc:
                log.warning("reconcile: tunnel %s to %s not restored: %s", spec.name,
                            spec.destination, exc)
                continue
            t = self._b.tunnels[spec.destination]
            t.expires_at = t.saved_expires_at = until  # the lease it had, not a fresh one
        self._count()
        await self._persist()

    async def close(self) -> None:
        """Wait for in-flight setups (used by tests and shutdown; tunnels stay up)."""
        tasks = [task for _, task in self._b.inflight.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._state is not None:  # lease extensions and pins not yet on disk
            with contextlib.suppress(OSError):
                await self._state.close()

    # -- internals ---------------------------------------------------------------------------

    def _forget(self, dest: Address, _task: asyncio.Task[float]) -> None:
        self._b.inflight.pop(dest, None)

    def _extend(self, t: _Tunnel, now: float) -> float:
        t.expires_at = max(t.expires_at, now + self.config.lease)
        if t.expires_at - t.saved_expires_at > self.config.lease / 4:
            self._save()  # a lease moved far enough that a restart should know
        return t.expires_at

    async def _setup(self, spec: TunnelSpec, now: float, shunt: bool) -> float:
        dest, cfg = spec.destination, self.config
        old = self._b.tunnels.get(dest)
        if old is not None and old.state is not TunnelState.INSTALLED:
            old = None
        if old is not None:
            # Rule 4, make before break: the old tunnel carries traffic until the new one is up
            # (so no negotiating shunt either: it would block the working tunnel).
            log.info("key or gateway of %s changed: replacing tunnel %s", dest, old.spec.name)
        elif shunt and dest not in self._b.shunts:
            await self._install_shunts([dest], now)  # not waited for on disk: see Rule 5
        same_name = old is not None and old.spec.name == spec.name
        if old is None:
            self._b.tunnels[dest] = _Tunnel(spec, TunnelState.PENDING, now + cfg.lease)
        try:
            # The backend bounds its own wait (it passes the timeout to the daemon); this outer
            # bound is the safety net for a backend that hangs.
            left = cfg.timeout
            if self._slots.locked():  # queued behind max_setups others: it gets what is left
                loop = asyncio.get_running_loop()
                started = loop.time()
                async with asyncio.timeout(cfg.timeout):
                    await self._slots.acquire()
                left = max(0.1, cfg.timeout - (loop.time() - started))
            else:
                await self._slots.acquire()  # free: returns at once
            try:
                async with asyncio.timeout(left + 0.5):
                    await self.backend.apply(InstallTunnel(spec, left, replaces=same_name))
            finally:
                self._slots.release()
        except (ProvisioningError, TimeoutError) as exc:
            if old is not None:
                return await self._replacement_failed(old, spec, now, exc)
            return await self._failed(spec, now, exc)
        if old is not None:
            self.counters.replacements += 1
            if not same_name:
                await self._quietly(RemoveTunnel(old.spec.name))
        expires = max(now + cfg.lease, old.expires_at if old is not None else 0.0)
        self._b.tunnels[dest] = _Tunnel(spec, TunnelState.INSTALLED, expires)
        self.counters.setups += 1
        if dest in self._b.shunts:
            del self._b.shunts[dest]
            await self._quietly(RemoveShunt(dest))
        self._b.failed.pop(dest, None)
        self._count()
        await self._persist()  # on disk before anyone is told the tunnel is up
        return expires

    async def _replacement_failed(self, old: _Tunnel, spec: TunnelSpec, now: float,
                                  exc: ProvisioningError | TimeoutError) -> float:
        """The new key failed: keep the old tunnel (and its configuration) as it was."""
        error = exc if isinstance(exc, ProvisioningError) else TunnelTimeout(
            f"tunnel to {spec.destination}: no CHILD_SA within {self.config.timeout:g} s")
        self.counters.failures += 1
        log.warning("replacement of %s failed, old tunnel kept: %s", old.spec.name, error)
        if old.spec.name == spec.name:
            await self._quietly(InstallTunnel(old.spec, self.config.timeout))  # old config back
        else:
            await self._quietly(RemoveTunnel(spec.name))
        self._b.tunnels[spec.destination] = old
        raise error

    async def _failed(self, spec: TunnelSpec, now: float,
                      exc: ProvisioningError | TimeoutError) -> float:
        dest = spec.destination
        self._b.tunnels.pop(dest, None)
        error = exc if isinstance(exc, ProvisioningError) else TunnelTimeout(
            f"tunnel to {dest}: no CHILD_SA within {self.config.timeout:g} s")
        self.counters.failures += 1
        log.warning("tunnel %s to %s failed: %s", spec.name, dest, error)
        if dest in self._b.pinned:
            # Pinned (autosp): the half-open IKE_SA goes, the conn stays loaded with its trap,
            # PENDING in our books. It is what lets the peer initiate to us meanwhile, so two
            # hosts that pin each other come up whichever starts first; `release` removes it.
            await self._quietly(RemoveTunnel(spec.name, keep_conn=True))
            self._b.tunnels[dest] = _Tunnel(spec, TunnelState.PENDING, now + self.config.lease)
        else:
            await self._quietly(RemoveTunnel(spec.name))  # terminate the half-open IKE_SA too
        if self.config.failure_hold > 0:
            self._b.failed[dest] = _Failure(now + self.config.failure_hold, error)
        self._count()
        await self._persist()
        raise error

    async def _quietly(self, intent: Intent) -> None:
        """Apply a cleanup intent; a failure is logged (the next reconcile retries it)."""
        try:
            await self.backend.apply(intent)
        except ProvisioningError as exc:
            log.warning("%s failed: %s", type(intent).__name__, exc)

    def _count(self) -> None:
        self.counters.active = sum(
            1 for t in self._b.tunnels.values() if t.state is TunnelState.INSTALLED)
        self.counters.shunts = len(self._b.shunts)

    # -- state file (Rule 5; the writing is resolver/statefile.py's) ------------------------

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

    def _snapshot(self) -> Encode:
        """The wanted state as values (cheap, on the loop); serialized on the file's thread."""
        tunnels = [t for t in self._b.tunnels.values() if t.state is TunnelState.INSTALLED]
        for t in tunnels:
            t.saved_expires_at = t.expires_at  # what this write (and `_extend`) goes by
        snap = _Snapshot(
            tunnels=tuple((t.spec, t.expires_at, t.spec.destination in self._b.pinned)
                          for t in tunnels),
            shunts=tuple(self._b.shunts.items()))
        return functools.partial(_dump, snap)

    def _load(self, now: float) -> tuple[list[tuple[TunnelSpec, float]], dict[Address, float]]:
        if self._state is None:
            return [], {}
        try:
            saved = self._state.load(_parse)
        except StateCorrupt as exc:
            # A corrupt state file must not keep the resolver down: start from nothing, and
            # reconcile removes every stray we find (fail closed: no tunnel, no clear answer).
            log.error("%s: starting empty", exc)
            return [], {}
        if saved is None:
            return [], {}
        self._b.pinned |= saved.pinned
        grace = self.config.grace
        tunnels = [(s, u) for s, u in saved.tunnels
                   if u + grace > now or s.destination in saved.pinned]
        return tunnels, {d: u for d, u in saved.shunts.items() if u + grace > now}


# --- the state file's document -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Snapshot:
    tunnels: tuple[tuple[TunnelSpec, float, bool], ...]  # spec, lease end, pinned
    shunts: tuple[tuple[Address, float], ...]


@dataclass(frozen=True, slots=True)
class _Saved:
    tunnels: list[tuple[TunnelSpec, float]]  # spec, lease end
    pinned: set[Address]
    shunts: dict[Address, float]


def _dump(snap: _Snapshot) -> bytes:
    """The state file's bytes (runs on the state file's thread)."""
    doc = {
        "version": 1,
        "tunnels": [spec.to_json() | {"expires_at": exp, "pinned": pinned}
                    for spec, exp, pinned in snap.tunnels],
        "shunts": [{"destination": str(d), "expires_at": u} for d, u in snap.shunts],
    }
    # No indent: with one, json falls back to its pure-Python encoder.
    return json.dumps(doc, sort_keys=True).encode()


def _parse(data: bytes) -> _Saved:
    """Raises ValueError for anything but a document `_dump` wrote."""
    try:
        doc = json.loads(data)
        return _Saved(
            tunnels=[(TunnelSpec.from_json(e), float(e["expires_at"])) for e in doc["tunnels"]],
            pinned={ipaddress.ip_address(e["destination"]) for e in doc["tunnels"]
                    if e.get("pinned") is True},
            shunts={ipaddress.ip_address(e["destination"]): float(e["expires_at"])
                    for e in doc["shunts"]})
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a provisioning state document: {exc!r}") from None
