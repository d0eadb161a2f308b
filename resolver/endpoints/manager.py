"""Pinned endpoints: the names `autosp add` keeps a tunnel to, followed as their records change.

Theory of operation. The decisions are pure functions in resolver/endpoints/core.py (observe a
name, plan its tunnels, show it, persist it; Rules 1-6 are stated there). This module is the
asyncio layer around them:

  * `EndpointManager` runs one refresh per endpoint at a time (a lock per name): it asks
    `Resolution.resolve` for A, AAAA and IPSECKEY, lets the core decide, calls
    `Provisioner.pin`/`ensure`/`release`, and has the state file written (resolver/statefile.py:
    atomic, off the event loop) before an operation returns;
  * `EndpointManager.run(clock)` is the timer loop, the only place that reads the clock: it
    sleeps until the next TTL expiry, retry or keepalive (or until an operation changed the
    schedule) and calls `tick(now)`.

Our tunnels are pinned in the Provisioner (no lease expiry); every `keepalive` seconds they are
ensured again, a cheap check that re-installs one the Provisioner lost (a failed replacement, a
reconcile after a crash that could not restore it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

import dns.name
import dns.rdatatype

from resolver.endpoints.core import (
    STATE_HEADER,
    STATE_SECTIONS,
    Address,
    Endpoint,
    Failure,
    Observation,
    choose_key,
    display_name,
    failure_code,
    load_state,
    next_refresh,
    observe,
    parse_group,
    plan_tunnels,
    retry_delay,
    same_key,
    state_entry,
    view,
    without_exempt,
)
from resolver.endpoints.protocol import EndpointError
from resolver.errors import ProvisioningError, ResolverError, StateCorrupt
from resolver.ipseckey import IpsecKey
from resolver.logs.event import log_event
from resolver.policy import Group, Policy
from resolver.resolve import Resolver
from resolver.rrsets import ADDRESS_TYPES, gateway_addresses
from resolver.statefile import Layout, Record, StateFile
from resolver.tunnels.intents import TunnelSpec
from resolver.validator.response import ValidatedAnswer

__all__ = ["DEFAULT_KEEPALIVE", "EndpointError", "EndpointManager", "Tunnels"]

log = logging.getLogger(__name__)
STATE_LAYOUT = Layout(STATE_HEADER, STATE_SECTIONS)

DEFAULT_KEEPALIVE: Final = 120.0


# --- the collaborators, as far as we use them ----------------------------------------------


class Tunnels(Protocol):
    """resolver.provision.Provisioner, structurally (the part endpoints use)."""

    async def ensure(self, spec: TunnelSpec, now: float, *, shunt: bool = False) -> float: ...

    def tunnels(self) -> dict[Address, TunnelSpec]: ...

    def pin(self, destination: Address, pinned: bool = True) -> None: ...

    async def release(self, destination: Address, now: float) -> None: ...


# --- the manager (asyncio) -----------------------------------------------------------------


class EndpointManager:
    """The pinned endpoints: the operations behind the control socket, and their timers.

    Args:
        resolution: the resolver's Resolution (validated, cached lookups).
        tunnels: the Provisioner.
        state_file: where the endpoint list lives (None: not persisted; tests).
        policy: to find the group of an endpoint added without --group (None: no shunts).
        keepalive: seconds between re-checks of the pinned tunnels (`ensure` again: a no-op
            for an installed tunnel, a re-install for one the Provisioner lost).
    """

    def __init__(self, resolution: Resolver, tunnels: Tunnels, state_file: Path | None = None,
                 *, policy: Policy | None = None, keepalive: float = DEFAULT_KEEPALIVE) -> None:
        self.resolution = resolution
        self.tunnels = tunnels
        self.state_file = state_file
        self._state = StateFile(state_file, STATE_LAYOUT, self._record) \
            if state_file is not None else None
        self.policy = policy
        self.keepalive = keepalive
        self.endpoints: dict[dns.name.Name, Endpoint] = {}
        self._locks: dict[dns.name.Name, asyncio.Lock] = {}
        self._wake = asyncio.Event()

    # -- the control operations ------------------------------------------------------------

    async def add(self, name: dns.name.Name, group: str | None, now: float) -> dict[str, Any]:
        """`autosp add`: resolve, bring the tunnels up, keep them.

        Raises:
            EndpointError: "bad-request" (group), "unknown-name", "no-secure-key",
                "resolution-failed" (nothing added), or "tunnel-failed"/"ike-unreachable"
                (the endpoint is kept and retried; the message says so).
        """
        grp = parse_group(group)
        async with self._lock(name):
            ep = self.endpoints.get(name)
            new = ep is None
            if ep is None:
                ep = Endpoint(name=name, group=grp, added_at=now)
            elif grp is not None:
                ep.group = grp
            failure = await self._refresh(ep, now, fresh=True)
            if isinstance(failure, Failure) and new:
                raise EndpointError(failure.code, failure.reason)
            self.endpoints[name] = ep
            await self._save(name)
            self._wake.set()
            if ep.error:
                when = "" if ep.next_refresh is None else \
                    f"; retrying in {max(0, round(ep.next_refresh - now))} s"
                raise EndpointError(ep.code, f"{'added' if new else 'kept'} "
                                             f"{display_name(name)}, but "
                                             f"{ep.error}{when} (`autosp remove` to give up)")
            return self._view(ep)

    async def remove(self, name: dns.name.Name, now: float) -> dict[str, Any]:
        """`autosp remove`: forget the endpoint and release its tunnels."""
        async with self._lock(name):
            ep = self.endpoints.pop(name, None)
            if ep is None:
                raise EndpointError("not-found", f"{display_name(name)} is not an endpoint "
                                                 "(see `autosp list`)")
            await self._save(name)
            await self._release(list(ep.tunnels.values()), now)
            await self._release_failed(ep, list(ep.failures), now)
        # The lock stays: a refresh queued on it must not run beside a later `add`'s refresh.
        self._wake.set()
        return {"removed": name.to_text()}

    def list(self, now: float) -> dict[str, Any]:
        """`autosp list`: every endpoint's ENDPOINT dict, sorted by name."""
        return {"endpoints": [self._view(ep) for _, ep in sorted(self.endpoints.items())]}

    def status(self, name: dns.name.Name, now: float) -> dict[str, Any]:
        """`autosp status NAME`."""
        ep = self.endpoints.get(name)
        if ep is None:
            raise EndpointError("not-found", f"{display_name(name)} is not an endpoint "
                                             "(see `autosp list`)")
        return self._view(ep)

    async def refresh(self, name: dns.name.Name | None, now: float) -> dict[str, Any]:
        """`autosp refresh [NAME]`: re-resolve now (one or all) and follow the changes.

        Raises:
            EndpointError: "not-found", or the refresh failed (for all: the first failure's
                code, every failed endpoint in the message).
        """
        if name is not None and name not in self.endpoints:
            raise EndpointError("not-found", f"{display_name(name)} is not an endpoint "
                                             "(see `autosp list`)")
        names = [name] if name is not None else sorted(self.endpoints)
        await asyncio.gather(*(self._refresh_locked(n, now, fresh=True) for n in names))
        self._wake.set()
        eps = [self.endpoints[n] for n in names if n in self.endpoints]
        failed = [ep for ep in eps if ep.error]
        if failed:
            text = "; ".join(f"{display_name(ep.name)}: {ep.error}" for ep in failed)
            if name is None:
                text = f"{len(failed)} of {len(eps)} endpoints failed: {text}"
            raise EndpointError(failed[0].code or "tunnel-failed", text)
        return {"endpoints": [self._view(ep) for ep in eps]}

    # -- start-up and timers ----------------------------------------------------------------

    def load(self) -> None:
        """Read the state file (Rule 6). A damaged file is kept aside and we start empty."""
        if self._state is None:
            return
        try:
            eps = self._state.load(load_state)
        except StateCorrupt as exc:
            log.error("endpoints: %s: starting without endpoints", exc)
            return
        if eps is None:
            return
        for ep in eps:
            ep.next_refresh = 0.0  # due at once: re-resolve every restored endpoint
            self.endpoints[ep.name] = ep
        log.info("restored %d pinned endpoint(s) from %s", len(eps), self.state_file)

    def next_deadline(self) -> float | None:
        """The earliest time `tick` has work to do (None: nothing scheduled)."""
        times = [t for ep in self.endpoints.values()
                 for t in (ep.next_refresh, ep.keepalive_at) if t is not None]
        return min(times) if times else None

    async def tick(self, now: float) -> None:
        """Refresh the endpoints whose TTL ran out and extend the pinned tunnels that are due."""
        due = [n for n, ep in self.endpoints.items()
               if ep.next_refresh is not None and ep.next_refresh <= now]
        alive = [n for n, ep in self.endpoints.items() if n not in due
                 and ep.keepalive_at is not None and ep.keepalive_at <= now]
        await asyncio.gather(*(self._refresh_locked(n, now) for n in due),
                             *(self._keepalive_locked(n, now) for n in alive))

    async def run(self, clock: Callable[[], float] = time.time) -> None:
        """The timer loop: sleep until the next deadline (or a change), then `tick`. Runs until
        cancelled; an error in one round is logged and the loop goes on."""
        while True:
            deadline = self.next_deadline()
            self._wake.clear()
            delay = None if deadline is None else max(0.0, deadline - clock())
            if delay is None or delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            try:
                await self.tick(clock())
            except Exception:
                log.exception("endpoint timer round failed")
                await asyncio.sleep(1.0)  # never spin on a persistent bug

    # -- internals ---------------------------------------------------------------------------

    def _view(self, ep: Endpoint) -> dict[str, Any]:
        policy_group = self._group(ep) if ep.group is None else None
        return view(ep, self.tunnels.tunnels(), policy_group)

    def _lock(self, name: dns.name.Name) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _refresh_locked(self, name: dns.name.Name, now: float, fresh: bool = False
                              ) -> None:
        async with self._lock(name):
            ep = self.endpoints.get(name)
            if ep is None:
                return  # removed meanwhile
            await self._refresh(ep, now, fresh)
            await self._save(name)

    async def _keepalive_locked(self, name: dns.name.Name, now: float) -> None:
        async with self._lock(name):
            ep = self.endpoints.get(name)
            if ep is None or ep.keepalive_at is None or ep.keepalive_at > now:
                return
            await self._ensure_all(ep, list(ep.tunnels.values()), now)
            ep.keepalive_at = now + self.keepalive

    async def _refresh(self, ep: Endpoint, now: float, fresh: bool = False) -> Failure | None:
        """Resolve `ep` and follow what changed (Rules 1-5). Updates `ep`; returns the
        resolution Failure, if that is what happened.

        `fresh`: bypass the resolver's caches (an operator asked: `add`, `refresh`); timer
        refreshes run when the TTL is out anyway and leave the cache to do its work.
        """
        obs = without_exempt(await self._observe(ep.name, now, fresh), self._is_exempt)
        ep.restored = False
        ep.last_refresh = now
        if isinstance(obs, Failure):
            log_event(log, logging.WARNING, "endpoint-refresh-failed", name=ep.name,
                      code=obs.code, reason=obs.reason)
            self._failed(ep, obs.code, obs.reason, now)  # Rule 4: tunnels stay
            return obs
        gw_addrs = await self._gateway_addresses(choose_key(ep.key, obs.keys), now)
        plan = plan_tunnels(ep.key, ep.tunnels, obs, gw_addrs)
        if ep.key is not None and plan.key is not ep.key:
            log.info("endpoint %s: key %s no longer published, moving to %s",
                     display_name(ep.name), ep.key.fingerprint(), plan.key.fingerprint())
        gone = [d for d in ep.failures if d not in obs.addresses and d not in ep.tunnels]
        await self._release_failed(ep, gone, now)  # its parked conn too
        ep.addresses, ep.published, ep.security = obs.addresses, len(obs.keys), obs.security
        ok = await self._ensure_all(ep, list(plan.up), now)
        # `key` is the key the tunnels use: a replacement that failed everywhere leaves the
        # old key in use (the provisioner kept the old tunnels), and the next refresh retries.
        if ok or not ep.tunnels or any(same_key(s.key, plan.key) for s in ep.tunnels.values()):
            ep.key = plan.key
        for dest, why in plan.impossible:
            ep.failures[dest] = why
        if ok and not plan.impossible:  # Rule 2: break only after every make succeeded
            await self._release(list(plan.down), now)
            for spec in plan.down:
                ep.tunnels.pop(spec.destination, None)
                ep.failures.pop(spec.destination, None)
        self._schedule(ep, obs.ttl, now)
        return None

    def _schedule(self, ep: Endpoint, ttl: int, now: float) -> None:
        """After a refresh that resolved: the error (if a tunnel is missing) and the timers."""
        errors = [why if str(d) in why else f"{d}: {why}"
                  for d, why in sorted(ep.failures.items(), key=str)]
        if errors:
            code = ep.code if ep.code in ("ike-unreachable", "tunnel-failed") else "tunnel-failed"
            self._failed(ep, code, "tunnel not up: " + "; ".join(errors), now)
            ep.next_refresh = min(next_refresh(now, ttl), ep.next_refresh or now)
        else:
            ep.error, ep.code, ep.attempts = "", "", 0
            ep.next_refresh = next_refresh(now, ttl)
        ep.keepalive_at = now + self.keepalive

    def _failed(self, ep: Endpoint, code: str, reason: str, now: float) -> None:
        ep.attempts += 1
        ep.error, ep.code = reason, code
        ep.next_refresh = now + retry_delay(ep.attempts)

    async def _ensure_all(self, ep: Endpoint, specs: Sequence[TunnelSpec], now: float) -> bool:
        """Ensure every spec (concurrently: v4 and v6 at once); record the outcome per
        destination in `ep`. True if all are up."""
        shunt = self._group(ep) is Group.PRIVATE
        for spec in specs:
            # Pinned first, so that no lease expiry can slip in between setup and pin.
            self.tunnels.pin(spec.destination)
        results = await asyncio.gather(*(self.tunnels.ensure(s, now, shunt=shunt)
                                         for s in specs), return_exceptions=True)
        ok = True
        for spec, res in zip(specs, results, strict=True):
            dest = spec.destination
            if isinstance(res, ProvisioningError):
                ok = False
                ep.failures[dest] = str(res)
                # Still pinned: the Provisioner keeps this conn loaded (parked), so that the
                # peer can initiate to us; `_release_failed` lets go of it with the address.
                ep.code = failure_code(res)
                log_event(log, logging.WARNING, "endpoint-tunnel-failed", name=ep.name,
                          peer=dest, reason=str(res))
            elif isinstance(res, BaseException):
                raise res  # a bug: let the control server / timer loop report it
            else:
                ep.failures.pop(dest, None)
                ep.tunnels[dest] = spec
        return ok

    async def _release_failed(self, ep: Endpoint, dests: Sequence[Address], now: float
                              ) -> None:
        """Forget failed addresses of `ep` that have no tunnel, and release what the
        Provisioner keeps for them (a parked conn, the pin)."""
        for dest in dests:
            ep.failures.pop(dest, None)
            if dest in ep.tunnels:
                continue
            try:
                await self.tunnels.release(dest, now)
            except ProvisioningError as exc:
                log.warning("releasing %s of %s: %s", dest, display_name(ep.name), exc)

    async def _release(self, specs: Sequence[TunnelSpec], now: float) -> None:
        """Tear tunnels down now (`release` also unpins them)."""
        for spec in specs:
            try:
                await self.tunnels.release(spec.destination, now)
            except ProvisioningError as exc:
                log.warning("releasing tunnel %s to %s: %s", spec.name, spec.destination, exc)

    def _is_exempt(self, address: Address) -> bool:
        if self.policy is not None:
            return self.policy.is_exempt(address)
        return address.is_loopback or address.is_unspecified

    def _group(self, ep: Endpoint) -> Group | None:
        if ep.group is not None:
            return ep.group
        if self.policy is None:
            return None
        return self.policy.group_for(ep.name, ep.addresses)

    async def _observe(self, name: dns.name.Name, now: float, fresh: bool
                       ) -> Observation | Failure:
        results = await asyncio.gather(
            *(self._lookup(name, t, now, fresh)
              for t in (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.IPSECKEY)))
        return observe(name, *results)

    async def _lookup(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType,
                      now: float, fresh: bool = False) -> ValidatedAnswer | ResolverError:
        try:
            return await self.resolution.resolve(name, rdtype, now, fresh=fresh)
        except ResolverError as exc:  # anything else is a bug and propagates
            return exc

    async def _gateway_addresses(self, key: IpsecKey, now: float) -> tuple[Address, ...]:
        """Addresses of a gateway given by name, both families (`plan_tunnels` picks one per
        destination)."""
        if not isinstance(key.gateway, dns.name.Name):
            return ()
        found: list[Address] = []
        for rdtype in ADDRESS_TYPES:
            ans = await self._lookup(key.gateway, rdtype, now)
            if not isinstance(ans, ResolverError):
                found.extend(gateway_addresses(ans, key.gateway, rdtype))
        return tuple(found)

    async def _save(self, name: dns.name.Name) -> None:
        """Rule 6: the endpoint `name` (or its removal) on disk (off the event loop) before
        the operation returns."""
        if self._state is not None:
            self._state.mark("endpoints", name.to_text())
            await self._state.persist()

    def _record(self, section: str, key: str) -> Record:
        ep = self.endpoints.get(dns.name.from_text(key))
        if ep is None:
            return None
        entry = state_entry(ep)  # now: the endpoints are mutable
        return lambda: entry


