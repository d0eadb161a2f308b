"""The responder, asyncio layer: an initiator charon does not know gets a conn if DNS vouches
for it, with a lease, so that two hosts that run only ipseckey-resolver reach each other.

Theory of operation (DESIGN.md, "Both ends: the responder", has the sequence diagram):

  1. `start()` loads one wildcard conn for our identity and key (core.wildcard_conn: selected
     for anyone, able to authenticate no one, no children), adopts the learned conns a previous
     run left in charon (re-validated through DNS like new ones; those that no longer pass are
     terminated and unloaded), warns about PSK wildcards (lab-notes, Careful 2: an identity
     shown with a PSK proves nothing, and nothing here ever learns from one: only the pubkey
     wildcard's IKE_SAs are looked at), and subscribes to charon's events.
  2. An unknown initiator fails IKE_AUTH on the wildcard; charon logs who it is
     (resolver/responder/events.py, on the listener thread, pairs the lines with charonlog.py;
     the IKE_SA's ike-updown event is the second source). `_unknown` asks the Gate (core.py)
     whether it may cost a lookup, and `_admit` resolves the identity's IPSECKEY, A and AAAA
     through the daemon's own validating Resolution (coalesced per identity, bounded by
     `lookup_timeout`), lets `core.judge` decide, and loads the conn. The initiator, which got
     AUTHENTICATION_FAILED, tries again (resolver/tunnels/vici.py: 5 ms, doubling) and meets its
     conn. Every refusal is logged with its reason; rate-limit and repeat refusals are counted
     and summarised at most every SUMMARY_EVERY seconds instead.
  3. Each learned conn has a lease. At its end (`tick`), a conn that carries no SA is
     terminated and unloaded; one that does is re-validated (cached lookups) and kept only if
     DNS still vouches for the same key and addresses. When keys have left charon (ours or the
     Provisioner's), `tick` has charon drop every credential and reload ours
     (`ViciBackend.reload_credentials`), at most every SWEEP_EVERY seconds, and only when
     charon holds no conn we did not load (whose credentials we could not give back).
  4. Defence in depth: an IKE_SA that ever comes up under the wildcard is terminated at once.

Only `run()`'s timer loop and the event handlers read the clock (passed in as `clock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final

import dns.name
import dns.rdatatype

from resolver.errors import ProvisioningError, ResolverError
from resolver.resolve import Resolver
from resolver.responder import charon
from resolver.responder.charonlog import UnknownInitiator, identity_name
from resolver.responder.core import (
    RESPONDER_PREFIX,
    WILDCARD,
    Admit,
    Gate,
    Refused,
    ResponderConfig,
    conn_name,
    judge,
    responder_conn,
    same_admission,
    wildcard_conn,
)
from resolver.responder.events import Connected, Event, EventFeed, Up, WildcardUp
from resolver.tunnels.config import Identity
from resolver.tunnels.process import RemoteVici
from resolver.tunnels.vici import ViciBackend
from resolver.validator.response import ValidatedAnswer

log = logging.getLogger(__name__)

Address = IPv4Address | IPv6Address

SUMMARY_EVERY: Final = 10.0  # seconds between summaries of quiet refusals
SWEEP_EVERY: Final = 60.0  # seconds between credential reloads (when keys left)
TICK_MAX: Final = 5.0  # the timer loop wakes at least this often


@dataclass(slots=True)
class _Learned:
    """One conn we loaded for an initiator."""

    name: str
    admit: Admit
    address: str  # the source address it was admitted from
    expires_at: float
    learned_in: float  # seconds from the failed IKE_AUTH to the conn loaded
    ike_ids: set[str] = field(default_factory=set)  # its IKE_SAs up (from updown events)
    authenticated: bool = False


@dataclass(slots=True)
class ResponderCounters:
    loaded: int = 0
    unloaded: int = 0
    renewed: int = 0
    wildcard_terminated: int = 0
    credential_reloads: int = 0


class Responder:
    """Unknown initiators in, through DNS (see the module docstring)."""

    def __init__(self, config: ResponderConfig, identity: Identity,
                 backend: ViciBackend | RemoteVici,
                 resolution: Resolver, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.identity = identity
        self.backend = backend
        self.resolution = resolution
        self.clock = clock
        self.gate = Gate(config)
        self.counters = ResponderCounters()
        self.learned: dict[dns.name.Name, _Learned] = {}
        self._by_conn: dict[str, dns.name.Name] = {}
        self._inflight: dict[dns.name.Name, asyncio.Task[None]] = {}
        self._feed = EventFeed()  # the listener thread's side
        self._quiet: dict[str, int] = {}
        self._summary_at = 0.0
        self._swept_at = 0.0
        self._warned_foreign = False
        self._wake = asyncio.Event()
        self._connects = 0
        self._started: bool | None = None  # None: starting; False: charon was not reachable

    # -- start and stop --------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, then load the wildcard and adopt what a previous run left (step 1). If
        charon cannot be reached yet, that is logged and done when it can (the log session's
        registration says so): the daemon does not fail for it."""
        loop = asyncio.get_running_loop()
        self.backend.log.subscribe(loop, self._feed.feed, self._on_event)
        try:
            await self._load_all()
        except ProvisioningError as exc:
            self._started = False
            log.warning("responder: charon not reachable (%s): the wildcard is loaded once it "
                        "is", exc)
            return
        self._started = True

    async def _load_all(self) -> None:
        loaded = await self.backend.call(charon.conns)
        for name in charon.psk_wildcards(loaded):
            log.warning("responder: charon holds conn %r, which accepts any identity with a "
                        "pre-shared key: whoever has that key may claim any name there; such "
                        "identities are never taken as authenticated by us", name)
        await self.backend.ensure_key()  # we answer as ourselves: charon must hold our key
        await self._adopt([c for c in loaded if c.name.startswith(RESPONDER_PREFIX)
                           and c.name != WILDCARD])
        payload = wildcard_conn(self.identity.fqdn, self.backend.own_spki)
        await self.backend.call(self.backend.load_conn, payload)
        accept = ("any name" if self.config.accept == (dns.name.root,) else
                  ", ".join(n.to_text() for n in self.config.accept))
        log.info("responder: unknown initiators are looked up in DNS (accept %s; "
                 "match_address %s; allow_keys %s)", accept,
                 "on" if self.config.match_address else "off",
                 ", ".join(self.config.allow_keys) or "any secure key")

    async def run(self) -> None:
        """The timer loop: leases, summaries, credential sweeps. Runs until cancelled."""
        while True:
            try:
                nxt = await self.tick(self.clock())
            except Exception:  # one bad round must not stop the timers
                log.exception("responder timer round failed")
                nxt = None
            delay = TICK_MAX if nxt is None else min(TICK_MAX, max(0.05, nxt - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def close(self) -> None:
        """Stop looking things up (learned conns stay loaded: a restart adopts them)."""
        for task in list(self._inflight.values()):
            task.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    # -- the loop's side ----------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if isinstance(event, UnknownInitiator):
            self._unknown(event)
        elif isinstance(event, Connected):
            self._connects += 1
            # The first registration comes with our own start (which loads everything), unless
            # that start could not reach charon; every later one is charon coming back.
            if self._started is False or (self._started and self._connects > 1):
                asyncio.get_running_loop().create_task(self._restore())
        elif isinstance(event, WildcardUp):
            # Cannot happen (NEVER_GROUP); if it ever does, nothing may stay up under it.
            log.error("responder: an IKE_SA came up under the wildcard conn: terminating it")
            self.counters.wildcard_terminated += 1
            asyncio.get_running_loop().create_task(self._terminate(event.ike_id))
        elif isinstance(event, Up):
            self._up(event)
        else:
            ident = self._by_conn.get(event.name)
            if ident is not None and ident in self.learned:
                self.learned[ident].ike_ids.discard(event.ike_id)

    def _up(self, event: Up) -> None:
        ident = self._by_conn.get(event.name)
        entry = self.learned.get(ident) if ident is not None else None
        if entry is None:
            return
        entry.ike_ids.add(event.ike_id)
        if not entry.authenticated:
            entry.authenticated = True
            log.info("responder: %s (%s) authenticated with its %s, learned %.1f ms after its "
                     "first try; IKE_SA up", event.remote_id, event.remote_host,
                     entry.admit.describe(), entry.learned_in * 1000)

    def _unknown(self, who: UnknownInitiator) -> None:
        start = time.perf_counter()
        name = identity_name(who.identity)
        if name is not None and name in self._inflight:
            return  # its lookup is under way (the initiator retried, or two IKE_SAs)
        refused = self.gate.before_lookup(
            name, who.address, self.clock(), in_flight=len(self._inflight),
            conns=len(self.learned), evictable=any(not e.ike_ids for e in self.learned.values()))
        if refused is not None:
            self._refused(who.identity, str(who.address), refused)
            return
        assert name is not None  # the gate refuses non-names
        task = asyncio.get_running_loop().create_task(self._admit(name, who, start))
        self._inflight[name] = task
        task.add_done_callback(lambda _t: self._inflight.pop(name, None))

    async def _admit(self, name: dns.name.Name, who: UnknownInitiator, start: float) -> None:
        try:
            async with asyncio.timeout(self.config.lookup_timeout):
                # A name we hold a conn for came back to the wildcard: its key may have
                # changed since, so past the caches (bounded by the gate all the same).
                fresh = name in self.learned
                ipseckey, a, aaaa = await asyncio.gather(
                    *(self._lookup(name, t, fresh) for t in (dns.rdatatype.IPSECKEY,
                                                             dns.rdatatype.A,
                                                             dns.rdatatype.AAAA)))
            outcome: Admit | Refused = judge(self.config, name, who.address, ipseckey, a, aaaa)
        except TimeoutError:
            outcome = Refused(f"its lookups took longer than {self.config.lookup_timeout:g} s",
                              lookup=True)
        old = self.learned.get(name)
        if (isinstance(outcome, Admit) and old is not None and same_admission(old.admit, outcome)
                and await self._holds(old.name)):
            # A conn with exactly this key is loaded, yet charon fell back to the wildcard:
            # the initiator does not hold the key the name publishes (or is elsewhere).
            outcome = Refused(f"it does not authenticate with the key {name.to_text(True)} "
                              "publishes", lookup=True)
        self.gate.after_lookup(name, who.address, outcome, self.clock())
        if isinstance(outcome, Refused):
            self._refused(who.identity, str(who.address), outcome)
            return
        try:
            await self._load(name, outcome, str(who.address), time.perf_counter() - start)
        except ProvisioningError as exc:
            log.warning("responder: conn for %s not loaded: %s", who.identity, exc)

    async def _holds(self, conn: str) -> bool:
        """Whether charon still holds our conn (someone may have unloaded it behind us)."""
        try:
            return await self.backend.call(charon.has_conn, conn)
        except ProvisioningError:
            return True  # cannot tell: do not load again blindly

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                      fresh: bool = False) -> ValidatedAnswer | ResolverError:
        try:
            return await self.resolution.resolve(name, rdtype, self.clock(), fresh=fresh)
        except ResolverError as exc:
            return exc

    async def _load(self, name: dns.name.Name, admit: Admit, address: str, took: float) -> None:
        if name not in self.learned and len(self.learned) >= self.config.max_conns:
            await self._evict()
        payload = responder_conn(admit, self.identity.fqdn, self.backend.own_spki,
                                 self.identity.addresses, self.backend.dpd_delay)
        cname = conn_name(name)
        old = self.learned.get(name)
        # In the books before charon has it: the initiator's retry (and its updown event)
        # may come back before this coroutine runs again.
        self.learned[name] = _Learned(cname, admit, address,
                                      self.clock() + self.config.lease, took,
                                      old.ike_ids if old is not None else set())
        self._by_conn[cname] = name
        try:
            await self.backend.call(self.backend.load_conn, payload)
        except BaseException:
            if old is not None:
                self.learned[name] = old
            else:
                self.learned.pop(name, None)
                self._by_conn.pop(cname, None)
            raise
        self.counters.loaded += 1
        log.info("responder: %s from %s: loaded a conn with its %s, traffic selectors %s "
                 "(%.1f ms after its first try)", name.to_text(True), address, admit.describe(),
                 ", ".join(map(str, admit.addresses)), took * 1000)
        self._wake.set()

    def _refused(self, identity: str, address: str, refused: Refused) -> None:
        if refused.quiet:
            self._quiet[refused.kind] = self._quiet.get(refused.kind, 0) + 1
            return
        log.warning("responder: refused %r from %s: %s", identity[:120], address,
                    refused.reason)

    # -- leases, summaries, credentials -------------------------------------------------------

    async def tick(self, now: float) -> float | None:
        """Leases that ended (step 3), the quiet-refusal summary, the credential sweep.
        Returns when there is next something to do (None: nothing scheduled)."""
        if self._quiet and now - self._summary_at >= SUMMARY_EVERY:
            total = sum(self._quiet.values())
            why = ", ".join(f"{n} {kind}" for kind, n in sorted(self._quiet.items(),
                                                                   key=lambda x: -x[1]))
            log.warning("responder: %d unknown initiators refused without a lookup in the last "
                        "%.0f s (%s)", total, now - self._summary_at if self._summary_at else 0,
                        why)
            self._quiet.clear()
            self._summary_at = now
        for name, entry in list(self.learned.items()):
            if entry.expires_at <= now and name not in self._inflight:
                await self._renew_or_unload(name, entry, now)
        await self._sweep(now)
        ends = [e.expires_at for e in self.learned.values()]
        return min(ends) if ends else None

    async def _renew_or_unload(self, name: dns.name.Name, entry: _Learned, now: float) -> None:
        try:
            live = await self.backend.call(charon.live_ike_ids, entry.name)
        except ProvisioningError as exc:
            log.warning("responder: lease of %s: %s", entry.name, exc)
            return
        if live:
            answers = [await self._lookup(name, t) for t in
                       (dns.rdatatype.IPSECKEY, dns.rdatatype.A, dns.rdatatype.AAAA)]
            outcome = judge(self.config, name, _addr(entry.address), *answers)
            if isinstance(outcome, Admit) and same_admission(outcome, entry.admit):
                entry.expires_at = now + self.config.lease
                self.counters.renewed += 1
                return
            why = outcome.reason if isinstance(outcome, Refused) else "its records changed"
            log.warning("responder: %s no longer admitted (%s): closing its tunnel",
                        name.to_text(True), why)
        else:
            log.info("responder: lease of %s ended, no SA: unloading", name.to_text(True))
        await self._unload(name)

    async def _unload(self, name: dns.name.Name) -> None:
        entry = self.learned.pop(name, None)
        if entry is None:
            return
        self._by_conn.pop(entry.name, None)
        self.counters.unloaded += 1
        try:
            await self.backend.call(self.backend.unload_conn, entry.name)
        except ProvisioningError as exc:
            log.warning("responder: unloading %s: %s", entry.name, exc)

    async def _evict(self) -> None:
        """Make room: unload the learned conn without SAs that expires first."""
        idle = [(e.expires_at, n) for n, e in self.learned.items() if not e.ike_ids]
        if idle:
            await self._unload(min(idle)[1])

    async def _sweep(self, now: float) -> None:
        if not self.backend.keys_left or now - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = now
        try:
            others = charon.foreign(await self.backend.call(charon.conns))
            if others:
                if not self._warned_foreign:
                    log.warning("responder: not clearing charon's stale credentials: it holds "
                                "conns we did not load (%s); keys of unloaded conns stay in its "
                                "credential store (the wildcard still admits no one with them)",
                                ", ".join(others[:5]))
                    self._warned_foreign = True
                return
            reloaded = await self.backend.reload_credentials()
        except ProvisioningError as exc:
            log.warning("responder: credential reload failed: %s", exc)
            return
        self.counters.credential_reloads += 1
        log.info("responder: dropped stale credentials, reloaded our key and %d conns", reloaded)

    async def _restore(self) -> None:
        """charon is back (restarted, or its socket was): our key, the wildcard and every
        learned conn loaded again, so that peers can initiate to us as before. Their SAs went
        with the old charon; the peers' own setups bring them back."""
        try:
            await self.backend.ensure_key()
            await self.backend.call(self.backend.load_conn,
                                    wildcard_conn(self.identity.fqdn, self.backend.own_spki))
            for entry in list(self.learned.values()):
                entry.ike_ids.clear()
                await self.backend.call(self.backend.load_conn, responder_conn(
                    entry.admit, self.identity.fqdn, self.backend.own_spki,
                    self.identity.addresses, self.backend.dpd_delay))
        except ProvisioningError as exc:
            log.warning("responder: restoring our conns in charon failed: %s", exc)
            return
        self._started = True
        log.info("responder: charon (re)connected: wildcard and %d learned conns loaded",
                 len(self.learned))

    async def _terminate(self, ike_id: str) -> None:
        with contextlib.suppress(ProvisioningError):
            await self.backend.call(charon.terminate_id, ike_id)

    # -- a previous run's conns ----------------------------------------------------------------

    async def _adopt(self, found: list[charon.LoadedConn]) -> None:
        """Learned conns of a previous run (kill -9, restart): kept if DNS still admits them
        (their SAs survive: the payload is the same), else terminated and unloaded."""
        if not found:
            return
        sas = await self.backend.call(charon.responder_sas)
        for conn in found:
            name = identity_name(conn.remote_ids[0]) if conn.remote_ids else None
            live = [sa for sa in sas.get(conn.name, []) if sa["state"] == "ESTABLISHED"]
            if name is None or conn_name(name) != conn.name or not live:
                await self._unload_stray(conn.name, "no SA" if name is not None else "not ours")
                continue
            answers = [await self._lookup(name, t) for t in
                       (dns.rdatatype.IPSECKEY, dns.rdatatype.A, dns.rdatatype.AAAA)]
            source = live[0]["remote-host"]
            outcome = judge(self.config, name, _addr(source), *answers)
            if isinstance(outcome, Refused):
                await self._unload_stray(conn.name, outcome.reason)
                continue
            await self._load(name, outcome, source, 0.0)
            self.learned[name].ike_ids = {sa["uniqueid"] for sa in live}
            self.learned[name].authenticated = True
            log.info("responder: kept %s from a previous run (%d IKE_SA)", conn.name, len(live))

    async def _unload_stray(self, conn: str, why: str) -> None:
        log.info("responder: removing %s left by a previous run (%s)", conn, why)
        await self.backend.call(self.backend.unload_conn, conn)


def _addr(text: str) -> Address:
    return ip_address(text)


async def start_responder(sections: Mapping[str, Any], source: str, tunnels: object,
                          resolution: Resolver) -> Responder | None:
    """The responder the configuration asks for, started; None when there is none: tunnels
    not over VICI (the dry run, or no [identity]), or `[responder] accept = "none"`. It
    answers as the identity of the VICI backend.

    Raises:
        ConfigError: a bad [responder] table. (charon out of reach is no reason to fail:
            `Responder.start` catches up when it is back.)
    """
    config = ResponderConfig.from_section(sections.get("responder", {}), source)
    if not isinstance(tunnels, ViciBackend | RemoteVici):  # the latter: in the tunnel worker
        return None
    if not config.enabled:
        log.info("responder off ([responder] accept = \"none\"): only peers we initiate to, "
                 "or that charon knows otherwise, get tunnels")
        # A responder switched off leaves nothing behind: a previous run's wildcard and
        # learned conns would go on admitting peers.
        try:
            for conn in await tunnels.call(charon.conns):
                if conn.name.startswith(RESPONDER_PREFIX):
                    log.info("responder off: removing %s", conn.name)
                    await tunnels.call(tunnels.unload_conn, conn.name)
        except ProvisioningError as exc:
            log.warning("responder off: could not check charon for our conns: %s", exc)
        return None
    responder = Responder(config, tunnels.identity, tunnels, resolution)
    await responder.start()
    return responder
