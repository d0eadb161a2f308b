"""systemd's service notification protocol (sd_notify), spoken directly.

Theory of operation. Under a unit with `Type=notify`, systemd passes the path of a datagram
socket in $NOTIFY_SOCKET; a service says `READY=1` once it serves, `STATUS=...` for
`systemctl status`, `STOPPING=1` on the way out, and, with `WatchdogSec=`, `WATCHDOG=1` more
often than every $WATCHDOG_USEC microseconds or systemd kills and restarts it. The protocol
is one `sendto` of newline-separated KEY=VALUE lines to that socket (an abstract socket when
the path starts with "@"), which is why there is no dependency for it.

The watchdog pings come from a task on the daemon's event loop, so they stop exactly when the
loop stops turning (a blocking call, a busy loop): that is the failure the watchdog exists to
catch. Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd, if it asked for them.

    Args:
        environ: where NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID are read (a parameter
            for tests; the daemon passes os.environ).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if path.startswith("@"):
            self.address = "\0" + path[1:]
        elif path.startswith("/"):
            self.address = path
        self.watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process meant; a child that inherited the variables is not.
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """Send KEY=VALUE lines (`notify(READY="1", STATUS="...")`). False if not sent."""
        if self.address is None:
            return False
        text = "\n".join(f"{k}={v}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.warning("event=sd-notify-failed reason=%r", exc.strerror or str(exc))
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self) -> None:
        self.notify(STOPPING="1", STATUS="shutting down")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval until cancelled (returns at once without)."""
        if not self.enabled or self.watchdog_usec <= 0:
            return
        interval = self.watchdog_usec / 1e6 / 2
        log.info("event=watchdog-enabled interval=%gs", self.watchdog_usec / 1e6)
        while True:
            self.notify(WATCHDOG="1")
            await asyncio.sleep(interval)
