"""charon's VICI `log` events (and its updown events) on a thread of their own: why our initiates
fail, and the raw material the responder learns unknown initiators from.

Theory of operation. A VICI session that listens can send nothing else, and the `vici` package
is blocking, so one thread holds one session registered for `log`, `ike-updown` and
`child-updown` (charon sends every log message of level <= 1 to such a listener, whatever its
file log says) and reconnects with backoff when charon goes away. Two clients:

  * the ViciBackend (resolver/tunnels/vici.py), for the words of item 6 of issue 11: around one
    setup it calls `begin(name)`, and after a failure `reason(name)` gives the strongest
    evidence the log of that conn's IKE_SA showed (resolver/responder/charonlog.py reads the
    lines): the peer's AUTHENTICATION_FAILED, NO_PROPOSAL_CHOSEN, TS_UNACCEPTABLE, no response,
    or our own refusal of the peer's key. Only conns in `begin` are kept, so memory is bounded
    by the setups in flight.
  * subscribers (the responder, resolver/responder/manager.py): `subscribe(loop, feed, sink)`.
    `feed(label, event)` runs *on this thread* for every event (and for "connected", {} each
    time the session is registered: charon may have been restarted and forgotten everything);
    it must be cheap and keep its own state (charon sends ~20 log lines per IKE_SA), and
    returns a value or None; values are handed to `sink` on the subscriber's event loop.
    Filtering here keeps a flood of IKE_SAs from becoming a flood of callbacks on the loop.

Event values arrive as bytes; they are decoded here once (`decode`), so the feeds read str.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

import vici
import vici.exception

from resolver.responder.charonlog import LogLine, Reason, failure_reason

log = logging.getLogger(__name__)

T = TypeVar("T")

EVENTS: Final = ["log", "ike-updown", "child-updown"]
_TICK: Final = 0.1  # receive timeout: how soon the thread notices close()
_BACKOFF_FIRST: Final = 0.1
_BACKOFF_LAST: Final = 2.0
_ERRORS: Final = (OSError, vici.exception.SessionException,
                  vici.exception.DeserializationException)


class _Subscriber(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop, feed: Callable[[str, dict[str, Any]],
                 T | None], sink: Callable[[T], None]) -> None:
        self.loop, self.feed, self.sink = loop, feed, sink


class CharonLog:
    """The listener thread (see the module docstring). `connect()` opens a VICI socket."""

    def __init__(self, connect: Callable[[], socket.socket]) -> None:
        self._connect = connect
        self.ready = threading.Event()  # registered (cleared while reconnecting)
        self._lock = threading.Lock()
        self._reasons: dict[str, Reason | None] = {}
        self._subscribers: list[_Subscriber[Any]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.events = 0  # events received (the benchmark's flood cost)

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="vici-log", daemon=True)
                self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def subscribe(self, loop: asyncio.AbstractEventLoop,
                  feed: Callable[[str, dict[str, Any]], Any],
                  sink: Callable[[Any], None]) -> None:
        """`feed` on this thread for every event; what it returns (unless None) to `sink` on
        `loop`. (Typed loosely: the pair agrees on the value's type between themselves.)"""
        with self._lock:
            self._subscribers.append(_Subscriber(loop, feed, sink))
        self.start()

    # -- failure reasons of our own initiates ----------------------------------------------------

    def begin(self, name: str) -> None:
        """Collect the failure evidence of conn `name` from now on (forgetting older)."""
        with self._lock:
            self._reasons[name] = None

    def reason(self, name: str) -> Reason | None:
        with self._lock:
            return self._reasons.get(name)

    def end(self, name: str) -> None:
        with self._lock:
            self._reasons.pop(name, None)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        pause = _BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                sock = self._connect()
            except OSError as exc:
                log.debug("VICI log listener: %s", exc)
                self._stop.wait(pause)
                pause = min(pause * 2, _BACKOFF_LAST)
                continue
            events = vici.Session(sock).listen(EVENTS, timeout=_TICK)
            try:
                for label, msg in events:
                    if not self.ready.is_set():  # first yield: registrations confirmed
                        self.ready.set()
                        pause = _BACKOFF_FIRST
                        self._event("connected", {})  # charon (re)started, or we did
                    if self._stop.is_set():
                        break
                    if label is not None:
                        self._event(label.decode(), decode(msg))
            except _ERRORS as exc:
                log.debug("VICI log listener lost its session: %s", exc)
            finally:
                self.ready.clear()
                with contextlib.suppress(*_ERRORS):
                    events.close()
                sock.close()

    def _event(self, label: str, event: dict[str, Any]) -> None:
        self.events += 1
        if label == "log":
            line = LogLine.of(event)
            if line.ike_name in self._reasons:  # a conn in setup (dict read: no lock needed)
                found = failure_reason(line)
                if found is not None:
                    with self._lock:
                        if line.ike_name in self._reasons:
                            self._reasons[line.ike_name] = found.stronger(
                                self._reasons[line.ike_name])
        for sub in list(self._subscribers):
            try:
                value = sub.feed(label, event)
            except Exception:  # a bug in a feed must not kill the listener
                log.exception("VICI log subscriber failed on a %s event", label)
                continue
            if value is not None:
                with contextlib.suppress(RuntimeError):  # loop closed: shutting down
                    sub.loop.call_soon_threadsafe(sub.sink, value)


def decode(value: Any) -> Any:
    """VICI values as str (bytes decoded, replacing what is not UTF-8), recursively."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
