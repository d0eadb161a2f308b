"""Where log lines go and what they look like: journald or a terminal, and the rate limiter.

Events themselves are written with resolver.logs.event (`event=NAME key=value ...`). Under
systemd (JOURNAL_STREAM set and naming our stderr) lines carry no timestamp, since the journal
adds its own, and start with a `<N>` syslog priority prefix, which journald turns into the
entry's priority (`journalctl -p warning` works). Elsewhere they start with a timestamp and
the level name, as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

from resolver.logs.ratelimit import RateLimitFilter

JOURNAL_FORMAT: Final = "<%(priority)d>%(name)s: %(message)s"
PLAIN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                    logging.CRITICAL: 2}


class _PriorityFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        record.priority = priority  # read by JOURNAL_FORMAT
        text = super().format(record)
        # A traceback continues on more lines; each gets the prefix so journald keeps the level.
        return text.replace("\n", f"\n<{priority}>")


def under_journald(environ: Mapping[str, str] | None = None, stream: TextIO | None = None
                   ) -> bool:
    """True when `stream` (stderr) is connected to the journal (systemd sets JOURNAL_STREAM
    to "DEV:INODE" of the stream it gave us; a child whose stderr was redirected is not)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: int, *, environ: Mapping[str, str] | None = None,
                  stream: TextIO | None = None, **limits: Any) -> logging.Handler:
    """Configure the root logger: the format for where stderr goes, and the rate limiter.

    Returns the handler (tests read what it wrote). `limits` go to RateLimitFilter.
    """
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    if under_journald(environ, out):
        handler.setFormatter(_PriorityFormatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(RateLimitFilter(**limits))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
