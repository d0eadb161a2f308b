"""The Provisioner's side of the watch: what charon lost, what it still holds, repairs.

Part of the Provisioner (its Rules are in resolver/provision.py): Rule 6, the books are checked
against the IKE daemon, not trusted. resolver/provisioning/watch.py listens to charon and calls
these; here
the books change: a lost tunnel is DOWN (never answered from), its private destination is
shunted at once, the answer caches are emptied, and `repair` brings it back.
"""

from __future__ import annotations

from collections.abc import Iterable

from resolver.errors import IkeDaemonUnreachable, ProvisioningError
from resolver.provisioning.books import Address, TunnelState, log
from resolver.provisioning.setup import ProvisionerSetups
from resolver.tunnels.intents import RemoveShunt


class ProvisionerWatch(ProvisionerSetups):
    """What the watch (resolver/provisioning/watch.py) tells the Provisioner, and repairs."""

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
        self._save()
        return gone

    async def suspect(self, names: Iterable[str], now: float) -> list[Address]:
        """Charon reported these tunnels down; not checked yet (resolver/provisioning/watch.py asks
        charon
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
