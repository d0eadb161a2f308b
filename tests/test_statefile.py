"""resolver.statefile: atomic private writes off the event loop, group commit, failed writes
reported to the waiter, unreadable files kept aside."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from resolver.errors import StateCorrupt, StateWriteFailed
from resolver.statefile import Encode, StateFile
from tests.helpers import aio


class Owner:
    """A state owner: a counter as its state; records every snapshot and where it was encoded."""

    def __init__(self, path: Path, encode_delay: float = 0.0) -> None:
        self.value = 0
        self.snapshots: list[int] = []
        self.threads: set[int] = set()
        self.delay = encode_delay
        self.file = StateFile(path, self.snapshot)

    def snapshot(self) -> Encode:
        value = self.value
        self.snapshots.append(value)

        def encode() -> bytes:
            self.threads.add(threading.get_ident())
            time.sleep(self.delay)
            return json.dumps({"value": value}).encode()

        return encode


def on_disk(path: Path) -> int:
    return int(json.loads(path.read_bytes())["value"])


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
async def test_group_commit_each_waiter_sees_its_change_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    o = Owner(path, encode_delay=0.02)

    async def change(v: int) -> None:
        o.value = max(o.value, v)
        await o.file.persist()
        assert on_disk(path) >= v  # released only by a write that includes the change

    await asyncio.gather(*(change(v) for v in range(1, 51)))
    assert on_disk(path) == 50
    assert len(o.snapshots) < 10, o.snapshots  # 50 changes, a handful of writes
    await o.file.close()


@aio
async def test_persist_returns_after_the_write_covering_it_not_after_the_burst(
        tmp_path: Path) -> None:
    """While other changes keep the writer busy for a second, a caller waiting for its change
    to be on disk is released by the first write that includes it."""
    o = Owner(tmp_path / "x.json", encode_delay=0.05)
    stop = asyncio.Event()

    async def churn() -> None:  # other owners' changes, every 10 ms for up to 1 s
        for _ in range(100):
            if stop.is_set():
                return
            o.file.changed()
            await asyncio.sleep(0.01)

    other = asyncio.create_task(churn())
    await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
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
    f = StateFile(path, lambda: lambda: b"")
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
