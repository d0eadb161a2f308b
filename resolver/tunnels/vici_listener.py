"""The VICI connection and charon's event listener (the blocking side, in a thread of its own).

Theory of operation. The `vici` package is blocking, and a session that listens can send nothing
else, so one thread holds one session registered for child-updown, ike-updown and child-rekey
and serves two clients:

  * setups (resolver/tunnels/vici.py): `expect(name, old_ids)` registers a waiter that the
    CHILD_SA's child-updown completes, or its IKE_SA's ike-updown fails; waiting on an event
    instead of polling list-sas is what keeps 200 concurrent setups cheap;
  * the watch (resolver/provisioning/watch.py): with a sink (`subscribe`), every event about one of
  our
    connections, and the session's own end (charon stopped, crashed, restarted) and return,
    becomes a resolver/tunnels/events.py value handed to the sink on its event loop.

The session's end is how a dead charon shows: no event announces a crash (SIGKILL), the socket
just closes. The thread reconnects with backoff (0.1 s doubling to 2 s) until `close()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import vici
import vici.exception

from resolver.errors import IkeDaemonUnreachable, TunnelRejected
from resolver.tunnels.events import (
    BackendEvent,
    ChildSaCameUp,
    ChildSaRekeyed,
    ChildSaWentDown,
    DaemonConnected,
    DaemonDisconnected,
)
from resolver.tunnels.intents import CONN_PREFIX

log = logging.getLogger(__name__)

SESSION_ERRORS: Final = (OSError, vici.exception.SessionException,
                         vici.exception.DeserializationException)
_LISTEN_TICK: Final = 0.1  # the listener's receive timeout (how soon it notices close())
_RECONNECT_FIRST: Final = 0.1  # the listener's reconnect backoff, doubling to _RECONNECT_LAST
_RECONNECT_LAST: Final = 2.0
_EVENTS: Final = ["child-updown", "ike-updown", "child-rekey"]
_ENDING_KEPT: Final = 1024


def connect(uri: str, timeout: float) -> socket.socket:
    """A connected VICI socket (blocking reads), or OSError / IkeDaemonUnreachable (bad URI)."""
    if uri.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = uri[len("unix://"):]
    elif uri.startswith("tcp://"):
        host, _, port = uri[len("tcp://"):].rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        address = (host.strip("[]"), int(port))
    else:
        raise IkeDaemonUnreachable(f"unsupported VICI URI {uri!r}")
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(address)
            break
        except OSError as exc:
            # A unix socket's full listen backlog answers a timed connect with EAGAIN at once.
            if exc.errno == errno.EAGAIN and time.monotonic() < deadline:
                time.sleep(0.002)
                continue
            sock.close()
            raise
    # Blocking reads from here on: initiate may legitimately take the whole setup timeout,
    # which is bounded by charon (the "timeout" we pass) and by the provisioner.
    sock.settimeout(None)
    return sock


class EventListener:
    """One thread with one session listening for child-updown / ike-updown / child-rekey.

    `expect(name, old_ids)` registers a waiter (a concurrent future, completed from this thread)
    for connection `name`; a CHILD_SA `name` reported up in an IKE_SA not in `old_ids`
    completes it, that IKE_SA reported down fails it (TunnelRejected). The thread reconnects
    after errors (charon restarted), with backoff; meanwhile the callers' polls carry on.
    With a sink (`subscribe`), every event about our connections and every loss and return of
    the session is also handed to the sink on its event loop (resolver/provisioning/watch.py).
    """

    def __init__(self, uri: str, connect_timeout: float) -> None:
        self.uri, self.connect_timeout = uri, connect_timeout
        self.ready = threading.Event()  # registered for events (cleared while reconnecting)
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[concurrent.futures.Future[None], set[str]]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sink: tuple[asyncio.AbstractEventLoop, Callable[[BackendEvent], None]] | None = None
        # IKE_SAs we end ourselves: their downs are no news (insertion-ordered, bounded; ids
        # are never reused, and an IKE_SA's several down events come in no fixed order)
        self._ending: dict[str, None] = {}
        self._sessions = 0  # sessions registered so far (DaemonConnected.first)

    def subscribe(self, loop: asyncio.AbstractEventLoop,
                  sink: Callable[[BackendEvent], None]) -> None:
        self._sink = (loop, sink)

    def _emit(self, event: BackendEvent) -> None:
        target = self._sink
        if target is None or self._stop.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            target[0].call_soon_threadsafe(target[1], event)

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="vici-events",
                                                daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def expect(self, name: str, old_ids: set[str]) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._lock:
            self._waiters.setdefault(name, []).append((fut, old_ids))
        return fut

    def ending(self, ike_ids: set[str]) -> None:
        """We are about to terminate these IKE_SAs ourselves (the old SAs of a make-before-
        break replacement): their down events are not reported to the sink."""
        with self._lock:
            self._ending.update(dict.fromkeys(ike_ids))
            while len(self._ending) > _ENDING_KEPT:
                del self._ending[next(iter(self._ending))]

    def discard(self, name: str, fut: concurrent.futures.Future[None]) -> None:
        with self._lock:
            left = [w for w in self._waiters.get(name, []) if w[0] is not fut]
            if left:
                self._waiters[name] = left
            else:
                self._waiters.pop(name, None)

    def _run(self) -> None:
        pause = _RECONNECT_FIRST
        while not self._stop.is_set():
            try:
                sock = connect(self.uri, self.connect_timeout)
            except OSError as exc:
                log.debug("VICI event listener: %s", exc)
                self._stop.wait(pause)
                pause = min(pause * 2, _RECONNECT_LAST)
                continue
            events = vici.Session(sock).listen(_EVENTS, timeout=_LISTEN_TICK)
            why = "closed by charon"
            try:
                for label, msg in events:
                    if not self.ready.is_set():  # first yield: the registrations were confirmed
                        self.ready.set()
                        pause = _RECONNECT_FIRST
                        self._sessions += 1
                        self._emit(DaemonConnected(first=self._sessions == 1))
                    if self._stop.is_set():
                        break
                    if label is not None:
                        self._event(text(label), msg)
            except SESSION_ERRORS as exc:
                why = str(exc) or type(exc).__name__
                log.debug("VICI event listener lost its session: %s", exc)
            finally:
                if self.ready.is_set():
                    self._emit(DaemonDisconnected(f"event session to {self.uri} ended ({why})"))
                self.ready.clear()
                with contextlib.suppress(*SESSION_ERRORS):
                    events.close()  # unregisters (on a live session)
                sock.close()

    def _event(self, label: str, msg: dict[str, Any]) -> None:
        up = text(msg.get("up", b"")) == "yes"
        for name, ike in msg.items():
            if not isinstance(ike, dict):
                continue
            uid = text(ike.get("uniqueid", b""))
            if text(name).startswith(CONN_PREFIX):
                self._report(label, up, text(name), uid, ike)
            with self._lock:
                waiters = [w for w in self._waiters.get(text(name), []) if uid not in w[1]]
            for fut, _ in waiters:
                if fut.done():
                    continue
                if label == "child-updown" and up and child_installed(ike, text(name)):
                    fut.set_result(None)
                elif label == "ike-updown" and not up:
                    fut.set_exception(TunnelRejected(f"IKE_SA {text(name)} went down"))


    def _report(self, label: str, up: bool, name: str, uid: str, ike: dict[str, Any]) -> None:
        """Hand one event about our connection `name` to the sink (if any)."""
        state = text(ike.get("state", b""))
        if not up and label in ("child-updown", "ike-updown"):
            with self._lock:
                if uid in self._ending:
                    return
        if label == "child-rekey":
            self._emit(ChildSaRekeyed(name))
        elif label == "child-updown" and up:
            self._emit(ChildSaCameUp(name))
        elif label == "child-updown":
            ids = frozenset(text(c.get("uniqueid", b""))
                            for c in (ike.get("child-sas") or {}).values())
            self._emit(ChildSaWentDown(name, f"charon reported its CHILD_SA down (IKE_SA "
                                             f"#{uid} {state})", gone_child=ids))
        elif label == "ike-updown" and not up:
            self._emit(ChildSaWentDown(name, f"charon reported its IKE_SA #{uid} down "
                                             f"({state})", gone_ike=frozenset({uid})))




def child_installed(ike: dict[str, Any], name: str) -> bool:
    """Whether IKE_SA dict `ike` (list-sas or event form) has CHILD_SA `name` INSTALLED."""
    for child in (ike.get("child-sas") or {}).values():
        if text(child.get("name", b"")) == name and \
                text(child.get("state", b"")) == "INSTALLED":
            return True
    return False


def text(v: object) -> str:
    """VICI values arrive as bytes."""
    return v.decode() if isinstance(v, bytes) else str(v)
