"""The Provisioner's setup path: `ensure` and `shunt`, one setup per destination, failures.

Part of the Provisioner (its Rules are in resolver/provision.py): Rule 1 (one setup in flight
per destination, `max_setups` at once), Rule 2 (success only when the backend says so, bounded
by `timeout`), Rule 4 (make before break), Rule 5 (a tunnel is reported up only once the state
file records it; a failed write undoes it) and Rule 7 (one address, one key).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from resolver.errors import (
    AddressBound,
    IkeDaemonUnreachable,
    ProvisioningError,
    StateUnrecorded,
    StateWriteFailed,
    TunnelRejected,
    TunnelTimeout,
)
from resolver.logs.event import log_event
from resolver.provisioning.books import (
    IKE_RETRY,
    Address,
    Failure,
    ProvisionerBooks,
    Tunnel,
    TunnelState,
    log,
)
from resolver.tunnels.intents import (
    InstallFloor,
    InstallTunnel,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
)


class ProvisionerSetups(ProvisionerBooks):
    """`ensure`, `shunt` and what a setup does when it succeeds or fails."""

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
                if self._private(t) and not t.floored:  # private since it came up (Rule 9)
                    t.floored = True
                    await self._quietly(InstallFloor(dest))
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

    def _bound(self, t: Tunnel, now: float) -> bool:
        """Whether `t` binds its destination to its key (Rule 7): leased or pinned."""
        return t.spec.destination in self._b.pinned or t.expires_at > now

    def _bound_spec(self, t: Tunnel, spec: TunnelSpec) -> TunnelSpec:
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
            self._b.tunnels[dest] = Tunnel(spec, TunnelState.PENDING, now + cfg.lease,
                                            private=private, was_down=down is not None)
        try:
            # The backend bounds its own wait (it passes the timeout to the daemon); this outer
            # bound is the safety net for a backend that hangs.
            if self._slots.locked():  # queued behind max_setups others (Rule 1)
                await self._queue(spec)
            else:
                await self._slots.acquire()  # free: returns at once
            left = cfg.timeout  # the setup's own: the queue did not use it up
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
        self._b.tunnels[dest] = Tunnel(spec, TunnelState.INSTALLED, expires,
                                        private=private or (old is not None and old.private),
                                        floored=any(t.floored for t in (old, down) if t))
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
        if self._private(t := self._b.tunnels[dest]):  # Rule 9, before the shunt goes
            t.floored = True
            await self._quietly(InstallFloor(dest))
        if shunted is not None:
            await self._quietly(RemoveShunt(dest))
        self._b.failed.pop(dest, None)
        log_event(log, logging.INFO, "tunnel-up", name=spec.name, peer=dest)
        return expires

    async def _queue(self, spec: TunnelSpec) -> None:
        """Wait for one of the `max_setups` slots, at most `queue_timeout` seconds.

        The wait does not count against the setup's `timeout`: that bounds what a dead peer
        may cost, and a burst of N setups makes the last one wait N/R for a charon that sets up
        R per second (measured in the lab: 200 at once, 1.3-2 s). Counted against it, setups
        that charon would have made failed for our own queueing (issue 13: 68-195 of 200 were
        NOERROR with a 3 s timeout). A private destination is shunted while it waits.

        Raises:
            TunnelTimeout: no slot within `queue_timeout`.
        """
        cfg = self.config
        try:
            async with asyncio.timeout(cfg.queue_timeout):
                await self._slots.acquire()
        except TimeoutError:
            raise TunnelTimeout(f"tunnel to {spec.destination}: {cfg.max_setups} setups in "
                                f"flight, none finished within {cfg.queue_timeout:g} s") from None

    async def _unrecorded(self, spec: TunnelSpec, old: Tunnel | None, down: Tunnel | None,
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
            self._b.failed[dest] = Failure(now + self.config.failure_hold, error)
        raise error

    async def _replacement_failed(self, old: Tunnel, spec: TunnelSpec, now: float,
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
                      exc: ProvisioningError | TimeoutError, down: Tunnel | None = None) -> float:
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
            self._b.tunnels[dest] = down or Tunnel(
                spec, TunnelState.DOWN, now + self.config.lease,
                private=pending is not None and pending.private)
        else:
            await self._quietly(RemoveTunnel(spec.name))  # terminate the half-open IKE_SA too
        if down is not None and self._private(down):
            await self._install_shunts([dest], now)  # its conn (and trap) is gone now
        if self.config.failure_hold > 0:
            self._b.failed[dest] = Failure(now + self.config.failure_hold, error)
        await self._persist_quietly()  # the answer is a failure either way
        raise error
