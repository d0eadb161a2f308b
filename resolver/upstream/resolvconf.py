"""Following the network: the resolv.conf file the network stack keeps current, re-read on change.

Theory of operation: when `[upstream] servers` is not set, the forwarders are the nameservers
of `[upstream] resolv_conf` (/etc/resolv.conf by default; /run/systemd/resolve/resolv.conf,
/run/NetworkManager/no-stub-resolv.conf or a file a DHCP hook writes are better choices once
/etc/resolv.conf points at us, see README), minus this resolver itself
(config.nameservers_in). `ResolvConfWatch` polls that file once a second and calls
`on_change(servers)` (UpstreamSelector.set_servers) when the list changes; the daemon is not
restarted, the cache and the tunnels stay.

Why polling and not inotify: one `stat` a second costs microseconds; inotify would need a
ctypes binding, and watching a path (not an inode) through renames, symlinks retargeted by
resolvconf/systemd and files that do not exist yet means watching the directory and
re-arming — more code for a second less of delay. A change is seen by the file's identity
and times (device, inode, size, mtime, ctime; `stat` follows a symlink, so a retargeted link
shows as another inode). Like git's "racy clean" check, a file modified within the last two
seconds is re-read even when its stat looks the same, because two writes within one
timestamp tick leave the same mtime. A change is read again after a short pause before it is
used, so a writer that truncates and then writes (`echo > file`) is not caught half-way;
only the nameserver list matters (comments, search lines and the order of identical entries
do not trigger anything).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from resolver.config import HostPort, nameservers_in
from resolver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

RACY_WINDOW: Final = 2.0  # seconds: a file this fresh is re-read even if its stat is unchanged
SETTLE: Final = 0.1  # seconds between seeing a change and reading it for use


@dataclass(frozen=True, slots=True)
class FileState:
    """What `stat` says about the file (following symlinks)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def file_state(path: Path) -> FileState | None:
    """The file's identity and times, or None if it is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileState(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_text(path: Path) -> str | None:
    """The file's text, or None if it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


class ResolvConfWatch:
    """Watches one resolv.conf-style file and reports its nameserver list when it changes.

    Args:
        path: the file.
        listen: our listen addresses (nameservers that are us are left out).
        on_change: called with the new list (in file order, ourselves excluded).
        servers: the list already in use (config.load read the file at start-up).
        interval: seconds between polls.
        wall: POSIX time (for the racy-mtime check only).
    """

    def __init__(self, path: Path, listen: tuple[HostPort, ...],
                 on_change: Callable[[tuple[HostPort, ...], str], None], *,
                 servers: tuple[HostPort, ...] = (), interval: float = 1.0,
                 wall: Callable[[], float] = time.time) -> None:
        self.path, self.listen, self.on_change = path, listen, on_change
        self.interval, self.wall = interval, wall
        self.servers = servers
        self._state = file_state(path)
        self._text = read_text(path)
        self._task: asyncio.Task[None] | None = None
        self.changes = 0  # how many times on_change was called (tests, status)

    def retarget(self, path: Path, listen: tuple[HostPort, ...]) -> None:
        """Watch another file, or the same with other listen addresses (SIGHUP); the next
        poll reads it."""
        if (path, listen) != (self.path, self.listen):
            self.path, self.listen = path, listen
            self._state, self._text = None, None

    def changed(self) -> bool:
        """One cheap look: does the file's text differ from what was last used?"""
        state = file_state(self.path)
        racy = state is not None and self.wall() - state.mtime_ns / 1e9 < RACY_WINDOW
        if state == self._state and not racy:
            return False
        return read_text(self.path) != self._text

    def apply(self) -> bool:
        """Read the file and report its nameservers if they changed; True if they did."""
        self._state = file_state(self.path)
        text = read_text(self.path)
        if text is None and self._text is not None:
            log.warning("%s is gone: no forwarders until it is back", self.path)
        self._text = text
        servers = nameservers_in(text or "", self.listen)
        if servers == self.servers:
            return False
        self.servers = servers
        self.changes += 1
        self.on_change(servers, str(self.path))
        return True

    def check(self) -> bool:
        """`changed` then `apply`, without the pause (tests, and the first look)."""
        return self.changed() and self.apply()

    def start(self) -> None:
        """Poll in a task of its own."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(),
                                                                name="resolv-conf-watch")

    async def close(self) -> None:
        """Stop polling."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def run(self) -> None:
        """Poll every `interval` seconds until cancelled."""
        if self.apply():  # the file may have changed since config.load read it
            log.info("%s changed since start-up", self.path)
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self.changed():
                    await asyncio.sleep(SETTLE)  # let a writer finish
                    self.apply()
            except Exception:  # never stop following the network over one odd file
                log.exception("reading %s failed; trying again", self.path)
