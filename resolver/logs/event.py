"""Log lines as events: one event per line, stable `key=value` fields (logfmt).

An event is logged as `event=NAME key=value ...`, with the keys the operator greps for
(`name`, `peer`, `reason`, `ede`) spelled the same everywhere. A value with spaces, quotes or
`=` is double-quoted with backslash escapes, so a line splits back into its fields
unambiguously (as journald users, Loki and `grep reason=` expect). Pure: the core may use it.
"""

from __future__ import annotations

import logging


def quote(value: object) -> str:
    """A field value as logfmt writes it: bare if it can be, else double-quoted."""
    text = str(value)
    if text and not any(c in text for c in ' "=\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def event_text(event: str, **fields: object) -> str:
    """`event=EVENT k=v ...` (fields whose value is None are left out)."""
    parts = [f"event={event}"]
    parts += [f"{k}={quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log one event line; the rate limiter groups repeats by `event` and the whole line."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", event_text(event, **fields), extra={"event": event})
