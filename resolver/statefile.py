"""State files: how the daemon keeps what must survive a restart, in one place.

Theory of operation. Two owners keep state across restarts: the Provisioner (the wanted tunnels
and shunts with their lease ends, resolver/provisioning/books.py) and the endpoints manager (the
pinned endpoints, resolver/endpoints/manager.py). Each owns its document (what is in it, how it
is parsed); a `StateFile` owns the file. A document is a JSON object of fixed fields and
*sections*, each a list of entries keyed by one of their fields (`Layout`); the owner marks
the keys that changed (`mark`) and the store writes those entries, never the whole state, so
the cost of recording a change does not grow with the number of tunnels:

  Rule 1: a write is atomic: tmp + fsync + rename + fsync of the directory, so a crash leaves
          the old or the new file, never a mix. A directory we create is 0700, the file 0600:
          they hold what the daemon is told to trust.
  Rule 2: no file I/O on the event loop after start-up: writes run on the file's own thread,
          one at a time (`load` is synchronous: it runs before anything is served).
  Rule 3: group commit. `changed()` has the marked entries written soon; `persist()` also
          waits until a write that includes them is on disk. Each write takes the entries
          marked so far (the owner's `record` runs on the loop and only copies values; the JSON
          is made on the thread), so a burst of N changes costs a handful of writes, not N.
  Rule 4: a file that exists but cannot be read as what its owner wrote is moved aside, to
          `<file>.bad` (or `.bad.1`, ... : an older one is never overwritten), and `load`
          raises StateCorrupt. What to do without state is the owner's decision. A journal
          that the document names but that is missing or damaged (other than a torn last
          line) makes the document unreadable too: it would be older than what was answered.
  Rule 5: a failed write raises StateWriteFailed (an OSError) in every `persist` waiting for
          it; a write nobody waits for is logged, and retried by the next change. The write
          after a failed one rewrites the whole document (what failed is not on disk).
  Rule 6: small documents (at most SMALL entries) are rewritten whole at every write, exactly
          as the owner's format says. A larger one gets a journal beside it,
          `<file>.journal.<id>` (the document names it: `"journal": "<id>"`): each write appends
          one line, `<crc32> <json list of [section, key, entry or null]>`, and fdatasyncs it.
          When the journal outgrows the document, the document is rewritten from the entries
          the thread keeps (compaction: a new empty journal first, then the document naming
          it, then the old journal is removed), so each change costs O(1) amortized. A crash
          during an append leaves a torn last line, which `load` ignores: the write it
          belonged to never completed, so nothing was answered on it.

Why a journal beside a JSON document rather than sqlite: the file stays the document operators
and tests read (and older versions of the daemon wrote), a small state is byte-for-byte what it
was, and the costs are the ones measured in bench/bench_scale.py (one append + fdatasync per
group of changes). Why here and not in resolver/tunnels/: the endpoints are not tunnels'
business, and a store that both families use belongs to neither (like keyfile.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from resolver.errors import StateCorrupt, StateWriteFailed

log = logging.getLogger(__name__)

T = TypeVar("T")
Entry = Mapping[str, Any]
# What the owner's `record(section, key)` returns: a function that makes the entry (run on the
# state file's thread: it must only read values copied when `record` ran), or None: deleted.
Record = Callable[[], Entry] | None

SMALL: Final = 64  # entries up to which a document is rewritten whole at every write
JOURNAL_FLOOR: Final = 64 * 1024  # bytes a journal may reach before compaction, at least
_JOURNAL_ID: Final = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True, slots=True)
class Layout:
    """The shape of an owner's document.

    Args:
        header: fixed fields written first, e.g. {"version": 1}.
        sections: section name -> the field of an entry that is its key (as a string).
        optional: sections left out of the document while they are empty.
    """

    header: Mapping[str, Any]
    sections: Mapping[str, str]
    optional: frozenset[str] = frozenset()


@dataclass(slots=True)
class _Disk:
    """What the writer thread knows of the files (touched on that thread only)."""

    entries: dict[str, dict[str, bytes]] = field(default_factory=dict)  # section: key: JSON
    size: int = 0  # bytes of all entries
    journal: str | None = None  # id of the journal in use
    journal_size: int = 0
    fd: int | None = None  # the journal, open for appending
    rewrite: bool = True  # the next write rewrites the document (first, or after a failure)


class StateFile:
    """One state file (Rules 1-6).

    Args:
        path: the document.
        layout: its fixed fields and sections.
        record: called on the event loop when a write starts, for each key marked since the
            last one: what to write for it (see `Record`).
    """

    def __init__(self, path: Path, layout: Layout,
                 record: Callable[[str, str], Record]) -> None:
        self.path = path
        self.layout = layout
        self._record = record
        self._marked: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self._changes = 0  # change counter; `_saved` is the last one known to be on disk
        self._saved = 0
        self._writer: asyncio.Task[None] | None = None
        self._wrote: asyncio.Future[None] | None = None  # done after each completed write
        self._io: ThreadPoolExecutor | None = None
        self._disk = _Disk({s: {} for s in layout.sections})
        self._loaded: list[tuple[str, str]] = []  # the keys `load` found (loop side)

    @property
    def pending(self) -> bool:
        """Changes not yet known to be on disk."""
        return self._saved < self._changes

    @property
    def journal(self) -> Path | None:
        """The journal in use (None: the document is rewritten whole)."""
        j = self._disk.journal
        return None if j is None else self._journal_path(j)

    def mark(self, section: str, key: str) -> None:
        """The entry `key` of `section` changed (or went): write it with the next write."""
        self._marked[(section, key)] = None

    def mark_loaded(self, keep: Callable[[str, str], bool]) -> None:
        """Mark every entry `load` found that `keep(section, key)` says the owner no longer
        holds (leases that ended, conns no longer there): the next write removes them."""
        for section, key in self._loaded:
            if not keep(section, key):
                self.mark(section, key)
        self._loaded = []

    def load(self, parse: Callable[[bytes], T]) -> T | None:
        """The owner's document (with its journal applied), `parse`d; None if there is no file.

        Also what the next writes start from: entries not marked again stay as loaded.

        Raises:
            StateCorrupt: the document or its journal cannot be read, or `parse` raised
                ValueError; the files have been moved aside (Rule 4) unless even that failed
                (`aside` is None then).
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # a directory in its place, no permission, an I/O error
            raise self._set_aside(exc) from None
        journal: str | None = None
        whole = True  # the journal (if any) ends with a complete line
        try:
            doc = json.loads(data)
            if isinstance(doc, dict) and "journal" in doc:
                journal = self._journal_id(doc.pop("journal"))
                whole = self._replay(doc, journal)
                data = json.dumps(doc, sort_keys=True).encode()
                size = self._journal_path(journal).stat().st_size
            result = parse(data)
            self._seed(doc)
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise self._set_aside(exc, journal) from None
        except OSError as exc:  # the journal named by the document cannot be read
            raise self._set_aside(exc, journal) from None
        if journal is not None and whole:  # appends go on where the last run stopped
            self._disk.journal, self._disk.journal_size = journal, size
            self._disk.rewrite = False
        elif journal is not None:  # never append after a torn line: compact first
            self._disk.journal = journal
        return result

    def changed(self) -> None:
        """The owner's state changed (its keys marked): have it written soon, without waiting."""
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
                self._io.submit(self._close_journal)
                self._io.shutdown(wait=False)
                self._io = None

    # -- internals: the loop's side ----------------------------------------------------------

    async def _write_loop(self) -> None:
        """Write groups until everything changed so far is on disk (one write at a time)."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        loop = asyncio.get_running_loop()
        while self._saved < self._changes:
            upto = self._changes
            group = self._take()
            await loop.run_in_executor(self._io, self._write, group)
            self._saved = max(self._saved, upto)
            if self._wrote is not None and not self._wrote.done():
                self._wrote.set_result(None)

    def _write_now(self) -> None:
        upto = self._changes
        self._write(self._take())
        self._saved = max(self._saved, upto)

    def _take(self) -> list[tuple[str, str, Record]]:
        """The marked entries, as the owner has them now (on the loop: values only)."""
        marked, self._marked = self._marked, {}
        return [(s, k, self._record(s, k)) for s, k in marked]

    # -- internals: the thread's side --------------------------------------------------------

    def _write(self, group: list[tuple[str, str, Record]]) -> None:
        """Apply `group` to the entries, then append it to the journal or rewrite (Rule 6)."""
        disk = self._disk
        changes: list[bytes] = []
        for section, key, make in group:
            entries = disk.entries[section]
            old = entries.pop(key, None)
            if old is not None:
                disk.size -= len(old)
            new = None if make is None else json.dumps(make(), sort_keys=True).encode()
            if new is not None:
                entries[key] = new
                disk.size += len(new)
            if old != new:
                changes.append(b"[%s,%s,%s]" % (json.dumps(section).encode(),
                                                json.dumps(key).encode(), new or b"null"))
        count = sum(len(e) for e in disk.entries.values())
        try:
            if disk.journal is not None and not disk.rewrite and count > SMALL // 2:
                if not changes:
                    return
                line = b"[" + b",".join(changes) + b"]"
                line = b"%08x %s\n" % (zlib.crc32(line), line)
                if disk.journal_size + len(line) <= max(disk.size, JOURNAL_FLOOR):
                    self._append(line)
                    return
            elif not changes and not disk.rewrite:
                return
            self._rewrite(journal=count > SMALL)
        except OSError as exc:
            disk.rewrite = True  # what failed is not on disk: the next write writes it all
            raise StateWriteFailed(f"state file {self.path}: cannot write: {exc}") from exc

    def _append(self, line: bytes) -> None:
        disk = self._disk
        if disk.fd is None:
            assert disk.journal is not None
            disk.fd = os.open(self._journal_path(disk.journal), os.O_WRONLY | os.O_APPEND)
        _write_all(disk.fd, line)
        os.fdatasync(disk.fd)
        disk.journal_size += len(line)

    def _rewrite(self, journal: bool) -> None:
        """The whole document; with `journal`, naming a new empty journal (Rule 6)."""
        disk = self._disk
        old = disk.journal
        new = secrets.token_hex(8) if journal else None
        if new is not None:  # the journal exists before any document names it
            write_atomically(self._journal_path(new), b"")
        try:
            write_atomically(self.path, self._document(new))
        except OSError:
            if new is not None:
                self._unlink(self._journal_path(new))
            raise
        self._close_journal()
        disk.journal, disk.journal_size, disk.rewrite = new, 0, False
        if old is not None:
            self._unlink(self._journal_path(old))

    def _document(self, journal: str | None) -> bytes:
        """The document from the entries, as `json.dumps(doc, sort_keys=True)` writes it."""
        fields: dict[str, bytes] = {k: json.dumps(v, sort_keys=True).encode()
                                    for k, v in self.layout.header.items()}
        for section, entries in self._disk.entries.items():
            if entries or section not in self.layout.optional:
                fields[section] = b"[" + b", ".join(entries.values()) + b"]"
        if journal is not None:
            fields["journal"] = json.dumps(journal).encode()
        return b"{" + b", ".join(json.dumps(k).encode() + b": " + fields[k]
                                 for k in sorted(fields)) + b"}"

    def _close_journal(self) -> None:
        if self._disk.fd is not None:
            os.close(self._disk.fd)
            self._disk.fd = None

    # -- internals: loading ------------------------------------------------------------------

    def _journal_path(self, ident: str) -> Path:
        return self.path.with_name(f"{self.path.name}.journal.{ident}")

    @staticmethod
    def _journal_id(value: object) -> str:
        if not isinstance(value, str) or not _JOURNAL_ID.match(value):
            raise ValueError(f"not a journal id: {value!r}")
        return value

    def _replay(self, doc: dict[str, Any], journal: str) -> bool:
        """Apply the journal's lines to `doc`'s sections; a torn last line is ignored (the
        write it belonged to never completed). False if there was one. Raises ValueError or
        OSError."""
        lines = self._journal_path(journal).read_bytes().split(b"\n")
        tail = lines.pop()  # b"" after a complete last line
        whole = not tail
        if tail:
            log.warning("state file %s: journal ends with a torn line (a write interrupted "
                        "by a crash; nothing was answered on it): ignored", self.path)
        sections = {s: {str(e[kf]): e for e in doc.get(s, [])}
                    for s, kf in self.layout.sections.items()}
        for n, line in enumerate(lines, 1):
            crc, _, payload = line.partition(b" ")
            if len(crc) != 8 or int(crc, 16) != zlib.crc32(payload):
                if n == len(lines):
                    log.warning("state file %s: journal's last line is damaged (a write "
                                "interrupted by a crash): ignored", self.path)
                    whole = False
                    break
                raise ValueError(f"journal line {n} damaged")
            for section, key, entry in json.loads(payload):
                if entry is None:
                    sections[section].pop(key, None)
                else:
                    sections[section][key] = entry
        for section, entries in sections.items():
            if entries or section not in self.layout.optional:
                doc[section] = list(entries.values())
            else:
                doc.pop(section, None)
        return whole

    def _seed(self, doc: object) -> None:
        """What the writes start from: the entries of the loaded document."""
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        disk = self._disk
        for section, kf in self.layout.sections.items():
            entries = disk.entries[section]
            for e in doc.get(section, []):
                encoded = json.dumps(e, sort_keys=True).encode()
                entries[str(e[kf])] = encoded
                disk.size += len(encoded)
                self._loaded.append((section, str(e[kf])))

    def _set_aside(self, why: Exception, journal: str | None = None) -> StateCorrupt:
        """Move the unreadable file (and its journal) out of the way, never over an older one
        (Rule 4)."""
        aside = _aside(self.path)
        if journal is not None:
            _aside(self._journal_path(journal))
        return StateCorrupt(self.path, aside, str(why))

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("state file: cannot remove %s: %s", path, exc)


def _aside(path: Path) -> Path | None:
    """Move `path` to `<path>.bad` (`.bad.1`, ...: never over an older one); None: failed."""
    for n in range(100):
        candidate = path.with_name(path.name + (".bad" if n == 0 else f".bad.{n}"))
        if not os.path.lexists(candidate):
            try:
                os.replace(path, candidate)
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.error("state file %s could not be set aside as %s: %s", path, candidate, exc)
                return None
            return candidate
    return None


def _write_all(fd: int, data: bytes) -> None:
    rest = memoryview(data)
    while rest:  # a write may be short
        rest = rest[os.write(fd, rest):]


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file (Rule 1)."""
    # The directory holds what we are told to trust: make it ours alone if we create it.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
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
