"""The watch: what the IKE daemon reports and holds -> the Provisioner's books; repairs.

Theory of operation (DESIGN.md, "The watch"). The Provisioner's books say which tunnels are up;
charon is the truth. Charon can lose a tunnel behind our back: the peer deletes the SA, DPD
gives up, charon stops, crashes or restarts (then every SA is gone, and with kernel-libipsec
its TUN device and routes too, so packets to the destination leave in clear). The watch keeps
the books honest and fails closed until the truth is good again:

  1. Listen (the backend's event session, resolver/tunnels/vici_listener.py): child-updown
     and ike-updown "down" for one of our connections make it a *suspect*; the session
     closing is `DaemonDisconnected`; registering again is `DaemonConnected`.
  2. Check, do not believe: a private suspect is shunted at once (fail closed while we ask),
     then suspects are checked against one `live()` (list-sas) and only a tunnel with no
     CHILD_SA installed any more (other than the ones the event named) is lost; the others get
     their shunt taken out again. A rekey (child-rekey: no down at all, the new CHILD_SA is
     installed before the old goes), our own make-before-break replacement (the listener does
     not report the old SAs we end) and our own teardowns (no longer in the books) never
     count as "down".
  3. Lost -> `Provisioner.lost`: DOWN, drop shunt at once if private, answer caches emptied,
     one log line per tunnel saying what and why. Charon gone -> `Provisioner.daemon_lost`:
     every tunnel lost, setups in flight do not count.
  4. Charon back (and at start) -> audit: every tunnel we count as up is compared with
     `live()` (anything missing is lost), failures held only because charon was unreachable
     are forgotten, and every DOWN tunnel still wanted (leased or pinned) is repaired at once.
     A charon that was not there when the daemon started is first reconciled with, as the
     start-up would have (`Provisioner.reconcile`, its Rule 8).
  5. Repair: `Provisioner.repair` (key, conn, initiate, wait for INSTALLED; the shunt goes
     when it is up), one task per destination, never more than once at a time, retried after
     1 s doubling to 30 s while it fails and the tunnel is still wanted.
  6. Every `interval` seconds the audit runs anyway: events can be missed, books cannot be
     trusted.

One consumer task handles the events in order, so a loss is acted on before anything reported
after it; it never waits for a setup (repairs are tasks of their own), and every question to
charon is bounded (`LIVE_TIMEOUT`): in a check, a charon that cannot answer holds nothing (the
suspects are lost); an audit that cannot ask leaves it to the session's end to say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from resolver.errors import ProvisioningError
from resolver.provision import Address, Provisioner
from resolver.tunnels.backend import WatchableBackend
from resolver.tunnels.events import (
    BackendEvent,
    ChildSaCameUp,
    ChildSaRekeyed,
    ChildSaWentDown,
    DaemonConnected,
    DaemonDisconnected,
    HeldSa,
)

log = logging.getLogger(__name__)

LIVE_TIMEOUT: Final = 2.0  # seconds for one list-sas; longer: charon counts as holding nothing
RETRY_FIRST: Final = 1.0  # repair backoff: first retry after a failed repair...
RETRY_LAST: Final = 30.0  # ...doubling up to this


@dataclass(slots=True)
class _Retry:
    due: float  # loop time
    delay: float


class TunnelWatch:
    """Keeps a Provisioner's books true to its backend's daemon (see the module docstring).

    Args:
        provisioner: whose books are kept; its backend must be a WatchableBackend.
        clock: POSIX seconds for the Provisioner's leases (the watch's own waits use the loop).
        interval: seconds between audits besides the events (0: only on (re)connect).
    """

    def __init__(self, provisioner: Provisioner, clock: Callable[[], float] = time.time, *,
                 interval: float = 30.0) -> None:
        self.provisioner = provisioner
        self.clock = clock
        self.interval = interval
        self.connected = False
        self._queue: asyncio.Queue[BackendEvent | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._repairs: dict[Address, asyncio.Task[None]] = {}
        self._retry: dict[Address, _Retry] = {}
        self._next_audit: float | None = None

    @property
    def backend(self) -> WatchableBackend | None:
        b = self.provisioner.backend
        return b if isinstance(b, WatchableBackend) else None

    def start(self) -> bool:
        """Start watching (on the running loop). False: the backend cannot be watched."""
        backend = self.backend
        if backend is None or not backend.watch(self._queue.put_nowait):
            return False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tunnel-watch")
        return True

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._repairs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the consumer ----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.interval > 0:
            self._next_audit = loop.time() + self.interval
        while True:
            timeout = self._next_wake(loop.time())
            try:
                event = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                event = None
            try:
                await self._handle(event)
                await self._tick(loop.time())
            except Exception:  # one bad round must not end the watch
                log.exception("bug: tunnel watch round failed")
                await asyncio.sleep(1.0)

    async def _handle(self, event: BackendEvent | None) -> None:
        if isinstance(event, DaemonDisconnected):
            self.connected = False
            await self.provisioner.daemon_lost(event.reason, self.clock())
        elif isinstance(event, DaemonConnected):
            self.connected = True
            if not self.provisioner.ike_ready:  # unreachable since start-up (its Rule 8)
                await self.provisioner.reconcile(self.clock())
            if not event.first:
                log.warning("charon connection back: checking our tunnels against what it "
                            "holds and bringing the missing ones back")
            self.provisioner.daemon_back()
            self._retry.clear()  # every wanted tunnel: now
            await self._audit("charon (re)connected")
        elif isinstance(event, ChildSaWentDown):
            suspects = {event.name: [event]}
            nxt: BackendEvent | None = None
            while not self._queue.empty():  # a burst (IKE + CHILD, many peers): one list-sas
                nxt = self._queue.get_nowait()
                if not isinstance(nxt, ChildSaWentDown):
                    break
                suspects.setdefault(nxt.name, []).append(nxt)
                nxt = None
            await self._check(suspects)
            if nxt is not None:
                await self._handle(nxt)
        elif isinstance(event, ChildSaCameUp):
            # charon brought a DOWN tunnel of ours back by itself (the peer initiated): the
            # repair finds it installed at once, so run it now rather than at its backoff.
            down = self.provisioner.wanted_down(self.clock())
            for dest in [d for d, name in down.items() if name == event.name]:
                self._retry.pop(dest, None)
        elif isinstance(event, ChildSaRekeyed):
            log.debug("CHILD_SA %s rekeyed (not a loss)", event.name)

    async def _tick(self, mono: float) -> None:
        """The timers: the periodic audit, then repairs that are due."""
        if self._next_audit is not None and mono >= self._next_audit:
            self._next_audit = mono + self.interval
            if self.connected:
                await self._audit("periodic check")
        self._start_repairs(mono)

    def _next_wake(self, mono: float) -> float | None:
        times = [] if self._next_audit is None else [self._next_audit]
        if self.connected:
            wanted = self.provisioner.wanted_down(self.clock())
            for dest in list(self._retry):
                if dest not in wanted:
                    del self._retry[dest]  # up again, released or expired
            times += [self._retry[d].due if d in self._retry else mono
                      for d in wanted if d not in self._repairs]
        return max(0.0, min(times) - mono) if times else None

    # -- checking ----------------------------------------------------------------------------

    async def _live(self) -> frozenset[HeldSa] | str:
        """What charon holds, or why it could not be asked."""
        backend = self.backend
        assert backend is not None
        try:
            return await asyncio.wait_for(backend.live(), LIVE_TIMEOUT)
        except ProvisioningError as exc:
            return str(exc)
        except TimeoutError:
            return f"charon did not list its SAs within {LIVE_TIMEOUT:g} s"

    async def _check(self, suspects: dict[str, list[ChildSaWentDown]]) -> None:
        """Suspects charon reported down: lost unless another CHILD_SA of theirs is held.

        Private ones are shunted before charon is asked (fail closed while we ask: the SA, and
        with kernel-libipsec the route into the tunnel, may already be gone), and the shunt
        is taken out again for those charon still holds (a duplicate SA was deleted)."""
        held = self.provisioner.held_names()
        suspects = {n: evs for n, evs in suspects.items() if n in held}
        if not suspects:
            return  # not ours any more (our own teardown), or already down
        shunted = await self.provisioner.suspect(suspects, self.clock())
        kept: list[str] = []
        live = await self._live()
        for name, events in suspects.items():
            gone_ike = frozenset().union(*(e.gone_ike for e in events))
            gone_child = frozenset().union(*(e.gone_child for e in events))
            if isinstance(live, frozenset) and any(
                    h.name == name and h.ike_id not in gone_ike
                    and h.child_id not in gone_child for h in live):
                log.debug("%s: %s, but another CHILD_SA of it is installed", name,
                          events[0].reason)
                kept.append(name)
                continue
            why = events[-1].reason
            if isinstance(live, str):
                why += f"; then charon could not be asked ({live})"
            await self.provisioner.lost([name], why, self.clock())
        if kept:
            await self.provisioner.cleared([held[n] for n in kept if held[n] in shunted])

    async def _audit(self, why: str) -> None:
        """Every tunnel we count as up must be held by charon."""
        held = self.provisioner.held_names()
        if not held:
            return
        live = await self._live()
        if isinstance(live, str):
            log.warning("cannot check our tunnels against charon (%s): %s", why, live)
            return  # a dead charon is reported by its closed session, not here
        names = {h.name for h in live}
        gone = [n for n in held if n not in names]
        if gone:
            await self.provisioner.lost(gone, f"charon does not hold it ({why})", self.clock())

    # -- repairing ---------------------------------------------------------------------------

    def _start_repairs(self, mono: float) -> None:
        if not self.connected:
            return  # nothing can come up; DaemonConnected starts them all
        for dest in self.provisioner.wanted_down(self.clock()):
            retry = self._retry.get(dest)
            if dest in self._repairs or (retry is not None and retry.due > mono):
                continue
            task = asyncio.get_running_loop().create_task(self._repair(dest))
            self._repairs[dest] = task

    async def _repair(self, dest: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            ok = await self.provisioner.repair(dest, self.clock())
        except Exception:  # a bug; the tunnel stays DOWN (and shunted) and is retried
            log.exception("bug: repair of the tunnel to %s failed", dest)
            ok = False
        finally:
            self._repairs.pop(dest, None)
        if ok:
            self._retry.pop(dest, None)
        else:
            last = self._retry.get(dest)
            delay = RETRY_FIRST if last is None else min(last.delay * 2, RETRY_LAST)
            self._retry[dest] = _Retry(loop.time() + delay, delay)
        with contextlib.suppress(RuntimeError):
            self._queue.put_nowait(None)  # wake the consumer: schedule the next one
