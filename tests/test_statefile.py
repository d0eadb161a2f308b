"""resolver.statefile: atomic private writes off the event loop, group commit, failed writes
reported to the waiter, unreadable files kept aside; entries written, not the whole state: a
journal beside a large document, compaction, torn lines after a crash, a cost per change that
does not grow with the number of entries."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resolver.statefile as statefile_module
from resolver.errors import StateCorrupt, StateWriteFailed
from resolver.statefile import Layout, Record, StateFile
from tests.helpers import aio

LAYOUT = Layout({"version": 1}, {"items": "k", "extra": "k"}, frozenset({"extra"}))


class Owner:
    """A state owner: entries k -> value in section "items"; records every write's keys and the
    threads the entries were made on."""

    def __init__(self, path: Path, encode_delay: float = 0.0) -> None:
        self.items: dict[str, int] = {}
        self.threads: set[int] = set()
        self.delay = encode_delay
        self.file = StateFile(path, LAYOUT, self.record)

    @property
    def value(self) -> int:
        return self.items.get("counter", 0)

    @value.setter
    def value(self, v: int) -> None:
        self.set("counter", v)

    def set(self, key: str, v: int | None) -> None:
        if v is None:
            self.items.pop(key, None)
        else:
            self.items[key] = v
        self.file.mark("items", key)

    def record(self, section: str, key: str) -> Record:
        v = self.items.get(key)
        if v is None:
            return None

        def make() -> dict[str, Any]:
            self.threads.add(threading.get_ident())
            time.sleep(self.delay)
            return {"k": key, "v": v}

        return make


def doc_of(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_bytes()))


def on_disk(path: Path) -> int:
    return int(next(e["v"] for e in doc_of(path)["items"] if e["k"] == "counter"))


def load(path: Path) -> dict[str, int]:
    """What a fresh StateFile loads from `path` (journal applied)."""
    got = StateFile(path, LAYOUT, lambda s, k: None).load(json.loads)
    assert isinstance(got, dict)
    return {e["k"]: e["v"] for e in got["items"]}


@aio
async def test_write_is_atomic_private_and_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "state" / "x.json"
    o = Owner(path)
    o.value = 7
    await o.file.persist()
    assert on_disk(path) == 7 and not o.file.pending
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700  # created by us: ours alone
    assert os.listdir(path.parent) == ["x.json"]  # the tmp file was renamed away
    assert threading.get_ident() not in o.threads and len(o.threads) == 1
    await o.file.close()


@aio
async def test_small_document_is_what_json_dumps_writes(tmp_path: Path) -> None:
    """A small state is rewritten whole, byte for byte as `json.dumps(doc, sort_keys=True)`
    (the format older versions wrote and operators read); an empty optional section is left
    out."""
    path = tmp_path / "x.json"
    o = Owner(path)
    for k, v in (("b", 2), ("a", 1), ("c", 3)):
        o.set(k, v)
    await o.file.persist()
    expect = {"version": 1, "items": [{"k": "b", "v": 2}, {"k": "a", "v": 1},
                                      {"k": "c", "v": 3}]}
    assert path.read_bytes() == json.dumps(expect, sort_keys=True).encode()
    o.set("a", None)
    await o.file.persist()
    assert doc_of(path)["items"] == [{"k": "b", "v": 2}, {"k": "c", "v": 3}]
    assert o.file.journal is None and sorted(os.listdir(tmp_path)) == ["x.json"]
    await o.file.close()


@aio
async def test_group_commit_each_waiter_sees_its_change_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    o = Owner(path, encode_delay=0.02)
    writes = 0
    real = statefile_module.write_atomically

    def counting(p: Path, data: bytes) -> None:
        nonlocal writes
        writes += 1
        real(p, data)

    statefile_module.write_atomically = counting  # type: ignore[assignment]
    try:
        async def change(v: int) -> None:
            o.value = max(o.value, v)
            await o.file.persist()
            assert on_disk(path) >= v  # released only by a write that includes the change

        await asyncio.gather(*(change(v) for v in range(1, 51)))
    finally:
        statefile_module.write_atomically = real
    assert on_disk(path) == 50
    assert writes < 10, writes  # 50 changes, a handful of writes
    await o.file.close()


@aio
async def test_persist_returns_after_the_write_covering_it_not_after_the_burst(
        tmp_path: Path) -> None:
    """While other changes keep the writer busy for a second, a caller waiting for its change
    to be on disk is released by the first write that includes it."""
    o = Owner(tmp_path / "x.json", encode_delay=0.05)
    stop = asyncio.Event()

    async def churn() -> None:  # other owners' changes, every 10 ms for up to 1 s
        for i in range(100):
            if stop.is_set():
                return
            o.set(f"other{i}", i)
            o.file.changed()
            await asyncio.sleep(0.01)

    other = asyncio.create_task(churn())
    await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    o.value = 1
    await o.file.persist()
    waited = loop.time() - t0
    still_writing = o.file.pending
    stop.set()
    await other
    assert waited < 0.4, f"waited {waited:.2f} s: released only when the burst ended"
    assert still_writing  # later changes were still being written: group commit
    await o.file.close()
    assert not o.file.pending


@aio
async def test_a_failed_write_reaches_the_waiter_and_the_next_change_retries(
        tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    o = Owner(blocker / "x.json")
    o.value = 2
    with pytest.raises(StateWriteFailed, match=r"state/x.json: cannot write") as e:
        await o.file.persist()
    assert isinstance(e.value, OSError) and o.file.pending
    blocker.unlink()
    o.value = 3
    await o.file.persist()
    assert on_disk(blocker / "x.json") == 3
    await o.file.close()


def test_changed_without_an_event_loop_writes_at_once(tmp_path: Path) -> None:
    o = Owner(tmp_path / "x.json")
    o.value = 5
    o.file.changed()
    assert on_disk(tmp_path / "x.json") == 5 and not o.file.pending


def test_load_and_unreadable_files_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    f = StateFile(path, LAYOUT, lambda s, k: None)
    assert f.load(json.loads) is None  # no file: nothing saved yet
    path.write_text('{"a": 1}')
    assert f.load(json.loads) == {"a": 1}
    path.write_bytes(b"garbage 1")
    with pytest.raises(StateCorrupt) as e:
        f.load(json.loads)
    assert e.value.aside == tmp_path / "x.json.bad" and not path.exists()
    assert (tmp_path / "x.json.bad").read_bytes() == b"garbage 1"
    assert "x.json unreadable" in str(e.value) and "kept as" in str(e.value)
    path.write_bytes(b"garbage 2")
    with pytest.raises(StateCorrupt) as e:
        f.load(json.loads)
    assert e.value.aside == tmp_path / "x.json.bad.1"  # the older copy is not overwritten
    assert (tmp_path / "x.json.bad").read_bytes() == b"garbage 1"
    assert (tmp_path / "x.json.bad.1").read_bytes() == b"garbage 2"
    path.mkdir()  # not a file at all
    with pytest.raises(StateCorrupt) as e:
        f.load(json.loads)
    assert e.value.aside == tmp_path / "x.json.bad.2" and e.value.aside.is_dir()
    assert not path.exists()


# --- the journal: large documents ------------------------------------------------------------


async def filled(path: Path, n: int) -> Owner:
    o = Owner(path)
    for i in range(n):
        o.set(f"k{i}", i)
    await o.file.persist()
    return o


@aio
async def test_a_large_document_gets_a_journal_and_each_change_appends_one_line(
        tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    o = await filled(path, 500)
    journal = o.file.journal
    assert journal is not None and journal.exists() and journal.read_bytes() == b""
    assert doc_of(path)["journal"] == journal.name.rsplit(".", 1)[1]
    before = path.read_bytes()
    o.set("k7", 700)
    o.set("k8", None)
    o.set("new", 1)
    await o.file.persist()
    assert path.read_bytes() == before  # the document was not rewritten
    lines = journal.read_bytes().splitlines()
    assert len(lines) == 1  # one write, one line
    assert load(path) == o.items
    await o.file.close()


@aio
async def test_the_journal_is_compacted_when_it_outgrows_the_document(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(statefile_module, "JOURNAL_FLOOR", 0)
    path = tmp_path / "x.json"
    o = await filled(path, 100)
    first = o.file.journal
    assert first is not None
    doc_size = path.stat().st_size
    i = 0
    while o.file.journal == first:
        i += 1
        o.set(f"k{i % 100}", 1000 + i)
        await o.file.persist()
        assert first.exists() or o.file.journal != first
    assert i > 10  # many appends per compaction: O(1) per change amortized
    assert not first.exists()  # the old journal went once the new document named the new one
    assert path.stat().st_size >= doc_size and load(path) == o.items
    journals = [p for p in os.listdir(tmp_path) if ".journal." in p]
    assert journals == [o.file.journal.name]  # type: ignore[union-attr]
    await o.file.close()


@aio
async def test_a_shrinking_state_goes_back_to_one_document(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    o = await filled(path, 200)
    assert o.file.journal is not None
    for i in range(190):
        o.set(f"k{i}", None)
    await o.file.persist()
    assert o.file.journal is None and "journal" not in doc_of(path)
    assert [p for p in os.listdir(tmp_path) if ".journal." in p] == []
    assert load(path) == o.items
    await o.file.close()


@aio
async def test_a_torn_last_line_is_ignored_and_never_appended_after(tmp_path: Path) -> None:
    """A crash during an append leaves part of a line: that write never completed (its
    `persist` never returned), so loading ignores it; the next write compacts rather than
    append after it (which would turn it into damage in the middle)."""
    path = tmp_path / "x.json"
    o = await filled(path, 100)
    o.set("k1", 111)
    await o.file.persist()
    good = dict(o.items)
    o.set("k2", 222)
    await o.file.persist()
    await o.file.close()
    journal = o.file.journal
    assert journal is not None
    data = journal.read_bytes()
    journal.write_bytes(data[:-7])  # the second line, cut
    o2 = Owner(path)
    loaded = o2.file.load(json.loads)
    assert loaded is not None and {e["k"]: e["v"] for e in loaded["items"]} == good
    o2.items = good
    o2.set("k3", 333)
    await o2.file.persist()
    assert o2.file.journal != journal and not journal.exists()  # compacted
    assert load(path) == o2.items
    await o2.file.close()


@pytest.mark.parametrize("damage", ["middle line", "missing journal", "bad journal id"])
@aio
async def test_a_damaged_journal_makes_the_state_unreadable_and_both_are_kept(
        tmp_path: Path, damage: str) -> None:
    path = tmp_path / "x.json"
    o = await filled(path, 100)
    for v in (101, 102):
        o.set("k1", v)
        await o.file.persist()
    await o.file.close()
    journal = o.file.journal
    assert journal is not None
    if damage == "middle line":
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(lines[0].replace(b'"v": 101', b'"v": 109') + lines[1])
    elif damage == "missing journal":
        journal.unlink()
    else:
        doc = doc_of(path)
        doc["journal"] = "../../etc/passwd"
        path.write_text(json.dumps(doc))
    with pytest.raises(StateCorrupt) as e:
        StateFile(path, LAYOUT, lambda s, k: None).load(json.loads)
    assert e.value.aside == tmp_path / "x.json.bad" and not path.exists()
    if damage == "middle line":
        assert (tmp_path / (journal.name + ".bad")).exists() and not journal.exists()


@aio
async def test_a_failed_append_reaches_the_waiter_and_the_next_write_is_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    o = await filled(path, 100)
    journal = o.file.journal
    real = statefile_module._write_all

    def full(fd: int, data: bytes) -> None:
        os.write(fd, data[:10])  # part of the line made it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(statefile_module, "_write_all", full)
    o.set("k1", 1001)
    with pytest.raises(StateWriteFailed, match="No space left"):
        await o.file.persist()
    monkeypatch.setattr(statefile_module, "_write_all", real)
    o.set("k2", 1002)
    await o.file.persist()
    assert o.file.journal != journal  # rewritten whole, with a fresh journal
    assert load(path) == o.items  # the failed change is on disk now too
    await o.file.close()


@aio
async def test_entries_loaded_and_no_longer_held_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    o = await filled(path, 100)
    await o.file.close()
    o2 = Owner(path)
    loaded = o2.file.load(json.loads)
    assert loaded is not None
    o2.items = {e["k"]: e["v"] for e in loaded["items"] if e["v"] % 2 == 0}  # odd ones ended
    o2.file.mark_loaded(lambda s, k: k in o2.items)
    await o2.file.persist()
    assert load(path) == o2.items and len(o2.items) == 50
    await o2.file.close()


@aio
async def test_the_cost_of_a_change_does_not_grow_with_the_number_of_entries(
        tmp_path: Path) -> None:
    """Bytes written per change (document rewrites + journal appends) with 200 entries and
    with 5,000: the same, give or take the line's own length."""
    per_change: dict[int, float] = {}
    real_write, real_append = statefile_module.write_atomically, statefile_module._write_all
    written = 0

    def count_write(p: Path, data: bytes) -> None:
        nonlocal written
        written += len(data)
        real_write(p, data)

    def count_append(fd: int, data: bytes) -> None:
        nonlocal written
        written += len(data)
        real_append(fd, data)

    for n in (200, 5000):
        path = tmp_path / f"x{n}.json"
        o = await filled(path, n)
        written = 0

        statefile_module.write_atomically = count_write  # type: ignore[assignment]
        statefile_module._write_all = count_append  # type: ignore[assignment]
        try:
            for i in range(50):
                o.set(f"k{i}", 10**6 + i)
                await o.file.persist()
        finally:
            statefile_module.write_atomically = real_write
            statefile_module._write_all = real_append
        per_change[n] = written / 50
        await o.file.close()
    assert per_change[5000] < 1.5 * per_change[200], per_change
    assert per_change[5000] < 200, per_change  # one short line, not a 100 KiB document


# --- every sequence of changes loads back as it was -------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["set", "del", "persist", "reload"]),
                         st.integers(0, 40), st.integers(0, 9)), max_size=80)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_of_changes_loads_back_as_it_was(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]) -> None:
    """Small thresholds, so the document is rewritten, journalled, compacted and shrunk back in
    one run: after every persist, a fresh load is exactly the owner's entries."""
    path = tmp_path_factory.mktemp("prop") / "x.json"
    saved = (statefile_module.SMALL, statefile_module.JOURNAL_FLOOR)
    statefile_module.SMALL, statefile_module.JOURNAL_FLOOR = 4, 0
    try:
        asyncio.run(_sequence(path, ops))
    finally:
        statefile_module.SMALL, statefile_module.JOURNAL_FLOOR = saved


async def _sequence(path: Path, ops: list[tuple[str, int, int]]) -> None:
    o = Owner(path)
    o.file.load(json.loads)
    for op, key, value in ops:
        if op == "set":
            o.set(f"k{key}", value)
        elif op == "del":
            o.set(f"k{key}", None)
        elif op == "persist":
            await o.file.persist()
            assert (load(path) if path.exists() else {}) == o.items
        else:
            await o.file.persist()
            await o.file.close()
            items = o.items
            o = Owner(path)
            loaded = o.file.load(json.loads)
            got = {} if loaded is None else {e["k"]: e["v"] for e in loaded["items"]}
            assert got == items
            o.items = got
    await o.file.close()


# --- kill -9 during a burst of writes --------------------------------------------------------

WRITER = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    import resolver.statefile as sf
    from resolver.statefile import Layout, StateFile
    sf.SMALL, sf.JOURNAL_FLOOR = 8, 4096  # journal and compactions within a second
    items = {}
    f = StateFile(Path(sys.argv[1]), Layout({"version": 1}, {"items": "k"}),
                  lambda s, k: (lambda v=items.get(k): {"k": k, "v": v}) if k in items else None)

    async def main():
        i = 0
        while True:
            i += 1
            for j in range(3):
                items[f"k{(i * 7 + j) % 50}"] = i
                f.mark("items", f"k{(i * 7 + j) % 50}")
            await f.persist()
            print(json.dumps(items), flush=True)  # acknowledged: on disk

    asyncio.run(main())
""")


def test_kill9_during_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """SIGKILL at a random moment of a stream of journalled writes: what loads is the last
    acknowledged state or the one being written (never older, never a mix that fails)."""
    path = tmp_path / "x.json"
    for delay in (0.3, 0.55, 0.8):
        path.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        acked = [json.loads(line) for line in out.splitlines() if line.endswith("}")]
        assert acked, "the writer acknowledged nothing"
        got = load(path)
        last = acked[-1]
        # the last acknowledged write, or a later one (written, not yet acknowledged)
        assert all(got.get(k, -1) >= v for k, v in last.items()), (got, last)
