"""The Provisioner at start-up: load the state file, reconcile with what is installed.

Part of the Provisioner (its Rules are in resolver/provision.py): Rule 5 (restore the wanted
state, remove our strays, so `kill -9` and a restart converge) and Rule 8 (state that cannot be
trusted never removes a tunnel: adopt what is held; an IKE daemon missing at start-up removes
nothing and makes lookups fail fast until it appears).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from resolver.errors import IkeDaemonUnreachable, ProvisioningError, StateCorrupt
from resolver.provisioning.books import (
    ADOPTED_LEASE,
    IKE_RETRY,
    Address,
    Loaded,
    Tunnel,
    TunnelState,
    log,
)
from resolver.provisioning.setup import ProvisionerSetups
from resolver.tunnels.intents import (
    InstallShunt,
    ItemKind,
    PolicyKey,
    RemoveFloor,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
)
from resolver.tunnels.statedoc import parse

T = TypeVar("T")

BATCH: Final = 256  # shunts and strays handled at once (the XFRM backend batches them)


async def _each(items: Sequence[T], fn: Callable[..., Awaitable[None]], limit: int) -> None:
    """`fn(*item)` (or `fn(item)`) for every item, at most `limit` at a time, in order of
    start. Thousands of entries at start-up: one after the other, each waiting for its own
    state write, 10,000 tunnels took minutes; all at once, they would queue for the setup
    slots and time out."""
    it = iter(items)

    async def runner() -> None:
        for item in it:
            await (fn(*item) if isinstance(item, tuple) else fn(item))

    await asyncio.gather(*(runner() for _ in range(min(limit, len(items)))))


class ProvisionerReconcile(ProvisionerSetups):
    """`reconcile` and the state it starts from."""

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
        for name, until in loaded.adopted.items():
            if PolicyKey.tunnel(name) in installed:
                self._b.adopted[name] = until
        if not loaded.trusted:
            self._adopt(installed, shunts, now)
        wanted = {PolicyKey.tunnel(s.name) for s, _ in tunnels}
        wanted |= {PolicyKey.tunnel(n) for n in self._b.adopted}
        wanted |= {PolicyKey.shunt(d) for d in shunts}
        wanted |= {PolicyKey.floor(s.destination) for s, _ in tunnels if self._must_drop(s)}
        if not loaded.trusted:  # Rule 9: which adopted conn a floor is for is unknown
            wanted |= {k for k in installed if k.kind is ItemKind.FLOOR}
        loop = asyncio.get_running_loop()
        started = loop.time()
        strays = sorted(installed - wanted, key=lambda k: (k.kind.value, k.ident))
        for stray in strays:
            log.info("reconcile: removing stray %s %s", stray.kind.value, stray.ident)
        await _each(strays, self._remove_stray, BATCH)
        restore = []
        for dest, until in shunts.items():
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED:
                continue  # up since (a late reconcile, Rule 8): see `shunt`
            restore.append((dest, until))
        await _each(restore, self._restore_shunt, BATCH)
        wanted_tunnels = []
        for spec, until in tunnels:
            t = self._b.tunnels.get(spec.destination)
            if t is not None and not (t.state is TunnelState.DOWN and t.spec == spec):
                continue  # a lookup was quicker (a late reconcile, Rule 8): it has the newer key
            # DOWN until charon says otherwise: a failure keeps it wanted (Rule 6)
            self._b.tunnels[spec.destination] = Tunnel(
                spec, TunnelState.DOWN, until, private=self._must_drop(spec),
                floored=PolicyKey.floor(spec.destination) in installed)
            wanted_tunnels.append((spec, until))
        # max_setups at a time, each with its whole timeout: none waits in the setup queue
        await _each(wanted_tunnels, functools.partial(self._restore, now),
                    self.config.max_setups)
        log.info("reconcile: %d of %d tunnel(s) up, %d drop shunt(s), %d stray(s) removed, "
                 "in %.2f s", self.counters.active, len(wanted_tunnels), len(restore),
                 len(strays), loop.time() - started)
        if self._state is not None:  # what the file held and the books no longer do
            self._state.mark_loaded(self._b.holds)
        await self._persist()

    async def _remove_stray(self, stray: PolicyKey) -> None:
        if stray.kind is ItemKind.TUNNEL:
            await self._quietly(RemoveTunnel(stray.ident))
        elif stray.kind is ItemKind.FLOOR:
            await self._quietly(RemoveFloor(ipaddress.ip_address(stray.ident)))
        else:
            await self._quietly(RemoveShunt(ipaddress.ip_address(stray.ident)))

    async def _restore_shunt(self, dest: Address, until: float) -> None:
        await self._quietly(InstallShunt(dest))
        self._b.shunts[dest] = until

    async def _restore(self, now: float, spec: TunnelSpec, until: float) -> None:
        """Set a tunnel of the state file up again (it is DOWN in the books until then)."""
        try:
            await self.ensure(spec, now)
        except ProvisioningError as exc:
            log.warning("reconcile: tunnel %s to %s not restored (kept as down, retried): "
                        "%s", spec.name, spec.destination, exc)
            return
        t = self._b.tunnels[spec.destination]
        t.expires_at = until  # the lease it had, not a fresh one
        self._b.touch(spec.destination)

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

    async def _not_connected(self, loaded: Loaded, now: float,
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
                self._b.tunnels[spec.destination] = Tunnel(
                    spec, TunnelState.DOWN, until, private=self._must_drop(spec))
        await self._shunt_now([d for d, t in self._b.tunnels.items()
                               if t.state is TunnelState.DOWN and self._private(t)], now)

    def _load(self, now: float) -> Loaded:
        if self._state is None:
            return Loaded([], {}, {})
        try:
            saved = self._state.load(parse)
        except StateCorrupt as exc:
            # Never a reason to remove tunnels (Rule 8): reconcile adopts what it finds.
            log.error("%s; adopting the tunnels and shunts of ours found", exc)
            return Loaded([], {}, {}, trusted=False)
        if saved is None:  # first start, or the operator removed it: nothing is wanted
            return Loaded([], {}, {})
        self._b.pinned |= saved.pinned
        grace = self.config.grace
        tunnels = [(s, u) for s, u in saved.tunnels
                   if u + grace > now or s.destination in saved.pinned]
        return Loaded(tunnels, {d: u for d, u in saved.shunts.items() if u + grace > now},
                       {n: u for n, u in saved.adopted.items() if u + grace > now})
