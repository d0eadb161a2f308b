"""Service hooks: sd_notify over a real datagram socket, the watchdog task, SIGHUP, journald
log format and the rate-limiting filter."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from resolver.logs.event import event_text, log_event, quote
from resolver.logs.ratelimit import RateLimitFilter
from resolver.logs.setup import setup_logging, under_journald
from resolver.metrics.metered import DaemonMetrics
from resolver.service import sighup
from resolver.service.runtime import ServiceRuntime
from resolver.service.sdnotify import Notifier
from tests.helpers import aio, until

REPO = Path(__file__).resolve().parent.parent


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
    await until(lambda: rt.reloads == 1, "SIGHUP handled")
    assert b"nothing reloaded" in s.recv(4096)
    await rt.close()
    assert b"STOPPING=1" in s.recv(4096)
    s.close()


@aio
async def test_sighup_before_the_runtime_is_held_then_reloads_once(tmp_path: Path) -> None:
    """A SIGHUP between the program's start and step 6 (serve) is counted, not fatal
    (resolver/service/sighup.py), and applied once the runtime's handler is in (one reload covers
    any number); after close() SIGHUP is held again instead of ending the process."""
    s, path = listener(tmp_path)
    sighup.take()
    sighup.hold()
    os.kill(os.getpid(), signal.SIGHUP)  # with the default disposition this would end pytest
    os.kill(os.getpid(), signal.SIGHUP)
    rt = ServiceRuntime(DaemonMetrics(), {}, "t", Notifier({"NOTIFY_SOCKET": path}))
    reloaded: list[int] = []
    rt.reload = lambda: reloaded.append(1)
    await rt.start("serving")
    assert b"READY=1" in s.recv(4096)
    assert reloaded == [1] and rt.reloads == 1
    os.kill(os.getpid(), signal.SIGHUP)  # now the runtime's own handler
    await until(lambda: reloaded == [1, 1], "the second SIGHUP handled")
    await rt.close()
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
    os.kill(os.getpid(), signal.SIGHUP)
    assert sighup.take() == 1 and reloaded == [1, 1]
    s.close()


def test_the_daemon_survives_a_sighup_during_start_up_and_reloads_when_ready(
        tmp_path: Path) -> None:
    """The real program: SIGHUP sent as soon as it is held (the daemon is still importing its
    modules, long before step 6), READY=1 follows, the reload is logged, and SIGTERM ends it
    with 0. A plain resolver on a free loopback port, forwarding to a closed loopback port:
    nothing leaves the host."""
    s, path = listener(tmp_path)
    s.settimeout(20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp_path / "resolver.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                    '[upstream]\nmode = "forward"\nservers = ["127.0.0.1:9"]\n')
    env = {**os.environ, "NOTIFY_SOCKET": path, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "resolver", "--config", str(conf)],
                                env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while not caught(proc.pid, signal.SIGHUP):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.002)
        proc.send_signal(signal.SIGHUP)
        messages = b""
        while b"READY=1" not in messages:
            messages += s.recv(4096)
        deadline = time.monotonic() + 10
        while "event=reload " not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert proc.poll() is None, text
        assert "event=reload-deferred signals=1" in text, text  # held, not the late handler
        assert "changes=none" in text.split("event=reload-deferred", 1)[1], text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        s.close()


def caught(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (sig - 1)))


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
