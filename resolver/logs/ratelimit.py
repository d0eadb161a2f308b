"""A logging.Filter that keeps repeated warnings from flooding the log, and says how many.

Theory of operation. Only WARNING and above are limited (info lines are one per operator
action or state change; debug is asked for). Two budgets, both per `interval` seconds:

  * the same line (same logger, level and text) passes once; repeats are counted;
  * one kind of event (`event=` name, or the message template) passes `burst` times with
    different texts (a flood of distinct names under attack); the rest are counted.

The next line of that kind to pass after the window carries the count of what was held back:
` repeated=N` for the same line, ` suppressed=N` for others of its kind. So a peer failing
every second for a minute costs about six lines, each saying how many it stands for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    start: float
    passed: int = 0
    held: int = 0


class RateLimitFilter(logging.Filter):
    """Args: interval (seconds), burst (distinct lines of one kind per interval), clock."""

    MAX_KEYS = 4096  # bounded memory: windows are forgotten when this many are open

    def __init__(self, interval: float = 10.0, burst: int = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self._lines: dict[tuple[str, int, str], _Window] = {}
        self._kinds: dict[tuple[str, int, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self.clock()
        text = record.getMessage()
        kind = str(getattr(record, "event", None) or record.msg)
        line_key = (record.name, record.levelno, text)
        kind_key = (record.name, record.levelno, kind)
        if len(self._lines) > self.MAX_KEYS:
            self._forget(now)
        line = self._window(self._lines, line_key, now)
        if line.passed:
            line.held += 1
            return False
        group = self._window(self._kinds, kind_key, now)
        if group.passed >= self.burst:
            group.held += 1
            return False
        line.passed += 1
        group.passed += 1
        extra = ""
        if line.held:
            extra += f" repeated={line.held}"
            line.held = 0
        if group.held:
            extra += f" suppressed={group.held}"
            group.held = 0
        if extra:
            record.msg, record.args = text + extra, None
        return True

    def _window(self, table: dict[tuple[str, int, str], _Window], key: tuple[str, int, str],
                now: float) -> _Window:
        w = table.get(key)
        if w is None:
            w = table[key] = _Window(now)
        elif now - w.start >= self.interval:
            # A new window: the count held back in the old one is carried into it, so the
            # next line to pass reports it.
            w.start, w.passed = now, 0
        return w

    def _forget(self, now: float) -> None:
        for table in (self._lines, self._kinds):
            for key in [k for k, w in table.items() if now - w.start >= self.interval]:
                del table[key]
