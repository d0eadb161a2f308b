"""Which upstream answers: the forwarders, or iteration from the root (`[upstream] mode`).

Theory of operation
-------------------
`UpstreamSelector` is the `Upstream` the resolution core asks (resolve.py): it passes every question
to the path in use, a `Forwarder` (upstream/forward.py) or an `Iterator` (iterate/iterator.py),
which keep their own contract, so the validator and the caches do not know which one it was.

* `mode = "forward"`: the forwarders, whatever they do (no forwarder: SERVFAIL, EDE 22).
* `mode = "iterate"`: the root servers, never a forwarder.
* `mode = "auto"` (the default): each forwarder is probed (upstream/probe.py: the root DNSKEY
  and a DS must come back signed and validate); we forward to those that pass, in their
  order, and iterate when none does: they strip or mangle DNSSEC, do not answer, or there is
  no forwarder at all (resolv.conf lists only us). Validation is never given up: a failing
  forwarder costs speed and privacy towards the root servers, never security.

The decision is the pure `choose(mode, servers, results)`. Probes run in a task of their own
(`run`), woken by: the forwarder list changing (the resolv.conf watch, SIGHUP), a timer every
`probe_interval` seconds while forwarders exist but none passed, and suspicion while
forwarding (an upstream error, or a bogus or indeterminate verdict, seen through
`note_verdict`; at most one such probe per `SUSPECT_HOLDOFF` seconds on one path, so a
genuinely broken zone costs one probe now and then, not one per query). Questions asked
before the first decision wait for it (bounded by the probe's own timeouts); later ones use
the path in use while a new probe runs.

A switch (another path, or other forwarders) is logged once, with the reason
(`event=upstream-switch path=iterate reason="192.168.1.1:53 strips or mangles DNSSEC
(...)"`), and calls
`on_switch` (the daemon flushes the bogus and failure entries the old upstream may have
caused: Resolution.flush_failures). `status()` is what the control socket's `upstream`
request returns: mode, path, reason, since when, the forwarders and the last probe's
results. The iterator is made when first needed and kept across switches (its delegation
cache stays warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import dns.message
import dns.name
import dns.rdatatype

from resolver.config import HostPort, UpstreamConfig
from resolver.errors import ConfigError, UpstreamError
from resolver.iterate.iterator import Iterator
from resolver.iterate.net import IterStats
from resolver.logs.event import log_event
from resolver.resolve import Upstream
from resolver.tasks import cancel_and_wait
from resolver.upstream.forward import EDNS_PAYLOAD, Forwarder, current_budget
from resolver.upstream.probe import MakeValidator, ProbeResult, probe
from resolver.upstream.tls import client_context
from resolver.validator.response import Security, Verdict
from resolver.validator.types import Limits

log = logging.getLogger(__name__)

# Seconds between probes started by suspicion on the same path (a switch starts afresh: the
# first failure of a new forwarder is news, the tenth bogus answer from a broken zone is not).
SUSPECT_HOLDOFF: Final = 5.0


class Route(enum.Enum):
    """Where questions go."""

    FORWARD = "forward"
    ITERATE = "iterate"
    NONE = "none"  # forward mode without a forwarder: every question fails


@dataclass(frozen=True, slots=True)
class Choice:
    """A decision: the path, the forwarders used (FORWARD), and why, in a sentence."""

    path: Route
    servers: tuple[HostPort, ...] = ()
    reason: str = ""

    def describe(self) -> str:
        """For the log: `forwarding to A, B` / `iterating from the root` / `no upstream`."""
        if self.path is Route.FORWARD:
            return "forwarding to " + ", ".join(map(str, self.servers))
        return "iterating from the root" if self.path is Route.ITERATE else "no upstream"


def choose(mode: str, servers: Sequence[HostPort], results: Sequence[ProbeResult] = (), *,
           source: str = "") -> Choice:
    """The path for `mode` given the forwarders and (auto) their probe results.

    Args:
        mode: "auto", "forward" or "iterate".
        servers: the configured forwarders, in order.
        results: auto: one probe result per server (others count as not probed: unused).
        source: where the forwarders come from, for reasons ("/etc/resolv.conf").
    """
    where = f" in {source}" if source else ""
    if mode == "iterate":
        return Choice(Route.ITERATE, (), "mode = \"iterate\"")
    if not servers:
        none = f"no forwarder{where} (ourselves excluded)"
        if mode == "forward":
            return Choice(Route.NONE, (), none)
        return Choice(Route.ITERATE, (), none)
    if mode == "forward":
        return Choice(Route.FORWARD, tuple(servers), "mode = \"forward\"")
    by_server = {r.server: r for r in results}
    passed = tuple(s for s in servers if s in by_server and by_server[s].ok)
    failed = [str(by_server[s]) for s in servers if s in by_server and not by_server[s].ok]
    if passed:
        reason = "passed the DNSSEC probe" + (f"; not used: {'; '.join(failed)}"
                                              if failed else "")
        return Choice(Route.FORWARD, passed, reason)
    if not failed:
        return Choice(Route.ITERATE, (), "forwarders not probed yet")
    return Choice(Route.ITERATE, (), "; ".join(failed))


class UpstreamSelector:
    """The resolver's upstream: forwarders or the iterator, as `choose` says (module doc).

    Args:
        config: [upstream].
        make_validator: a fresh validator over a fetch function (for probes).
        limits: the iterator's limits.
        payload: our EDNS payload size.
        clock: POSIX time (signature validity in probes; `since` in the status).
        make_forwarder, make_iterator: factories (tests put fakes here).

    Raises:
        ConfigError: `tls_ca_file` is unusable.
    """

    def __init__(self, config: UpstreamConfig, make_validator: MakeValidator, *,
                 limits: Limits | None = None, payload: int = EDNS_PAYLOAD,
                 clock: Callable[[], float] = time.time,
                 make_forwarder: Callable[[Sequence[HostPort], int], Upstream] | None = None,
                 make_iterator: Callable[[], Upstream] | None = None) -> None:
        self.make_validator = make_validator
        self.clock = clock
        self.payload = payload
        self.limits = limits if limits is not None else Limits()
        self._make_forwarder = make_forwarder or self._forwarder
        self._make_iterator = make_iterator or self._iterator
        self.config = config
        self.servers: tuple[HostPort, ...] = config.servers
        self.source = str(config.resolv_conf) if config.from_resolv_conf else ""
        self._tls = tls_context(config)
        self.choice = Choice(Route.NONE, (), "starting")
        self.since = clock()
        self.results: tuple[ProbeResult, ...] = ()
        self.last_probe: float | None = None
        self.on_switch: list[Callable[[Choice, Choice], None]] = []
        self._target: Upstream | None = None
        self._iterator_obj: Upstream | None = None
        # The counts of iterators a reload replaced, so the metrics never go backwards.
        self._iteration_carry: dict[str, int] = {}
        self._decided = asyncio.Event()
        self._wake = asyncio.Event()
        self._wake.set()  # the first decision
        self._last_suspect = float("-inf")
        self._task: asyncio.Task[None] | None = None

    # -- the Upstream interface --------------------------------------------------------------

    async def query(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType, *,
                    cd: bool = True, recheck: bool = False) -> dns.message.Message:
        """Ask the path in use (waiting for the first decision); `recheck` is passed on.

        Raises:
            UpstreamError: the path failed, or there is none (forward mode, no forwarder).
        """
        if not self._decided.is_set():
            await self._decided.wait()
        target, choice = self._target, self.choice
        if target is None:
            raise UpstreamError(f"no upstream: {choice.reason}")
        try:
            return await target.query(qname, qtype, cd=cd, recheck=recheck)
        except UpstreamError as e:
            budget = current_budget.get()
            if choice.path is Route.FORWARD and not (budget and budget.used > budget.limit):
                self.suspect(str(e))
            raise

    # -- what changes the decision -------------------------------------------------------------

    def set_servers(self, servers: Sequence[HostPort], source: str = "") -> None:
        """New forwarders (the resolv.conf watch): probe them (auto) and switch."""
        servers = tuple(servers)
        if servers == self.servers:
            return
        log_event(log, logging.INFO, "forwarders-changed", source=source or None,
                  servers=", ".join(map(str, servers)) or "none")
        self.servers = servers
        if source:
            self.source = source
        self._wake.set()

    def reconfigure(self, config: UpstreamConfig, limits: Limits, payload: int) -> None:
        """A reloaded [upstream] (SIGHUP): new mode, forwarders, timeouts, hints or limits.

        Raises:
            ConfigError: `tls_ca_file` is unusable (nothing is changed then).
        """
        tls = tls_context(config)
        rebuild = (config.root_hints, config.timeout, config.attempts, config.tcp_timeout,
                   limits, payload) != (self.config.root_hints, self.config.timeout,
                                        self.config.attempts, self.config.tcp_timeout,
                                        self.limits, self.payload)
        self.config, self.limits, self.payload, self._tls = config, limits, payload, tls
        self.servers = config.servers
        self.source = str(config.resolv_conf) if config.from_resolv_conf else ""
        if rebuild:
            self._iteration_carry = self.iteration_counts()
            self._iterator_obj = None
        # The path in use is rebuilt with the new settings at once; the decision follows.
        self._target_for(self.choice)
        self._wake.set()

    def suspect(self, why: str) -> None:
        """Something went wrong while forwarding: probe again (at most every few seconds)."""
        if self.config.mode != "auto" or self.choice.path is not Route.FORWARD:
            return
        now = time.monotonic()
        if now - self._last_suspect < SUSPECT_HOLDOFF:
            return
        self._last_suspect = now
        log.debug("forwarder suspected (%s); probing again", why)
        self._wake.set()

    def note_verdict(self, verdict: Verdict) -> None:
        """Resolution.on_verdict: bogus or indeterminate answers while forwarding are
        suspicious (a router that started stripping)."""
        if verdict.security in (Security.BOGUS, Security.INDETERMINATE):
            self.suspect(f"{verdict.security.value}: {verdict.reason}")

    # -- the task ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start deciding (the first probe at once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name="upstream-select", context=contextvars.Context())

    async def close(self) -> None:
        """Stop the task."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def run(self) -> None:
        """Decide whenever woken (module doc); never returns."""
        while True:
            interval = self._retry_interval()
            if interval is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                await self.decide()
            except Exception:  # a bug must not stop the selection for good
                log.exception("upstream selection failed; keeping %s", self.choice.describe())
                self._decided.set()

    def _retry_interval(self) -> float | None:
        if (self.config.mode == "auto" and self.servers
                and self.choice.path is not Route.FORWARD):
            return self.config.probe_interval
        if self.config.mode == "auto" and self.choice.path is Route.FORWARD and any(
                not r.ok for r in self.results):
            return self.config.probe_interval  # a failed one may be back: use it again
        return None

    async def decide(self) -> Choice:
        """Probe (auto) and apply the choice; returns it."""
        servers, mode = self.servers, self.config.mode
        results: tuple[ProbeResult, ...] = ()
        if mode == "auto" and servers:
            results = await self.probe_all(servers)
            if servers != self.servers or mode != self.config.mode:
                return self.choice  # changed while probing: the next round decides
            self.last_probe = self.clock()
        self.results = results  # none when nothing was probed: old ones would mislead
        choice = choose(mode, servers, results, source=self.source)
        self._apply(choice)
        return choice

    async def probe_all(self, servers: Sequence[HostPort]) -> tuple[ProbeResult, ...]:
        """Probe every forwarder at once; one result each, in order."""
        probe_ds = dns.name.from_text(self.config.probe_ds)
        now = self.clock()

        async def one(server: HostPort) -> ProbeResult:
            # attempts=1: a probe wants to know about this server now, not after retries.
            forwarder = self._make_forwarder((server,), 1)
            return await probe(server, lambda n, t: forwarder.query(n, t, cd=True),
                               self.make_validator, now, probe_ds)

        return tuple(await asyncio.gather(*(one(s) for s in servers)))

    def _apply(self, choice: Choice) -> None:
        old = self.choice
        changed = (choice.path, choice.servers) != (old.path, old.servers)
        if changed or self._target is None:
            self._target_for(choice)
        self.choice = choice
        if changed:
            self.since = self.clock()
            self._last_suspect = float("-inf")
            level = logging.INFO if choice.path is Route.FORWARD else logging.WARNING
            log_event(log, level, "upstream-switch", path=choice.path.value,
                      servers=", ".join(map(str, choice.servers)) or None,
                      reason=choice.reason)
            for hook in self.on_switch:
                hook(old, choice)
        else:
            log.debug("upstream unchanged: %s: %s", choice.describe(), choice.reason)
        self._decided.set()

    def _target_for(self, choice: Choice) -> None:
        if choice.path is Route.FORWARD and choice.servers:
            self._target = self._make_forwarder(choice.servers, self.config.attempts)
        elif choice.path is Route.ITERATE:
            self._target = self.iterator()
        else:
            self._target = None

    def iteration_counts(self) -> dict[str, int]:
        """What the iterators did since start-up (`IterStats` fields summed over every
        iterator this selector made); {} while none was made."""
        counts = dict(self._iteration_carry)
        stats = getattr(self._iterator_obj, "stats", None)
        if isinstance(stats, IterStats):
            for name, value in asdict(stats).items():
                counts[name] = counts.get(name, 0) + value
        return counts

    def iterator(self) -> Upstream:
        """The iterator, made on first use and kept (its delegation cache stays warm)."""
        if self._iterator_obj is None:
            self._iterator_obj = self._make_iterator()
        return self._iterator_obj

    # -- status --------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What the control socket's `upstream` request returns (JSON-serialisable)."""
        return {
            "mode": self.config.mode,
            "path": self.choice.path.value,
            "using": [str(s) for s in self.choice.servers],
            "reason": self.choice.reason,
            "since": self.since,
            "forwarders": [str(s) for s in self.servers],
            "source": self.source or "config",
            "last_probe": self.last_probe,
            "probes": [{"server": str(r.server), "status": r.status.name.lower(),
                        "reason": r.reason} for r in self.results],
        }

    # -- factories -----------------------------------------------------------------------------

    def forwarder_options(self, attempts: int) -> dict[str, Any]:
        """Keyword arguments for a `Forwarder` (or subclass) with the current settings."""
        c = self.config
        return {"timeout": c.timeout, "attempts": attempts, "tcp_timeout": c.tcp_timeout,
                "payload": self.payload, "tls": self._tls}

    def _forwarder(self, servers: Sequence[HostPort], attempts: int) -> Upstream:
        return Forwarder(servers, **self.forwarder_options(attempts))

    def _iterator(self) -> Upstream:
        c = self.config
        return Iterator(c.root_hints, limits=self.limits, timeout=c.timeout,
                        attempts=c.attempts, tcp_timeout=c.tcp_timeout, payload=self.payload)


def tls_context(config: UpstreamConfig) -> ssl.SSLContext | None:
    """The TLS context for tls:// forwarders (None without any).

    Raises:
        ConfigError: `tls_ca_file` cannot be read or holds no CA certificate.
    """
    if not any(s.tls_name for s in config.servers) and config.tls_ca_file is None:
        return None
    try:
        return client_context(config.tls_ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[upstream] key 'tls_ca_file': {config.tls_ca_file}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
