"""The resolv.conf watch: the ways network stacks rewrite the file, and what counts as a change."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from resolver.config import HostPort
from resolver.upstream import resolvconf
from resolver.upstream.resolvconf import RACY_WINDOW, FileState, ResolvConfWatch
from tests.helpers import run, until

LISTEN = (HostPort("127.0.0.1"), HostPort("::1"))


class Seen:
    def __init__(self) -> None:
        self.lists: list[tuple[HostPort, ...]] = []

    def __call__(self, servers: tuple[HostPort, ...], source: str) -> None:
        self.lists.append(servers)


def watch(path: Path, seen: Seen, **kw: object) -> ResolvConfWatch:
    w = ResolvConfWatch(path, LISTEN, seen, **kw)  # type: ignore[arg-type]
    w.apply()  # what config.load read at start-up
    seen.lists.clear()
    return w


def test_rewritten_in_place_and_replaced_by_rename(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 198.51.100.53\n")
    seen = Seen()
    w = watch(rc, seen)
    assert not w.check()
    rc.write_text("# DHCP\nnameserver 198.51.100.13\n")  # same inode
    assert w.check() and seen.lists == [(HostPort("198.51.100.13"),)]
    tmp = tmp_path / "resolv.conf.new"
    tmp.write_text("nameserver 203.0.113.53\nnameserver 198.51.100.13\n")
    os.rename(tmp, rc)  # NetworkManager, systemd-resolved: a new inode
    assert w.check()
    assert seen.lists[-1] == (HostPort("203.0.113.53"), HostPort("198.51.100.13"))


def test_a_rewrite_that_leaves_stat_unchanged_is_seen_while_fresh(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two writes within one timestamp tick, same size: stat says nothing changed. The file
    # is re-read anyway while its mtime is within RACY_WINDOW of now (git's racy-clean rule).
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 198.51.100.53\n")
    frozen = FileState(1, 2, 26, 1_000 * 10**9, 1_000 * 10**9)
    monkeypatch.setattr(resolvconf, "file_state", lambda _p: frozen)
    clock = [1_000.5]
    seen = Seen()
    w = watch(rc, seen, wall=lambda: clock[0])
    rc.write_text("nameserver 198.51.100.13\n")
    assert w.check() and seen.lists == [(HostPort("198.51.100.13"),)]
    # Long after the last write an unchanged stat is trusted (no read every second).
    rc.write_text("nameserver 198.51.100.99\n")
    clock[0] += RACY_WINDOW + 1
    assert not w.check()


def test_only_the_nameserver_list_counts(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 198.51.100.53\nsearch example.test\n")
    seen = Seen()
    w = watch(rc, seen)
    rc.write_text("# generated\nnameserver 198.51.100.53\noptions edns0\n")
    assert not w.check() and seen.lists == []
    # Ourselves: what the README's `echo "nameserver 127.0.0.1" > /etc/resolv.conf` leaves.
    rc.write_text("nameserver 127.0.0.1\nnameserver ::1\n")
    assert w.check() and seen.lists == [()]


def test_a_file_that_goes_away_and_comes_back(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 198.51.100.53\n")
    seen = Seen()
    w = watch(rc, seen)
    rc.unlink()
    assert w.check() and seen.lists == [()]
    rc.write_text("nameserver 198.51.100.53\n")
    assert w.check() and seen.lists == [(), (HostPort("198.51.100.53"),)]


def test_a_retargeted_symlink_is_seen(tmp_path: Path) -> None:
    (tmp_path / "stub.conf").write_text("nameserver 127.0.0.53\n")
    (tmp_path / "uplink.conf").write_text("nameserver 198.51.100.1\n")
    rc = tmp_path / "resolv.conf"
    rc.symlink_to("stub.conf")
    seen = Seen()
    w = watch(rc, seen)
    rc.unlink()
    rc.symlink_to("uplink.conf")  # resolvconf / systemd switching the link
    assert w.check() and seen.lists == [(HostPort("198.51.100.1"),)]


def test_the_task_follows_the_file_within_a_poll(tmp_path: Path) -> None:
    rc = tmp_path / "resolv.conf"
    rc.write_text("nameserver 198.51.100.53\n")

    async def main() -> None:
        seen = Seen()
        w = ResolvConfWatch(rc, LISTEN, seen, servers=(HostPort("198.51.100.53"),),
                            interval=0.05)
        w.start()
        try:
            await asyncio.sleep(0.1)
            assert seen.lists == []  # nothing changed since start-up
            rc.write_text("nameserver 198.51.100.13\n")
            await until(lambda: seen.lists, "the new forwarders seen", 2)
            assert seen.lists == [(HostPort("198.51.100.13"),)]
        finally:
            await w.close()

    run(main(), 5)
