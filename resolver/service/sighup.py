"""SIGHUP outside the running daemon's handler: held, never fatal.

Why: SIGHUP's default action ends the process, and the daemon's real handler (the reload,
resolver/service/runtime.py) can only be installed on the event loop at start-up step 6 (serve),
after
reconcile, which can take many seconds (peers that time out, an IKE daemon that is slow to
answer). A `systemctl reload`, a `kill -HUP` from a script or a NetworkManager hook in that
window would have killed the daemon half-way through reconcile. So the program's entry point
(resolver/__main__.py) calls `hold()` before it imports anything heavy: from then on a SIGHUP
is only counted. When the runtime installs its own handler it calls `take()` and, if any
arrived, reloads once (one reload reads the file as it is then, which covers them all). On
shutdown the runtime calls `hold()` again, so a SIGHUP during the last seconds is not fatal
either.

Only the main thread may set a signal handler (Python's rule); `hold` is called there.
"""

from __future__ import annotations

import signal
from types import FrameType

_pending = 0


def _note(_signum: int, _frame: FrameType | None) -> None:
    global _pending
    _pending += 1


def hold() -> None:
    """From now on a SIGHUP is counted, not fatal (until another handler replaces this)."""
    signal.signal(signal.SIGHUP, _note)


def take() -> int:
    """How many SIGHUPs were held since the last `take` (and forget them)."""
    global _pending
    count, _pending = _pending, 0
    return count
