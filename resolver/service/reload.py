"""SIGHUP: read the configuration again and apply what can change without a restart.

Theory of operation: `Reloader.reload()` loads the file (with the same command-line
overrides) and checks *everything* it would apply before touching anything: the file parses,
the trust anchors load, [policy] and the other tables parse, a tls_ca_file works. Any error
keeps the running configuration, and one log line says why (`event=reload-failed file=FILE
reason="FILE: [TABLE] key 'K': ...; keeping the running configuration"`). Then
`changes(old, new)` lists what differs, key by key (`event=reload changes="[policy] block:
(unset) -> [ads.example.]"`), and what can be swapped is swapped in place:

  [upstream]  the selector takes the new mode, forwarders, timeouts, hints (upstream/select);
              the resolv.conf watch follows a new `resolv_conf` path.
  [dnssec]    new trust anchors: a new validator, and every cached verdict, raw response and
              final reply is dropped (they were judged against the old anchors).
  [limits]    a new validator and iterator with the new limits; the caches stay.
  [cache]     TTL bounds at once (entries already cached keep their expiry); max_entries
              needs a restart.
  [policy]    Policy.reconfigure (capture, provisioner and endpoint manager share the object);
              the final-reply cache is dropped, tunnels stay up (a lease runs out as before).
  [log]       the level.

[server] (sockets), [identity], [provision] and [control] need a restart: the log says so,
and the running values are kept (and compared against at the next reload, so the line
repeats until the restart). The cache, the tunnels and the pinned endpoints are never
dropped by a reload, except the verdicts new anchors invalidate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from resolver.cache import WireCache
from resolver.config import Config
from resolver.errors import ConfigError
from resolver.logs.event import log_event
from resolver.policy import Policy, PolicyConfig
from resolver.resolve import Fetch, PlainHandler, Resolution, Validating
from resolver.upstream.resolvconf import ResolvConfWatch
from resolver.upstream.select import UpstreamSelector, tls_context
from resolver.validator.anchors import TrustAnchors
from resolver.validator.types import Limits

log = logging.getLogger(__name__)

APPLIED: Final = ("upstream", "dnssec", "limits", "cache", "log", "policy")
RESTART: Final = ("server", "identity", "provision", "control")
_RESTART_KEYS: Final = {("cache", "max_entries")}


def _fields(value: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return dict(value) if isinstance(value, Mapping) else {}


def _show(value: object) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def table_of(config: Config, name: str) -> dict[str, Any]:
    """One table of a Config as key -> value (its dataclass, or the raw passthrough)."""
    if name in config.sections:
        return dict(config.sections[name])
    return _fields(getattr(config, name, None))


@dataclass(frozen=True, slots=True)
class Change:
    """One key that differs: `[table] key: old -> new`."""

    table: str
    key: str
    old: object
    new: object

    @property
    def needs_restart(self) -> bool:
        """True for what a reload does not apply."""
        return self.table in RESTART or (self.table, self.key) in _RESTART_KEYS

    def __str__(self) -> str:
        return f"[{self.table}] {self.key}: {_show(self.old)} -> {_show(self.new)}"


def changes(old: Config, new: Config) -> list[Change]:
    """Every key whose value differs between two configurations (tables in a fixed order)."""
    out: list[Change] = []
    for table in (*APPLIED, *RESTART):
        a, b = table_of(old, table), table_of(new, table)
        for key in [*a, *(k for k in b if k not in a)]:
            missing = object()
            va, vb = a.get(key, missing), b.get(key, missing)
            if va != vb:
                out.append(Change(table, key, "(unset)" if va is missing else va,
                                  "(unset)" if vb is missing else vb))
    return out


@dataclass(slots=True)
class Running:
    """The swappable parts of the running daemon."""

    resolution: Resolution
    selector: UpstreamSelector
    wire_cache: WireCache
    watch: ResolvConfWatch | None = None
    policy: Policy | None = None
    plain: PlainHandler | None = None


class Reloader:
    """Reloads on request (SIGHUP), one reload at a time.

    Args:
        config: the configuration running now.
        load: reads the file again (with the command line's overrides).
        parts: what can be swapped.
        build_anchors: the trust anchors of a configuration (raises ConfigError).
        new_validator: a validator for (anchors, limits, fetch).
        check: parses the tables other modules own (raises ConfigError).
        make_watch: a started resolv.conf watch, for a configuration that starts following a
            file.
    """

    def __init__(self, config: Config, load: Callable[[], Config], parts: Running, *,
                 build_anchors: Callable[[Config], TrustAnchors],
                 new_validator: Callable[[TrustAnchors, Limits, Fetch], Validating],
                 check: Callable[[Config], None] = lambda _c: None,
                 make_watch: Callable[[Config], ResolvConfWatch | None] = lambda _c: None
                 ) -> None:
        self.config, self.load, self.parts = config, load, parts
        self.build_anchors, self.new_validator = build_anchors, new_validator
        self.check, self.make_watch = check, make_watch
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        self.reloads = 0  # successful reloads (tests)

    def request(self) -> None:
        """The SIGHUP handler: reload in a task (signal handlers must not block)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Reload now; True if the new configuration was applied (maybe partly: restart)."""
        async with self._lock:
            where = str(self.config.path or "(defaults)")
            try:
                new = self.load()
                anchors = self.build_anchors(new)
                self.check(new)
                policy = self._policy_config(new)
                tls_context(new.upstream)
            except ConfigError as e:
                log_event(log, logging.ERROR, "reload-failed", file=where, reason=f"{e}; "
                          "keeping the running configuration")
                return False
            except Exception:  # a bug in a parser must not take the daemon down
                log.exception("reload of %s failed, keeping the running configuration (a bug)",
                              where)
                return False
            found = changes(self._followed(self.config, new), new)
            if not found:
                log_event(log, logging.INFO, "reload", file=where, changes="none")
                self.reloads += 1
                return True
            await self._apply(new, anchors, policy,
                              {c.table for c in found if not c.needs_restart})
            applied = [str(c) for c in found if not c.needs_restart]
            later = [str(c) for c in found if c.needs_restart]
            if applied:
                log_event(log, logging.INFO, "reload", file=where, changes="; ".join(applied))
            if later:
                log_event(log, logging.WARNING, "reload-needs-restart", file=where,
                          changes="; ".join(later))
            self.config = self._running(new)
            self.reloads += 1
            return True

    @staticmethod
    def _followed(old: Config, new: Config) -> Config:
        """`old` with the forwarders `new` read, if both follow the same resolv.conf: a
        change there is the file watch's news (already applied), not the reload's."""
        a, b = old.upstream, new.upstream
        if a.from_resolv_conf and b.from_resolv_conf and a.resolv_conf == b.resolv_conf:
            return dataclasses.replace(old, upstream=dataclasses.replace(a, servers=b.servers))
        return old

    def _policy_config(self, new: Config) -> PolicyConfig | None:
        if self.parts.policy is None:
            return None
        return PolicyConfig.from_section(new.sections.get("policy", {}),
                                         str(new.path or "config"))

    def _running(self, new: Config) -> Config:
        """`new`, with the parts a reload does not apply kept as they run."""
        old = self.config
        sections = {k: v for k, v in new.sections.items() if k not in RESTART}
        sections.update({k: v for k, v in old.sections.items() if k in RESTART})
        cache = dataclasses.replace(new.cache, max_entries=old.cache.max_entries)
        return dataclasses.replace(new, server=old.server, cache=cache, sections=sections)

    async def _apply(self, new: Config, anchors: TrustAnchors, policy: PolicyConfig | None,
                     tables: set[str]) -> None:
        parts, res = self.parts, self.parts.resolution
        if "log" in tables:
            logging.getLogger().setLevel(new.log.level.upper())
        if "dnssec" in tables or "limits" in tables:
            res.validator = self.new_validator(anchors, new.limits, res.fetch)
            parts.selector.make_validator = (
                lambda fetch: self.new_validator(anchors, new.limits, fetch))
            res.max_upstream_queries = new.limits.max_fetches
        if "dnssec" in tables:
            res.answers.clear()
            res.raw.clear()
            parts.wire_cache.clear()
        if "cache" in tables:
            res.config = dataclasses.replace(new.cache, max_entries=res.config.max_entries)
            if parts.plain is not None:
                parts.plain.max_ttl = new.cache.max_ttl
        if "upstream" in tables or "limits" in tables:
            await self._follow(new)
            # [server] needs a restart: the payload stays the running one.
            parts.selector.reconfigure(new.upstream, new.limits,
                                       self.config.server.edns_payload)
        if "policy" in tables and policy is not None and parts.policy is not None:
            parts.policy.reconfigure(policy)
            parts.wire_cache.clear()

    async def _follow(self, new: Config) -> None:
        """Keep the resolv.conf watch in line with [upstream]: stop it when the forwarders
        are listed in the file, start it when they no longer are, or watch another path."""
        up, watch = new.upstream, self.parts.watch
        if not up.from_resolv_conf:
            if watch is not None:
                await watch.close()
                self.parts.watch = None
        elif watch is None:
            self.parts.watch = self.make_watch(new)
        else:
            watch.retarget(up.resolv_conf, self.config.server.listen)
            watch.servers = up.servers
