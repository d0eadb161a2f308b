"""The Provisioner: tunnels and shunts from decisions, with leases, coalescing and reconcile.

Theory of operation. The policy says *that* a destination needs a tunnel (`policy.Tunnel`) or a
drop shunt (`policy.Refuse.drop`); the `Provisioner` here turns that into intents
(resolver/tunnels/intents.py) for one `ProvisioningBackend` (resolver/tunnels/backend.py) and
keeps the books:

  Rule 1: one setup in flight per destination. Concurrent lookups of the same name (or of
          names sharing an address) await the same task; fifty lookups make one tunnel. At most
          `max_setups` setups run at once; the others wait their turn (at most
          `queue_timeout`), and the setup `timeout` starts with the turn: a burst is answered
          as fast as charon can make it, never refused for our own queue (issue 13).
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
  Rule 6: the books are checked against the IKE daemon, not trusted (resolver/provisioning/watch.py
  drives
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
  Rule 9: a private destination's tunnel has a floor (InstallFloor, once it is up, before its
          negotiating shunt goes): the kernel drops the destination's packets the instant the
          tunnel's own path is gone, before the watch (Rule 6) has heard of it; with
          kernel-libipsec the TUN route vanishes with charon, a few ms before the shunt lands.
          The floor never blocks the tunnel (the backend puts it below charon's route or
          policies) and lives as long as the tunnel is wanted: kept while it is DOWN, removed
          after the tunnel at its lease end or release (then nothing is wanted, as before;
          also when a reload has moved the destination out of `private` meanwhile), and
          reconcile removes floors no tunnel of the state file wants (all kept when the state
          is not trusted, Rule 8). A tunnel that becomes private while up (a reload, or a
          private name for the same address) is floored on its next lookup.

Time: every entry point takes `now` (POSIX seconds, the same clock as RRSIG validity) because
leases must survive a restart in the state file. Real waiting (the setup timeout) uses asyncio.

Where each part lives (one class, built up in layers, so each file holds one job):
  resolver/provisioning/books.py      the books, counters, queries, shunt helpers, state snapshot
  resolver/provisioning/setup.py      `ensure`, `shunt`, a setup and its failures (Rules 1-5, 7)
  resolver/provisioning/reconcile.py  start-up: load, adopt, reconcile (Rules 5, 8)
  resolver/provisioning/repair.py      what charon lost or still holds, repairs (Rule 6)
  here                             leases ending, pins, release, the retry, shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from resolver.errors import ProvisioningError
from resolver.provisioning.books import (
    ADOPTED_LEASE,
    IKE_RETRY,
    Address,
    Counters,
    Kind,
    TunnelState,
    log,
)
from resolver.provisioning.reconcile import ProvisionerReconcile
from resolver.provisioning.repair import ProvisionerWatch
from resolver.tunnels.intents import RemoveFloor, RemoveShunt, RemoveTunnel

__all__ = ["ADOPTED_LEASE", "IKE_RETRY", "Address", "Counters", "Provisioner", "TunnelState"]


class Provisioner(ProvisionerWatch, ProvisionerReconcile):
    """Leases, coalescing, state and reconcile on top of one ProvisioningBackend."""

    async def expire(self, now: float) -> float | None:
        """Tear down tunnels and shunts whose lease + grace has passed.

        Returns the next time `expire` has work to do, or None. Only leases that came due are
        looked at (`Deadlines`), so the timer costs nothing per tunnel that is not ending.
        """
        grace = self.config.grace
        changed = self._state is not None and self._state.pending
        b = self._b
        for kind, key in b.deadlines.due(now - grace):
            if kind is Kind.TUNNEL:
                assert not isinstance(key, str)
                t = b.tunnels.get(key)
                if t is None or key in b.pinned:
                    continue  # gone, or never ends (unpinning pushes it again)
                if t.expires_at + grace > now:
                    b.deadlines.push(t.expires_at, kind, key)  # extended meanwhile
                elif key in b.inflight:
                    b.deadlines.push(now - grace + 1.0, kind, key)  # look again in a second
                else:
                    log.info("lease of tunnel %s to %s ended: tearing down", t.spec.name, key)
                    changed = True
                    del b.tunnels[key]
                    self.counters.teardowns += 1
                    await self._quietly(RemoveTunnel(t.spec.name))
                    if t.floored or self._private(t):  # after the tunnel: no gap (Rule 9)
                        await self._quietly(RemoveFloor(key))
            elif kind is Kind.SHUNT:
                assert not isinstance(key, str)
                until = b.shunts.get(key)
                if until is not None and until + grace > now:
                    b.deadlines.push(until, kind, key)
                elif until is not None:
                    changed = True
                    del b.shunts[key]
                    await self._quietly(RemoveShunt(key))
            else:
                assert isinstance(key, str)
                until = b.adopted.get(key)
                if until is not None and until + grace > now:
                    b.deadlines.push(until, kind, key)
                elif until is not None:
                    log.info("adopted tunnel %s unused: tearing down", key)
                    changed = True
                    del b.adopted[key]
                    await self._quietly(RemoveTunnel(key))
        if b.failed:
            b.failed = {d: f for d, f in b.failed.items() if f.until > now}
        if changed:
            await self._persist_quietly()  # a restart filters ended leases anyway
        nxt = b.deadlines.next()
        return None if nxt is None else nxt + grace

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
            if t.floored or self._private(t):
                await self._quietly(RemoveFloor(destination))  # Rule 9
        await self._persist()

    async def connect_later(self, clock: Callable[[], float]) -> None:
        """While the IKE daemon is unreachable since start-up: reconcile every IKE_RETRY
        seconds until it answers. The watch (resolver/provisioning/watch.py) reconciles as soon as
        its
        session connects; this loop is for a backend without one and for a reconcile that
        failed all the same."""
        while not self.ike_ready:
            await asyncio.sleep(IKE_RETRY)
            try:
                await self.reconcile(clock())
            except (ProvisioningError, OSError) as exc:
                log.warning("reconcile after the IKE daemon came back failed: %s", exc)

    async def close(self) -> None:
        """Wait for in-flight setups (used by tests and shutdown; tunnels stay up)."""
        tasks = [task for _, task in self._b.inflight.values()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._state is not None:  # lease extensions and pins not yet on disk
            with contextlib.suppress(OSError):
                await self._state.close()
