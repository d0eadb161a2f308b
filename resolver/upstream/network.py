"""Wiring for following the network: the upstream selector's task, the resolv.conf watch, the
flush on a switch, and the control socket's `upstream` request.

Theory of operation: `start_network(cfg, selector, resolution)` connects the pieces the daemon
runs for its upstream, so cli.py only starts and stops one object:

* the selector (upstream/select.py) decides in its own task; every switch flushes the bogus
  and failure entries the old upstream may have caused (`Resolution.flush_failures`), and
  every verdict is shown to it (`note_verdict`: bogus answers while forwarding make it probe
  again);
* when the forwarders come from a file, a `ResolvConfWatch` (upstream/resolvconf.py) feeds
  changes of that file to `selector.set_servers`;
* `ops` is the control socket's extra request table: `upstream` -> `selector.status()`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from resolver.config import Config
from resolver.logs.event import log_event
from resolver.resolve import Resolution
from resolver.upstream.resolvconf import ResolvConfWatch
from resolver.upstream.select import Choice, UpstreamSelector

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Network:
    """The running upstream machinery (see the module docstring)."""

    selector: UpstreamSelector
    resolution: Resolution
    watch: ResolvConfWatch | None = None
    ops: dict[str, Callable[[float], Awaitable[Any]]] = field(default_factory=dict)

    def make_watch(self, cfg: Config) -> ResolvConfWatch | None:
        """A started watch of `cfg`'s resolv_conf (None if the forwarders are listed)."""
        if not cfg.upstream.from_resolv_conf:
            return None
        watch = ResolvConfWatch(cfg.upstream.resolv_conf, cfg.server.listen,
                                self.selector.set_servers, servers=cfg.upstream.servers)
        watch.start()
        self.watch = watch
        return watch

    async def close(self) -> None:
        """Stop the watch and the selector's task."""
        if self.watch is not None:
            await self.watch.close()
        await self.selector.close()


def start_network(cfg: Config, selector: UpstreamSelector, resolution: Resolution) -> Network:
    """Hook the selector to the resolution core, start it and the resolv.conf watch."""
    net = Network(selector, resolution)

    def flush(old: Choice, new: Choice) -> None:
        dropped = resolution.flush_failures()
        if dropped:
            log_event(log, logging.INFO, "upstream-flush", dropped=dropped,
                      reason="bogus or failed answers the old upstream may have caused")

    selector.on_switch.append(flush)
    resolution.on_verdict.append(selector.note_verdict)
    selector.start()
    net.make_watch(cfg)
    async def upstream(_now: float) -> Any:
        return selector.status()

    net.ops["upstream"] = upstream
    return net
