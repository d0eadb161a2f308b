"""Service hooks: sd_notify over a real datagram socket, the watchdog task, SIGHUP, journald
log format and the rate-limiting filter."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
from pathlib import Path

from resolver.logevent import event_text, log_event, quote
from resolver.logratelimit import RateLimitFilter
from resolver.logsetup import setup_logging, under_journald
from resolver.metered import DaemonMetrics
from resolver.sdnotify import Notifier
from resolver.service import ServiceRuntime
from tests.helpers import aio


def listener(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s, path


def test_notify_messages_reach_the_socket(tmp_path: Path) -> None:
    s, path = listener(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path})
    n.ready("serving")
    msg = s.recv(4096).decode().split("\n")
    assert "READY=1" in msg and "STATUS=serving" in msg and f"MAINPID={os.getpid()}" in msg
    n.stopping()
    assert "STOPPING=1" in s.recv(4096).decode()
    n.close()
    s.close()


def test_abstract_socket_and_no_socket() -> None:
    name = f"isk-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify(STATUS="x")
    assert s.recv(100) == b"STATUS=x"
    s.close()
    off = Notifier({})
    assert not off.enabled and not off.notify(READY="1")


def test_watchdog_pid_of_another_process_is_ignored(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "2000000"}
    assert Notifier(env).watchdog_usec == 2_000_000
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_usec == 2_000_000
    assert Notifier({**env, "WATCHDOG_PID": "1"}).watchdog_usec == 0


@aio
async def test_watchdog_pings_from_the_loop_and_stops_when_it_is_blocked(tmp_path: Path
                                                                          ) -> None:
    s, path = listener(tmp_path)
    s.setblocking(False)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    task = asyncio.create_task(n.watchdog())
    await asyncio.sleep(0.3)

    def drain() -> int:
        count = 0
        while True:
            try:
                count += s.recv(100) == b"WATCHDOG=1"
            except BlockingIOError:
                return count

    assert drain() >= 4
    import time

    time.sleep(0.3)  # the loop is blocked: no pings can be sent
    assert drain() == 0
    task.cancel()
    s.close()


@aio
async def test_sighup_is_logged_not_fatal(tmp_path: Path) -> None:
    s, path = listener(tmp_path)
    rt = ServiceRuntime(DaemonMetrics(), {}, "t", Notifier({"NOTIFY_SOCKET": path}))
    await rt.start("serving")
    assert b"READY=1" in s.recv(4096)
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)
    assert rt.reloads == 1
    assert b"nothing reloaded" in s.recv(4096)
    await rt.close()
    assert b"STOPPING=1" in s.recv(4096)
    s.close()


def test_logfmt_fields_split_back() -> None:
    line = event_text("tunnel-failed", name="bob.example.test.", peer="198.51.100.11",
                      reason='no CHILD_SA within 3 s "x"', ede=23, skipped=None)
    assert line == ('event=tunnel-failed name=bob.example.test. peer=198.51.100.11 '
                    'reason="no CHILD_SA within 3 s \\"x\\"" ede=23')
    assert quote("a=b") == '"a=b"' and quote("") == '""'


def test_journald_format_has_priority_and_no_timestamp(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as f:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert under_journald(env, f)  # type: ignore[arg-type]
        assert not under_journald({"JOURNAL_STREAM": "1:2"}, f)  # type: ignore[arg-type]
        assert not under_journald({}, f)  # type: ignore[arg-type]
        setup_logging(logging.INFO, environ=env, stream=f)  # type: ignore[arg-type]
        log_event(logging.getLogger("resolver.x"), logging.WARNING, "refused", name="a.")
        logging.getLogger("resolver.y").info("plain")
    setup_logging(logging.WARNING)
    assert (tmp_path / "err").read_text().splitlines() == [
        "<4>resolver.x: event=refused name=a.", "<6>resolver.y: plain"]


def test_plain_format_keeps_timestamps() -> None:
    out = io.StringIO()
    setup_logging(logging.INFO, environ={}, stream=out)
    logging.getLogger("resolver").warning("hello")
    setup_logging(logging.WARNING)
    assert out.getvalue().split()[2:] == ["WARNING", "resolver:", "hello"]


def test_rate_limit_counts_repeats_and_floods() -> None:
    now = [0.0]
    out = io.StringIO()
    h = logging.StreamHandler(out)
    h.addFilter(RateLimitFilter(interval=10, burst=3, clock=lambda: now[0]))
    log = logging.getLogger("test.ratelimit")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(h)
    try:
        for _ in range(5):
            log_event(log, logging.WARNING, "tunnel-failed", peer="198.51.100.11")
        for i in range(6):  # distinct lines of one kind: 3 pass (1 used above), rest held
            log_event(log, logging.WARNING, "tunnel-failed", peer=f"198.51.100.{20 + i}")
        log.info("info is never limited")
        log.info("info is never limited")
        now[0] = 11.0
        log_event(log, logging.WARNING, "tunnel-failed", peer="198.51.100.11")
        log_event(log, logging.WARNING, "tunnel-failed", peer="198.51.100.99")
    finally:
        log.removeHandler(h)
    lines = out.getvalue().splitlines()
    assert lines == [
        "event=tunnel-failed peer=198.51.100.11",
        "event=tunnel-failed peer=198.51.100.20",
        "event=tunnel-failed peer=198.51.100.21",
        "info is never limited",
        "info is never limited",
        "event=tunnel-failed peer=198.51.100.11 repeated=4 suppressed=4",
        "event=tunnel-failed peer=198.51.100.99",
    ]
