"""State files: how the daemon keeps what must survive a restart, in one place.

Theory of operation. Two owners keep state across restarts: the Provisioner (the wanted tunnels
and shunts with their lease ends, resolver/provision.py) and the endpoints manager (the pinned
endpoints, resolver/endpoints/manager.py). Each owns its document (what is in it, how it is
parsed); a `StateFile` owns the file:

  Rule 1: a write is atomic: tmp + fsync + rename + fsync of the directory, so a crash leaves
          the old or the new file, never a mix. A directory we create is 0700, the file 0600:
          they hold what the daemon is told to trust.
  Rule 2: no file I/O on the event loop after start-up: writes run on the file's own thread,
          one at a time (`load` is synchronous: it runs before anything is served).
  Rule 3: group commit. `changed()` marks the owner's state dirty and has it written soon;
          `persist()` also waits until a write that includes the change is on disk. Each write
          takes one snapshot of everything changed so far, so a burst of N changes costs a
          handful of writes, not N (each serializing all tunnels: measured 50% of the event
          loop's time in the 200-peer benchmark). The owner's `snapshot` runs on the loop and
          must only copy values; the bytes are produced on the thread by what it returns.
  Rule 4: a file that exists but cannot be read as what its owner wrote is moved aside, to
          `<file>.bad` (or `.bad.1`, ... : an older one is never overwritten), and `load`
          raises StateCorrupt. What to do without state is the owner's decision.
  Rule 5: a failed write raises StateWriteFailed (an OSError) in every `persist` waiting for
          it; a write nobody waits for is logged, and retried by the next change.

Why here and not in resolver/tunnels/: the endpoints are not tunnels' business, and a file
store that both families use belongs to neither (like keyfile.py and hostaddr.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from resolver.errors import StateCorrupt, StateWriteFailed

log = logging.getLogger(__name__)

T = TypeVar("T")
Encode = Callable[[], bytes]  # a snapshot's serializer: runs on the state file's thread


class StateFile:
    """One state file (Rules 1-5).

    Args:
        path: the file.
        snapshot: called on the event loop when a write starts; copies what is to be written
            and returns the function that turns the copy into the file's bytes.
    """

    def __init__(self, path: Path, snapshot: Callable[[], Encode]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._changes = 0  # change counter; `_saved` is the last one known to be on disk
        self._saved = 0
        self._writer: asyncio.Task[None] | None = None
        self._wrote: asyncio.Future[None] | None = None  # done after each completed write
        self._io: ThreadPoolExecutor | None = None

    @property
    def pending(self) -> bool:
        """Changes not yet known to be on disk."""
        return self._saved < self._changes

    def load(self, parse: Callable[[bytes], T]) -> T | None:
        """The owner's document, `parse`d; None if there is no file.

        Raises:
            StateCorrupt: the file cannot be read, or `parse` raised ValueError; the file has
                been moved aside (Rule 4) unless even that failed (`aside` is None then).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory in its place, no permission, an I/O error
            raise self._set_aside(exc) from None
        try:
            return parse(data)
        except ValueError as exc:
            raise self._set_aside(exc) from None

    def changed(self) -> None:
        """The owner's state changed: have it written soon, without waiting."""
        self._changes += 1
        if self._writer is None or self._writer.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a synchronous caller): write here
                self._write_now()
                return
            self._writer = loop.create_task(self._write_loop())
            self._writer.add_done_callback(_retrieve)

    async def persist(self) -> None:
        """Mark the state changed and return once a write that includes the change is done.

        Raises:
            StateWriteFailed: that write failed.
        """
        self.changed()
        wanted = self._changes
        while self._saved < wanted:
            writer = self._writer
            if writer is None or writer.done():  # the last writer failed: start another
                self._writer = writer = asyncio.create_task(self._write_loop())
                writer.add_done_callback(_retrieve)
            # Wake after the next completed write, not when the writer task ends: during a
            # burst of changes the writer keeps going, and waiting for it made every answer
            # wait for the whole burst (measured: all 200 answers at ~4.1 s).
            if self._wrote is None or self._wrote.done():
                self._wrote = asyncio.get_running_loop().create_future()
            await asyncio.wait({self._wrote, writer}, return_when=asyncio.FIRST_COMPLETED)
            if self._saved < wanted and writer.done() and not writer.cancelled():
                failure = writer.exception()
                if failure is not None:
                    raise failure

    async def close(self) -> None:
        """Write what is pending, then stop the thread.

        Raises:
            StateWriteFailed: the last write failed (the thread is stopped all the same).
        """
        try:
            if self.pending:
                await self.persist()
        finally:
            if self._io is not None:
                self._io.shutdown(wait=False)
                self._io = None

    # -- internals ---------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        """Write snapshots until everything changed so far is on disk (one write at a time)."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        loop = asyncio.get_running_loop()
        while self._saved < self._changes:
            upto = self._changes
            encode = self._snapshot()
            await loop.run_in_executor(self._io, self._write, encode)
            self._saved = max(self._saved, upto)
            if self._wrote is not None and not self._wrote.done():
                self._wrote.set_result(None)

    def _write_now(self) -> None:
        upto = self._changes
        self._write(self._snapshot())
        self._saved = max(self._saved, upto)

    def _write(self, encode: Encode) -> None:
        try:
            write_atomically(self.path, encode())
        except OSError as exc:
            raise StateWriteFailed(f"state file {self.path}: cannot write: {exc}") from exc

    def _set_aside(self, why: Exception) -> StateCorrupt:
        """Move the unreadable file out of the way, never over an older one (Rule 4)."""
        aside: Path | None = None
        for n in range(100):
            candidate = self.path.with_name(self.path.name + (".bad" if n == 0 else f".bad.{n}"))
            if not os.path.lexists(candidate):
                aside = candidate
                break
        if aside is not None:
            try:
                os.replace(self.path, aside)
            except OSError as exc:
                log.error("state file %s could not be set aside as %s: %s", self.path, aside, exc)
                aside = None
        return StateCorrupt(self.path, aside, str(why))


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file (Rule 1)."""
    # The directory holds what we are told to trust: make it ours alone if we create it.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        rest = memoryview(data)
        while rest:  # a write may be short
            rest = rest[os.write(fd, rest):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Writer tasks nobody awaited: a failure is logged here, and retried by the next change."""
    if not task.cancelled() and task.exception() is not None:
        log.error("state file write failed: %s", task.exception())
