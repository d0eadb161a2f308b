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
          pinned tunnel whose setup failed keeps its conn loaded and is DOWN (Rule 6): the peer
          may initiate to us through it (issue 11: two hosts that pin each other).
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
          A write that fails (disk full, read-only) undoes what it was to record: the tunnel
          is removed again (its drop shunt, if it had one, stays) and the lookup fails with
          StateUnrecorded; nothing is answered over an SA a restart would not know about.
  Rule 6: the books are checked against the IKE daemon, not trusted (resolver/watch.py drives
          this). A tunnel charon no longer holds (peer deleted it, charon stopped or restarted)
          is DOWN: still wanted until its lease ends, never reported up (so never answered),
          its destination shunted at once if it is private, the answer caches emptied (the
          `on_lost` hooks), and it is brought back by `repair`. A setup that began before
          charon was lost does not count as up (`_epoch`).
  Rule 7: one address, one key. While a tunnel to an address is leased (or pinned), only the
          name that made it may re-key it (Rule 4); another name with the *same* key is answered
          over it, another name with another key gets AddressBound (SERVFAIL with an EDE),
          and the tunnel is not touched. A zone that can publish any address cannot so take
          over a live tunnel to it. After the lease ends, the next name to look it up binds it.
  Rule 8: state that cannot be trusted never removes a tunnel. A corrupt state file (kept as
          `.bad` by statefile.py) makes `reconcile` *adopt* what charon and XFRM hold under our
          names instead of removing it as strays: adopted conns get a short lease
          (ADOPTED_LEASE), are set up again under the key in DNS by their next lookup (its drop
          shunt covers a private destination meanwhile), and are torn down like any other
          when unused. An IKE daemon that cannot be reached at start-up removes nothing
          either: `ike_ready` stays False, lookups that need a tunnel fail at once
          (IkeDaemonUnreachable: SERVFAIL EDE 14), the tunnels of the state file are DOWN
          (Rule 6: wanted, shunted if private, kept in the file), and `reconcile` runs again
          when the watch sees charon (`connect_later` retries besides, for a backend without
          a watch).

Time: every entry point takes `now` (POSIX seconds, the same clock as RRSIG validity) because
leases must survive a restart in the state file. Real waiting (the setup timeout) uses asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from resolver.errors import (
    AddressBound,
    IkeDaemonUnreachable,
    ProvisioningError,
    StateCorrupt,
    StateUnrecorded,
    StateWriteFailed,
    TunnelRejected,
    TunnelTimeout,
)
from resolver.logevent import log_event
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
from resolver.tunnels.statedoc import Snapshot, dump, parse

log = logging.getLogger(__name__)

Address = IPv4Address | IPv6Address

ADOPTED_LEASE: Final = 60.0  # seconds (at most [provision] lease) an adopted conn lives unused
IKE_RETRY: Final = 2.0  # seconds between connection attempts to an IKE daemon absent at start-up

# --- the provisioner ---------------------------------------------------------------------------


class TunnelState(enum.Enum):
    PENDING = "pending"
    INSTALLED = "installed"
    DOWN = "down"  # wanted (leased or pinned), but the IKE daemon does not hold it (Rule 6)


@dataclass(slots=True)
class _Tunnel:
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
class _Failure:
    until: float
    error: ProvisioningError


@dataclass(slots=True)
class _Books:
    tunnels: dict[Address, _Tunnel] = field(default_factory=dict)
    shunts: dict[Address, float] = field(default_factory=dict)
    failed: dict[Address, _Failure] = field(default_factory=dict)
    pinned: set[Address] = field(default_factory=set)
    adopted: dict[str, float] = field(default_factory=dict)  # conn name -> lease end (Rule 8)
    inflight: dict[Address, tuple[TunnelSpec, asyncio.Task[float]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What `reconcile` starts from; `trusted` False: the state file was corrupt (Rule 8)."""

    tunnels: list[tuple[TunnelSpec, float]]
    shunts: dict[Address, float]
    adopted: dict[str, float]
    trusted: bool = True


class Provisioner:
    """Leases, coalescing, state and reconcile on top of one ProvisioningBackend."""

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
        self._b = _Books()
        path = self.config.state_file
        self._state = StateFile(path, self._snapshot) if path is not None else None
        self.ike_ready = True  # False: the IKE daemon was unreachable at start-up (Rule 8)
        self._pending: _Loaded | None = None  # loaded, not reconciled yet
        self._reconciled = False
        self._reconciling = asyncio.Lock()

    # -- queries ---------------------------------------------------------------------------

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
        if not self.ike_ready:
            raise IkeDaemonUnreachable(f"not ready: not connected since start-up, retrying "
                                       f"every {IKE_RETRY:g} s")
        for _ in range(3):  # a concurrent setup may have been for another key: look again
            t = self._b.tunnels.get(dest)
            if t is not None and t.spec.key.owner != spec.key.owner and self._bound(t, now):
                spec = self._bound_spec(t, spec)  # Rule 7
            running = self._b.inflight.get(dest)
            # A setup of this very spec still in flight is still writing its state (Rule 5):
            # join it rather than answer over a tunnel that may yet be undone.
            if t is not None and t.state is TunnelState.INSTALLED and t.spec == spec \
                    and (running is None or running[0] != spec):
                t.private = t.private or shunt
                return self._extend(t, now)
            failed = self._b.failed.get(dest)
            if failed is not None and failed.until > now:
                if shunt:
                    await self.shunt([dest], now)
                raise failed.error
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
            await self._persist_quietly()  # in place either way; SERVFAIL does not wait on it

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
        for name, until in list(self._b.adopted.items()):
            if until + grace <= now:
                log.info("adopted tunnel %s unused: tearing down", name)
                changed = True
                del self._b.adopted[name]
                await self._quietly(RemoveTunnel(name))
        self._b.failed = {d: f for d, f in self._b.failed.items() if f.until > now}
        self._count()
        if changed:
            await self._persist_quietly()  # a restart filters ended leases anyway
        ends = [t.expires_at + grace for d, t in self._b.tunnels.items()
                if d not in self._b.pinned]
        ends += [u + grace for u in self._b.shunts.values()]
        ends += [u + grace for u in self._b.adopted.values()]
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
        """At start-up: restore the wanted state from the state file, remove our strays.

        Without a trustworthy state file, adopt what is installed instead; with the IKE daemon
        unreachable, remove nothing and wait for it (Rule 8). Once it has run, a later call
        (the watch and `connect_later` both try when charon appears) does nothing.
        """
        async with self._reconciling:
            if not self._reconciled:
                await self._reconcile(now)

    async def _reconcile(self, now: float) -> None:
        loaded = self._pending = self._pending or self._load(now)
        try:
            installed = await self.backend.installed()
        except IkeDaemonUnreachable as exc:
            await self._not_connected(loaded, now, exc)
            return
        self._pending, self._reconciled = None, True
        if not self.ike_ready:
            log.warning("IKE daemon connected (%s): reconciling", self.config.vici_socket)
            self.ike_ready = True
        tunnels, shunts = loaded.tunnels, dict(loaded.shunts)
        for dest, until in self._b.shunts.items():  # added while the IKE daemon was away
            shunts[dest] = max(until, shunts.get(dest, 0.0))
        self._b.adopted = {n: u for n, u in loaded.adopted.items()
                           if PolicyKey.tunnel(n) in installed}
        if not loaded.trusted:
            self._adopt(installed, shunts, now)
        wanted = {PolicyKey.tunnel(s.name) for s, _ in tunnels}
        wanted |= {PolicyKey.tunnel(n) for n in self._b.adopted}
        wanted |= {PolicyKey.shunt(d) for d in shunts}
        for stray in sorted(installed - wanted, key=lambda k: (k.kind.value, k.ident)):
            log.info("reconcile: removing stray %s %s", stray.kind.value, stray.ident)
            if stray.kind is ItemKind.TUNNEL:
                await self._quietly(RemoveTunnel(stray.ident))
            else:
                await self._quietly(RemoveShunt(ipaddress.ip_address(stray.ident)))
        for dest, until in shunts.items():
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED:
                continue  # up since (a late reconcile, Rule 8): see `shunt`
            await self._quietly(InstallShunt(dest))
            self._b.shunts[dest] = until
        for spec, until in tunnels:
            t = self._b.tunnels.get(spec.destination)
            if t is not None and not (t.state is TunnelState.DOWN and t.spec == spec):
                continue  # a lookup was quicker (a late reconcile, Rule 8): it has the newer key
            # DOWN until charon says otherwise: a failure keeps it wanted (Rule 6)
            self._b.tunnels[spec.destination] = _Tunnel(
                spec, TunnelState.DOWN, until, private=self._must_drop(spec))
            try:
                await self.ensure(spec, now)
            except ProvisioningError as exc:
                log.warning("reconcile: tunnel %s to %s not restored (kept as down, retried): "
                            "%s", spec.name, spec.destination, exc)
                continue
            t = self._b.tunnels[spec.destination]
            t.expires_at = t.saved_expires_at = until  # the lease it had, not a fresh one
        self._count()
        await self._persist()

    # -- no trustworthy state, no IKE daemon (Rule 8) -----------------------------------------

    def _adopt(self, installed: frozenset[PolicyKey], shunts: dict[Address, float],
               now: float) -> None:
        """Make what is installed under our names wanted, with a short lease."""
        until = now + min(self.config.lease, ADOPTED_LEASE)
        names = [k.ident for k in installed if k.kind is ItemKind.TUNNEL]
        for name in names:
            self._b.adopted[name] = until
        found = [ipaddress.ip_address(k.ident) for k in installed if k.kind is ItemKind.SHUNT]
        for dest in found:
            shunts[dest] = max(shunts.get(dest, 0.0), until)
        log.warning("no trustworthy state: adopting %d tunnel(s) and %d drop shunt(s) of ours "
                    "for %.0f s (a lookup sets a tunnel up again under the key in DNS; unused "
                    "ones expire)", len(names), len(found), until - now)

    async def _not_connected(self, loaded: _Loaded, now: float,
                             exc: IkeDaemonUnreachable) -> None:
        """Serve without the IKE daemon: the state file's shunts go in (XFRM needs no charon),
        its tunnels are DOWN (wanted; private ones dropped), nothing is removed, and `ensure`
        fails at once until a reconcile succeeds."""
        if self.ike_ready:
            log.warning("IKE daemon not connected (%s): serving DNS; lookups that need a tunnel "
                        "get SERVFAIL (EDE 14) until it is; retrying every %g s",
                        exc, IKE_RETRY)
            self.ike_ready = False
        for dest, until in loaded.shunts.items():
            if dest not in self._b.shunts:
                await self._quietly(InstallShunt(dest))
                self._b.shunts[dest] = until
        for spec, until in loaded.tunnels:
            if spec.destination not in self._b.tunnels:
                self._b.tunnels[spec.destination] = _Tunnel(
                    spec, TunnelState.DOWN, until, private=self._must_drop(spec))
        await self._shunt_now([d for d, t in self._b.tunnels.items()
                               if t.state is TunnelState.DOWN and self._private(t)], now)
        self._count()

    async def connect_later(self, clock: Callable[[], float]) -> None:
        """While the IKE daemon is unreachable since start-up: reconcile every IKE_RETRY
        seconds until it answers. The watch (resolver/watch.py) reconciles as soon as its
        session connects; this loop is for a backend without one and for a reconcile that
        failed all the same."""
        while not self.ike_ready:
            await asyncio.sleep(IKE_RETRY)
            try:
                await self.reconcile(clock())
            except (ProvisioningError, OSError) as exc:
                log.warning("reconcile after the IKE daemon came back failed: %s", exc)

    # -- what the watch tells us (Rule 6; resolver/watch.py) -----------------------------------

    def held_names(self) -> dict[str, Address]:
        """Connection name -> destination of the tunnels we count as up."""
        return {t.spec.name: d for d, t in self._b.tunnels.items()
                if t.state is TunnelState.INSTALLED}

    async def lost(self, names: Iterable[str], why: str, now: float) -> list[Address]:
        """The IKE daemon no longer holds these tunnels: DOWN, shunted if private, caches
        emptied, one log line each. Returns the destinations that went down."""
        held = self.held_names()
        gone = [held[n] for n in names if n in held]
        if not gone:
            return []
        for dest in gone:
            t = self._b.tunnels[dest]
            t.state = TunnelState.DOWN
            log.warning("tunnel to %s (%s) went down: %s%s",
                        t.spec.key.owner.to_text(omit_final_dot=True), dest, why,
                        "; dropping its traffic until it is back" if self._private(t) else "")
        self.counters.lost += len(gone)
        for hook in self.on_lost:  # before any await: no cached answer for them from now on
            hook()
        await self._shunt_now([d for d in gone if self._private(self._b.tunnels[d])], now)
        self._count()
        self._save()
        return gone

    async def suspect(self, names: Iterable[str], now: float) -> list[Address]:
        """Charon reported these tunnels down; not checked yet (resolver/watch.py asks charon
        next). Their private destinations are shunted *now*, while we ask: with the SA gone,
        a packet may otherwise leave in clear. Returns what was shunted here, for `cleared`."""
        held = self.held_names()
        dests = [held[n] for n in names if n in held]
        return await self._shunt_now([d for d in dests if self._private(self._b.tunnels[d])],
                                     now)

    async def cleared(self, dests: Iterable[Address]) -> None:
        """Charon still holds these tunnels after all: take `suspect`'s shunts out again."""
        for dest in dests:
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED and dest in self._b.shunts:
                del self._b.shunts[dest]
                await self._quietly(RemoveShunt(dest))
        self._count()

    async def daemon_lost(self, why: str, now: float) -> list[Address]:
        """The IKE daemon's connection closed (stopped, crashed, restarted): every tunnel
        counts as lost, and setups in flight will not count as up (`_epoch`)."""
        self._epoch += 1
        held = self.held_names()
        log.error("charon connection lost: %s; every tunnel counts as down until charon holds "
                  "it again (%d were still up)", why, len(held))
        return await self.lost(held, "charon connection lost", now)

    def daemon_back(self) -> None:
        """The IKE daemon is reachable again: failures held only because it was not are
        forgotten, so lookups and repairs try at once."""
        self._b.failed = {d: f for d, f in self._b.failed.items()
                          if not isinstance(f.error, IkeDaemonUnreachable)}

    def wanted_down(self, now: float) -> dict[Address, str]:
        """Destination -> connection name of the tunnels DOWN and still wanted (leased or
        pinned), with no setup in flight: what `repair` is for."""
        return {d: t.spec.name for d, t in self._b.tunnels.items()
                if t.state is TunnelState.DOWN and d not in self._b.inflight
                and (d in self._b.pinned or t.expires_at + self.config.grace > now)}

    async def repair(self, dest: Address, now: float) -> bool:
        """Bring a DOWN tunnel back (no failure hold: the watch paces retries). True if up."""
        t = self._b.tunnels.get(dest)
        if t is None or t.state is not TunnelState.DOWN:
            return t is not None and t.state is TunnelState.INSTALLED
        self._b.failed.pop(dest, None)
        try:
            await self.ensure(t.spec, now, shunt=self._private(t))
        except ProvisioningError as exc:
            log.info("tunnel to %s (%s) not back yet: %s",
                     t.spec.key.owner.to_text(omit_final_dot=True), dest, exc)
            return False
        return True

    async def close(self) -> None:
        """Wait for in-flight setups (used by tests and shutdown; tunnels stay up)."""
        tasks = [task for _, task in self._b.inflight.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._state is not None:  # lease extensions and pins not yet on disk
            with contextlib.suppress(OSError):
                await self._state.close()

    # -- internals ---------------------------------------------------------------------------

    def _bound(self, t: _Tunnel, now: float) -> bool:
        """Whether `t` binds its destination to its key (Rule 7): leased or pinned."""
        return t.spec.destination in self._b.pinned or t.expires_at > now

    def _bound_spec(self, t: _Tunnel, spec: TunnelSpec) -> TunnelSpec:
        """Rule 7 for a lookup of another name than the one `t` was made for: with the same
        key it rides `t` (its spec); with another key it is refused."""
        if t.spec.key.algorithm == spec.key.algorithm and \
                t.spec.key.public_key == spec.key.public_key:
            return t.spec
        self.counters.bound += 1
        owner = t.spec.key.owner.to_text(omit_final_dot=True)
        log.warning("%s publishes %s with another key than %s, whose live tunnel it has: "
                    "refused", spec.key.owner.to_text(omit_final_dot=True),
                    spec.destination, owner)
        raise AddressBound(f"{spec.destination} is bound to the key of {owner} (live tunnel)")

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

    def _private(self, t: _Tunnel) -> bool:
        return t.private or self._must_drop(t.spec)

    def _must_drop(self, spec: TunnelSpec) -> bool:
        return self.must_drop is not None and self.must_drop(spec)

    def _forget(self, dest: Address, _task: asyncio.Task[float]) -> None:
        self._b.inflight.pop(dest, None)

    def _extend(self, t: _Tunnel, now: float) -> float:
        t.expires_at = max(t.expires_at, now + self.config.lease)
        if t.expires_at - t.saved_expires_at > self.config.lease / 4:
            self._save()  # a lease moved far enough that a restart should know
        return t.expires_at

    async def _setup(self, spec: TunnelSpec, now: float, shunt: bool) -> float:
        dest, cfg = spec.destination, self.config
        epoch = self._epoch
        old = self._b.tunnels.get(dest)
        down = old if old is not None and old.state is TunnelState.DOWN else None
        if old is not None and old.state is not TunnelState.INSTALLED:
            old = None
        private = shunt or (down is not None and down.private)
        if old is not None:
            # Rule 4, make before break: the old tunnel carries traffic until the new one is up
            # (so no negotiating shunt either: it would block the working tunnel).
            log.info("key or gateway of %s changed: replacing tunnel %s", dest, old.spec.name)
        elif shunt and dest not in self._b.shunts:
            await self._install_shunts([dest], now)  # not waited for on disk: see Rule 5
        if old is None and self._b.adopted.pop(spec.name, None) is not None:
            # Rule 8: an adopted conn is set up again under the key DNS gives now, break before
            # make: charon keeps the IKE_SA of a conn loaded again unchanged, so there would be
            # no new SA to wait for, and one authenticated by an older key would pass as new.
            # A private destination's drop shunt covers the gap.
            log.info("adopted tunnel %s: setting it up again with the key in DNS", spec.name)
            await self._quietly(RemoveTunnel(spec.name))
        same_name = old is not None and old.spec.name == spec.name
        if old is None:
            self._b.tunnels[dest] = _Tunnel(spec, TunnelState.PENDING, now + cfg.lease,
                                            private=private)
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
            if self._epoch != epoch:  # Rule 6: charon was lost meanwhile; this proves nothing
                raise IkeDaemonUnreachable(f"tunnel to {dest}: IKE daemon lost during setup")
        except (ProvisioningError, TimeoutError) as exc:
            if old is not None:
                return await self._replacement_failed(old, spec, now, exc)
            return await self._failed(spec, now, exc, down)
        expires = max(now + cfg.lease, old.expires_at if old is not None else 0.0)
        self._b.tunnels[dest] = _Tunnel(spec, TunnelState.INSTALLED, expires,
                                        private=private or (old is not None and old.private))
        shunted = self._b.shunts.pop(dest, None)  # out of the books; in the kernel until saved
        try:
            await self._persist()  # on disk before anyone is told the tunnel is up
        except StateWriteFailed as exc:
            return await self._unrecorded(spec, old, down, shunted, now, exc)
        if old is not None:  # break only what the file no longer holds
            self.counters.replacements += 1
            if not same_name:
                await self._quietly(RemoveTunnel(old.spec.name))
        if down is not None and down.spec.name != spec.name:  # its lease ended; another
            await self._quietly(RemoveTunnel(down.spec.name))  # name bound the address since
        elif down is not None:
            log.info("tunnel to %s (%s) is back", spec.key.owner.to_text(omit_final_dot=True),
                     dest)
        self.counters.setups += 1
        if shunted is not None:
            await self._quietly(RemoveShunt(dest))
        self._b.failed.pop(dest, None)
        self._count()
        log_event(log, logging.INFO, "tunnel-up", name=spec.name, peer=dest)
        return expires

    async def _unrecorded(self, spec: TunnelSpec, old: _Tunnel | None, down: _Tunnel | None,
                          shunted: float | None, now: float, exc: StateWriteFailed) -> float:
        """The tunnel is up but the state file could not record it: undo it (Rule 5).

        Its drop shunt (a private destination's) never left the kernel and goes back into
        the books; an old tunnel under another name was not broken yet and stays; a DOWN one
        stays wanted (Rule 6).
        """
        dest = spec.destination
        cause = exc.__cause__
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
        path = self._state.path if self._state is not None else None
        error = StateUnrecorded(f"{why} ({path})")
        self.counters.failures += 1
        log_event(log, logging.ERROR, "tunnel-unrecorded", name=spec.name, peer=dest,
                  reason=f"cannot record tunnel state: {error}", kept="no")
        self._b.tunnels.pop(dest, None)
        if old is not None and old.spec.name != spec.name:
            self._b.tunnels[dest] = old
        elif down is not None:
            self._b.tunnels[dest] = down
        await self._quietly(RemoveTunnel(spec.name))  # terminate + unload: no orphan SA
        if shunted is not None:
            self._b.shunts[dest] = shunted
        elif down is not None and self._private(down):
            await self._install_shunts([dest], now)
        if self.config.failure_hold > 0:
            self._b.failed[dest] = _Failure(now + self.config.failure_hold, error)
        self._count()
        raise error

    async def _replacement_failed(self, old: _Tunnel, spec: TunnelSpec, now: float,
                                  exc: ProvisioningError | TimeoutError) -> float:
        """The new key failed: keep the old tunnel (and its configuration) as it was."""
        error = exc if isinstance(exc, ProvisioningError) else TunnelTimeout(
            f"tunnel to {spec.destination}: no CHILD_SA within {self.config.timeout:g} s")
        self.counters.failures += 1
        log_event(log, logging.WARNING, "tunnel-replacement-failed", name=old.spec.name,
                  peer=spec.destination, reason=str(error), kept="old")
        if old.spec.name == spec.name:
            await self._quietly(InstallTunnel(old.spec, self.config.timeout))  # old config back
        else:
            await self._quietly(RemoveTunnel(spec.name))
        self._b.tunnels[spec.destination] = old
        raise error

    async def _failed(self, spec: TunnelSpec, now: float,
                      exc: ProvisioningError | TimeoutError, down: _Tunnel | None = None) -> float:
        dest = spec.destination
        pending = self._b.tunnels.pop(dest, None)
        if down is not None:  # lost earlier and still wanted: stays DOWN for the watch (Rule 6)
            self._b.tunnels[dest] = down
        error = exc if isinstance(exc, ProvisioningError) else TunnelTimeout(
            f"tunnel to {dest}: no CHILD_SA within {self.config.timeout:g} s")
        self.counters.failures += 1
        log_event(log, logging.WARNING, "tunnel-failed", name=spec.name, peer=dest,
                  reason=str(error))
        if dest in self._b.pinned and (down is None or down.spec.name == spec.name):
            # Pinned (autosp): the half-open IKE_SA goes, the conn stays loaded (trap) and the
            # tunnel is DOWN, so the watch repairs it, at once when charon reports it up. The
            # conn is what lets the peer initiate to us meanwhile: two hosts that pin each
            # other come up whichever starts first. `release` removes it.
            await self._quietly(RemoveTunnel(spec.name, keep_conn=True))
            self._b.tunnels[dest] = down or _Tunnel(
                spec, TunnelState.DOWN, now + self.config.lease,
                private=pending is not None and pending.private)
        else:
            await self._quietly(RemoveTunnel(spec.name))  # terminate the half-open IKE_SA too
        if down is not None and self._private(down):
            await self._install_shunts([dest], now)  # its conn (and trap) is gone now
        if self.config.failure_hold > 0:
            self._b.failed[dest] = _Failure(now + self.config.failure_hold, error)
        self._count()
        await self._persist_quietly()  # the answer is a failure either way
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
        self.counters.down = sum(
            1 for t in self._b.tunnels.values() if t.state is TunnelState.DOWN)
        self.counters.shunts = len(self._b.shunts)
        self.counters.adopted = len(self._b.adopted)

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

    def _load(self, now: float) -> _Loaded:
        if self._state is None:
            return _Loaded([], {}, {})
        try:
            saved = self._state.load(parse)
        except StateCorrupt as exc:
            # Never a reason to remove tunnels (Rule 8): reconcile adopts what it finds.
            log.error("%s; adopting the tunnels and shunts of ours found", exc)
            return _Loaded([], {}, {}, trusted=False)
        if saved is None:  # first start, or the operator removed it: nothing is wanted
            return _Loaded([], {}, {})
        self._b.pinned |= saved.pinned
        grace = self.config.grace
        tunnels = [(s, u) for s, u in saved.tunnels
                   if u + grace > now or s.destination in saved.pinned]
        return _Loaded(tunnels, {d: u for d, u in saved.shunts.items() if u + grace > now},
                       {n: u for n, u in saved.adopted.items() if u + grace > now})
