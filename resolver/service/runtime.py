"""What makes the daemon a service: systemd notifications, signals, metrics, debug hooks.

Theory of operation. `ServiceRuntime` is created by cli.serve() once the parts are built and
the listeners are bound. `start()` then:

  1. starts the optional Prometheus listener ([metrics] listen);
  2. installs SIGHUP: `reload` (resolver/service/reload.py's Reloader.request, set by cli.serve) if
     there is one, else one log line that nothing was reloaded (the daemon must never die
     on `systemctl reload`);
  3. tells systemd READY=1 and starts the watchdog task (WATCHDOG=1 from the event loop);
  4. reloads once if SIGHUPs arrived before step 2 (resolver/service/sighup.py held them since the
     program started: a reload during start-up is applied, not fatal, and not lost).

`control_ops()` gives the control socket its extra operations: `stats` always, `debug-hang`
only with `[debug] allow_hang = true` (it blocks the event loop on purpose, so a test can see
the watchdog restart a hung daemon; it blocks for HANG_SECONDS). `close()` says STOPPING=1
and stops the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from resolver.logs.event import log_event
from resolver.metrics.http import MetricsListener
from resolver.metrics.metered import DaemonMetrics
from resolver.service import sighup
from resolver.service.config import DebugConfig, MetricsConfig
from resolver.service.sdnotify import Notifier
from resolver.tasks import cancel_and_wait

log = logging.getLogger("resolver")

HANG_SECONDS: Final = 300  # far beyond any sensible WatchdogSec


Op = Callable[[float], Awaitable[Any]]


class ServiceRuntime:
    """The service-facing parts of one daemon run (see the module docstring)."""

    def __init__(self, metrics: DaemonMetrics, sections: Mapping[str, Mapping[str, Any]],
                 source: str, notifier: Notifier | None = None) -> None:
        self.metrics = metrics
        self.metrics_config = MetricsConfig.from_section(sections.get("metrics", {}), source)
        self.debug = DebugConfig.from_section(sections.get("debug", {}), source)
        self.notifier = notifier or Notifier()
        self.listener: MetricsListener | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.reloads = 0
        self.reload: Callable[[], None] | None = None  # SIGHUP's work (resolver/service/reload.py)

    def control_ops(self) -> dict[str, Op]:
        """Extra control-socket operations: name -> async fn(now) returning the result."""
        ops: dict[str, Op] = {"stats": self._stats}
        if self.debug.allow_hang:
            ops["debug-hang"] = self._hang
        return ops

    async def start(self, status: str) -> None:
        """Metrics listener, SIGHUP, READY=1, watchdog (in that order: READY means serving).

        Raises:
            ConfigError: the metrics address cannot be bound.
        """
        if self.metrics_config.listen is not None:
            self.listener = MetricsListener(self.metrics.registry, self.metrics_config.listen)
            await self.listener.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self.notifier.ready(status)
        self._watchdog = asyncio.create_task(self.notifier.watchdog(), name="sd-watchdog")
        # SIGHUPs before this point (resolver/service/sighup.py): apply them now
        held = sighup.take()
        if held:
            log_event(log, logging.INFO, "reload-deferred", signals=held,
                      reason="SIGHUP received during start-up; reloading now that the daemon "
                             "serves")
            self._sighup()

    async def close(self) -> None:
        self.notifier.stopping()
        if self._watchdog is not None:
            await cancel_and_wait(self._watchdog)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        sighup.hold()  # removing the handler restored SIGHUP's default: ending the process
        if self.listener is not None:
            await self.listener.close()
        self.notifier.close()

    def _sighup(self) -> None:
        self.reloads += 1
        if self.reload is not None:
            self.reload()
            return
        log_event(log, logging.WARNING, "reload-ignored",
                  reason="configuration reload is not implemented yet; restart to apply "
                         "changes")
        self.notifier.status("running (SIGHUP received: nothing reloaded; restart to apply)")

    async def _stats(self, now: float) -> Any:
        return {"now": now, "metrics": self.metrics.registry.snapshot()}

    async def _hang(self, now: float) -> Any:
        log_event(log, logging.WARNING, "debug-hang", seconds=HANG_SECONDS,
                  reason="[debug] allow_hang: blocking the event loop on request")
        # After the reply is written: the client learns it was accepted, then the loop stops.
        asyncio.get_running_loop().call_later(0.2, time.sleep, HANG_SECONDS)
        return {"hanging": HANG_SECONDS}
