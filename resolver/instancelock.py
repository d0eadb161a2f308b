"""One owner: the lock that keeps a second daemon away from the tunnels of the first.

Theory of operation (DESIGN.md, "Start-up", step 3). The daemon takes `flock(LOCK_EX)` on a
file named `ipseckey-resolver.lock` in every *state directory* (each directory that holds one
of its state files: [provision] state_file, [control] state_file) before anything touches
charon or XFRM, and holds it until it exits; the kernel drops it when the process dies, even
by SIGKILL, so a stale lock file never keeps a new daemon out. The holder writes its pid into
the file, and a second daemon that finds the lock taken exits with one line naming that pid,
having touched nothing.

Why the state directory and not the control socket's directory: the state files are what two
daemons must never share (each would remove the other's tunnels as strays at reconcile), and
the state directory is what an operator (or a test lab) sets per instance; the control socket
can be disabled. What this cannot catch: two daemons with *different* state directories on one
charon (their listen addresses then collide too, unless those differ as well). One daemon per
charon is the rule (README).

The lock file is held open read-only: the pid is written through a second descriptor that is
closed at once. A file open for writing would keep `mount -o remount,ro` of the state
directory from working, and a read-only state directory is a fault the daemon must report,
not prevent.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from resolver.errors import ConfigError

LOCK_NAME: Final = "ipseckey-resolver.lock"


class InstanceLock:
    """The locks on the state directories, held from `acquire` until `release` (or exit)."""

    def __init__(self, directories: Iterable[Path]) -> None:
        self.directories = sorted(set(directories))
        self._fds: list[int] = []

    @property
    def held(self) -> bool:
        return bool(self._fds)

    def acquire(self) -> None:
        """Take every lock (creating a missing state directory 0700), or none.

        Raises:
            ConfigError: another process holds one (the message names its pid), or a lock file
                cannot be created (the message names it and why).
        """
        try:
            for directory in self.directories:
                self._fds.append(_lock(directory, exclusive=True))
        except BaseException:
            self.release()
            raise

    def probe(self) -> None:
        """Raise what `acquire` would, without holding anything or creating anything.

        Used by the start-up checks (resolver/startup.py), so that `--check-config` says "another
        instance runs" too. A shared lock for an instant: it conflicts with a running daemon's
        exclusive one and never with another probe.
        """
        for directory in self.directories:
            if (directory / LOCK_NAME).exists():
                os.close(_lock(directory, exclusive=False))

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def holder(directory: Path) -> str:
    """The pid written into the lock file of `directory` ("unknown" if none can be read)."""
    try:
        text = (directory / LOCK_NAME).read_text(errors="replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _lock(directory: Path, *, exclusive: bool) -> int:
    path = directory / LOCK_NAME
    try:
        if exclusive:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"state directory {directory}: cannot create lock file {path}: "
                          f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"another ipseckey-resolver is running (pid {holder(directory)}) "
                              f"with state directory {directory} (it holds {path}); "
                              "not starting") from None
        raise ConfigError(f"state directory {directory}: cannot lock {path}: "
                          f"{exc.strerror or exc}") from None
    if not exclusive:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return fd
    try:
        _write_pid(path)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"state directory {directory}: cannot write {path}: "
                          f"{exc.strerror or exc}") from None
    return fd


def _write_pid(path: Path) -> None:
    wfd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(wfd, f"{os.getpid()}\n".encode())
    finally:
        os.close(wfd)
