"""Charon alone: the time one charon needs to establish N CHILD_SAs, driven directly over VICI.

The yardstick for the daemon's setup throughput (issue 13: "tunnel setup throughput is
charon's, not ours"). The same connections the daemon would load (`ViciBackend.connection`),
the same non-blocking `initiate`, success on the same child-updown event, and at most
`window` setups in flight (charon's own limit: with more at once its IKE_SAs start failing).
No DNS, no validation, no state file, no asyncio: what is left is charon's (and the peer's)
work plus one VICI round trip per command.

Used by bench/bench_scale.py; runs in the caller's process (VICI is a unix socket, reachable
from the host namespace; every IKE packet is charon's, inside the lab).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vici
import vici.exception


@dataclass
class Outcome:
    """One run: seconds from the first load-conn to the last CHILD_SA INSTALLED."""

    seconds: float
    installed: int
    failed: int
    each: list[float] = field(default_factory=list)  # per setup: initiate -> INSTALLED (s)
    errors: dict[str, int] = field(default_factory=dict)  # initiate refused: message -> count


def _session(path: Path) -> tuple[vici.Session, socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return vici.Session(sock), sock


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def establish(vici_path: Path, conns: Sequence[dict[str, Any]], *, window: int = 32,
              timeout: float = 120.0, per_setup: float = 10.0) -> Outcome:
    """Load and initiate every conn (one CHILD_SA each, named as the conn), at most `window`
    in flight; return when all are INSTALLED or failed (or `timeout`).

    An IKE_SA that fails before it was ever up raises no ike-updown: a setup with no CHILD_SA
    after `per_setup` seconds counts as failed (as a daemon's timeout would count it).
    """
    names = [next(iter(c)) for c in conns]
    started: dict[str, float] = {}
    done: dict[str, float] = {}
    failed: set[str] = set()
    errors: dict[str, int] = {}
    slots = threading.Semaphore(window)
    lock = threading.Lock()
    all_done = threading.Event()
    ready = threading.Event()
    stop = threading.Event()

    def finish(name: str, ok: bool) -> None:
        with lock:
            if name in done or name in failed or name not in started:
                return
            if ok:
                done[name] = time.perf_counter()
            else:
                failed.add(name)
            if len(done) + len(failed) == len(names):
                all_done.set()
        slots.release()

    def listen() -> None:
        s, sock = _session(vici_path)
        try:
            for label, msg in s.listen(["child-updown", "ike-updown"], timeout=0.1):
                ready.set()
                if stop.is_set():
                    break
                if label is None:
                    continue
                up = _text(msg.get("up", b"")) == "yes"
                for name, ike in msg.items():
                    if not isinstance(ike, dict):
                        continue
                    name = _text(name)
                    if _text(label) == "child-updown" and up:
                        if any(_text(c.get("state", b"")) == "INSTALLED"
                               for c in (ike.get("child-sas") or {}).values()):
                            finish(name, True)
                    elif _text(label) == "ike-updown" and not up:
                        finish(name, False)
        finally:
            sock.close()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    ready.wait(5)
    s, sock = _session(vici_path)
    t0 = time.perf_counter()
    try:
        for conn, name in zip(conns, names, strict=True):
            while not slots.acquire(timeout=0.25):
                _reap(s, started, finish, lock, per_setup)
            s.load_conn(conn)
            with lock:
                started[name] = time.perf_counter()
            try:
                for _ in s.initiate({"child": name, "ike": name, "timeout": -1,
                                     "init-limits": "no"}):
                    pass
            except vici.exception.CommandException as exc:
                errors[str(exc)] = errors.get(str(exc), 0) + 1
                finish(name, False)
        while not all_done.wait(0.25) and time.perf_counter() - t0 < timeout:
            _reap(s, started, finish, lock, per_setup)
        last = max(done.values(), default=t0)
    finally:
        stop.set()
        sock.close()
    listener.join(2)
    return Outcome(last - t0, len(done), len(failed) + len(names) - len(done) - len(failed),
                   [done[n] - started[n] for n in done], errors)


def _reap(s: vici.Session, started: dict[str, float], finish: Any, lock: threading.Lock,
          per_setup: float) -> None:
    """Fail the setups in flight for longer than `per_setup` seconds."""
    now = time.perf_counter()
    with lock:
        old = [n for n, t in started.items() if now - t > per_setup]
    for name in old:
        finish(name, False)


def remove(vici_path: Path, names: Sequence[str], workers: int = 8) -> None:
    """Terminate and unload the conns (several sessions at once: terminate waits for the
    peer's delete acknowledgement)."""
    local = threading.local()

    def one(name: str) -> None:
        if getattr(local, "s", None) is None:
            local.s, local.sock = _session(vici_path)
        s = local.s
        with contextlib.suppress(vici.exception.CommandException):
            for _ in s.terminate({"ike": name, "force": "yes", "timeout": 1000}):
                pass
        with contextlib.suppress(vici.exception.CommandException):
            s.unload_conn({"name": name})

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, names))
