"""The daemon's side of the tunnel worker: a ProvisioningBackend whose work runs in a child.

Theory of operation. `ProcessBackend` starts `python -m resolver.tunnels.worker` (the VICI and
XFRM backends, resolver/tunnels/worker.py) on a socketpair the first time it is needed, sends
it each call as a frame (resolver/tunnels/pipe.py) and completes the caller's future when the
result comes back; charon's events come back the same way and go to the watch's sink. The
event loop never runs VICI parsing, netlink or their threads: per intent it pickles one frame
and unpickles one (measured in bench/bench_scale.py, beside the same work in threads).

The responder (resolver/responder/) needs VICI beyond intents: `vici` is a `RemoteVici` with the
part of ViciBackend's interface it uses. Its calls go to the worker's ViciBackend (functions of
resolver/responder/charon.py travel by name), its log feed is sent to the worker, which runs
it on the worker's log listener thread (the filtering that keeps ~20 log lines per IKE_SA off
any event loop) and sends back only what the feed returns.

Failure: the worker exiting (a bug, an OOM kill) fails every call in flight with
IkeDaemonUnreachable and is reported to the watch as `DaemonDisconnected` (every tunnel then
counts as lost: we can no longer see charon, so we fail closed, as for charon itself); a new
worker is started at once (backoff 0.5 s doubling to 10 s) and its event session reports
`DaemonConnected`, after which the watch audits and repairs as after a charon restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from resolver.errors import IkeDaemonUnreachable, ProvisioningError
from resolver.tunnels.config import DEFAULT_DPD_DELAY, Identity, ProvisionConfig
from resolver.tunnels.events import BackendEvent, DaemonDisconnected, HeldSa
from resolver.tunnels.intents import Intent, PolicyKey
from resolver.tunnels.pipe import Outbox, receive, send

log = logging.getLogger(__name__)

T = TypeVar("T")

START_TIMEOUT: Final = 20.0  # seconds for the worker to import and build its backends
REVIVE_FIRST: Final = 0.5
REVIVE_LAST: Final = 10.0


class ProcessBackend:
    """ProvisioningBackend (and WatchableBackend for VICI) backed by the tunnel worker.

    Args:
        config: [provision]; the worker builds `make_backend(config, identity)`.
        identity: [identity] (None for the dry run).
        log_level: the worker's logging level (the daemon's).
    """

    def __init__(self, config: ProvisionConfig, identity: Identity | None, *,
                 log_level: int = logging.WARNING) -> None:
        self.config = config
        self.identity = identity
        self.log_level = log_level
        self.pid: int | None = None  # the worker's, while it runs (tests, the benchmark)
        self._proc: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: Outbox | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._sink: Callable[[BackendEvent], None] | None = None
        self._closing = False
        self._revive_delay = REVIVE_FIRST
        self._feeds: dict[int, tuple[Any, Callable[[Any], None]]] = {}  # log subscriptions
        self.vici: RemoteVici | None = None  # set by `make_daemon_backend` for VICI

    # -- ProvisioningBackend / WatchableBackend --------------------------------------------

    async def apply(self, intent: Intent) -> None:
        """Raises ProvisioningError subclasses only."""
        await self._call("apply", intent)

    async def installed(self) -> frozenset[PolicyKey]:
        result: frozenset[PolicyKey] = await self._call("installed")
        return result

    async def live(self) -> frozenset[HeldSa]:
        result: frozenset[HeldSa] = await self._call("live")
        return result

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        """Report the worker's (charon's) events to `sink`; starts the worker. False for the
        dry run, which has nothing to watch (as CompositeBackend says)."""
        if self.config.backend != "vici":
            return False
        self._sink = sink
        if self._writer is not None:
            send(self._writer, ("watch",))
        else:
            self._start_soon()
        return True

    async def aclose(self) -> None:
        """Stop the worker (tunnels stay up: they are charon's and the kernel's)."""
        self._closing = True
        for task in (self._starting, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        await self._reap(wait=5.0)

    # -- calls -----------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any, kind: str = "call") -> Any:
        if self._writer is None:
            await self._start()
        writer = self._writer
        if writer is None:  # lost again while starting
            raise IkeDaemonUnreachable("tunnel worker not running")
        self._next_id += 1
        ident = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[ident] = fut
        try:
            assert self._outbox is not None
            self._outbox.send((kind, ident, method, args))
            return await fut
        finally:
            self._calls.pop(ident, None)

    def subscribe_log(self, feed: Any, sink: Callable[[Any], None]) -> None:
        """Run `feed` (picklable: its state travels with it) on the worker's log listener
        thread; what it returns comes to `sink` on the loop."""
        self._next_id += 1
        self._feeds[self._next_id] = (feed, sink)
        if self._writer is not None:
            send(self._writer, ("subscribe_log", self._next_id, feed))
        else:
            self._start_soon()

    async def _start(self) -> None:
        if self._closing:
            raise IkeDaemonUnreachable("tunnel worker stopped")
        if self._starting is None or self._starting.done():
            self._starting = asyncio.create_task(self._spawn())
        await asyncio.shield(self._starting)

    def _start_soon(self) -> None:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.get_running_loop().create_task(self._spawn())
            self._starting.add_done_callback(_retrieve)

    async def _spawn(self) -> None:
        """Start the worker and wait for it to say its backends are built.

        Raises:
            IkeDaemonUnreachable: it did not start (the reason is in the message).
        """
        if self._writer is not None:
            return
        await self._reap(wait=0.0)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "resolver.tunnels.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_worker_env())
        except OSError as exc:
            ours.close()
            raise IkeDaemonUnreachable(f"tunnel worker: cannot start: {exc}") from None
        finally:
            theirs.close()
        self.pid = self._proc.pid
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        send(writer, ("init", self.config, self.identity, self.log_level))
        try:
            reply = await asyncio.wait_for(receive(reader), START_TIMEOUT)
        except (TimeoutError, ValueError, OSError) as exc:
            reply = ("failed", f"no answer ({exc!r})")
        if reply is None or reply[0] != "ready":
            writer.close()
            why = "exited" if reply is None else reply[1]
            raise IkeDaemonUnreachable(f"tunnel worker did not start: {why}")
        self._writer = writer
        self._outbox = Outbox(writer)
        self._revive_delay = REVIVE_FIRST
        self._reader_task = asyncio.create_task(self._read(reader, writer))
        if self._sink is not None:
            send(writer, ("watch",))
        for ident, (feed, _) in self._feeds.items():  # a new worker: a fresh copy of each feed
            send(writer, ("subscribe_log", ident, feed))
        log.debug("tunnel worker %d started", self.pid)

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "its pipe closed"
        try:
            while (message := await receive(reader)) is not None:
                kind = message[0]
                if kind == "event" and self._sink is not None:
                    self._sink(message[1])
                elif kind == "log_value" and message[1] in self._feeds:
                    self._feeds[message[1]][1](message[2])
                elif kind == "keys_left" and self.vici is not None:
                    self.vici.keys_left = bool(message[1])
                elif kind in ("result", "error"):
                    fut = self._calls.get(message[1])
                    if fut is None or fut.done():
                        continue  # its caller gave up (a timeout): the result is moot
                    if kind == "result":
                        fut.set_result(message[2])
                    else:
                        error = message[2]
                        fut.set_exception(error if isinstance(error, ProvisioningError)
                                          else ProvisioningError(str(error)))
        except (ValueError, OSError) as exc:
            why = str(exc)
        self._lost(writer, why)

    def _lost(self, writer: asyncio.StreamWriter, why: str) -> None:
        """The worker is gone: fail what waits on it, tell the watch, start another."""
        if self._writer is writer:
            self._writer = None
        writer.close()
        if self._closing:
            return
        error = IkeDaemonUnreachable(f"tunnel worker exited ({why})")
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(error)
        log.error("tunnel worker (pid %s) exited: %s; starting another", self.pid, why)
        if self._sink is not None:
            self._sink(DaemonDisconnected(f"tunnel worker exited ({why})"))
            asyncio.get_running_loop().create_task(self._revive()).add_done_callback(_retrieve)

    async def _revive(self) -> None:
        """Start a new worker for the watch (calls would start one anyway), with backoff."""
        while not self._closing and self._writer is None:
            await asyncio.sleep(self._revive_delay)
            self._revive_delay = min(self._revive_delay * 2, REVIVE_LAST)
            try:
                await self._start()
            except IkeDaemonUnreachable as exc:
                log.error("%s", exc)

    async def _reap(self, wait: float) -> None:
        """Collect the old worker's exit status (SIGKILL it if it does not go in `wait` s)."""
        proc = self._proc
        if proc is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
        self._proc = None


class RemoteLog:
    """`ViciBackend.log` as the responder sees it: `subscribe` only."""

    def __init__(self, process: ProcessBackend) -> None:
        self._process = process

    def subscribe(self, loop: asyncio.AbstractEventLoop,
                  feed: Callable[[str, dict[str, Any]], Any],
                  sink: Callable[[Any], None]) -> None:
        """`feed` (a bound method of a picklable object) runs in the worker; `sink` here, on
        `loop` (the running one: the worker's frames are read there)."""
        self._process.subscribe_log(feed, sink)


class RemoteVici:
    """The worker's ViciBackend, as far as the responder uses it (resolver/responder/manager.py).

    `call(fn, *args)`: `fn(session, *args)` in the worker; `fn` is a function of
    resolver/responder/charon.py (sent by name) or this object's `load_conn`/`unload_conn`
    (the worker's own, which remember conns for credential reloads).
    """

    def __init__(self, process: ProcessBackend, identity: Identity, own_spki: str,
                 dpd_delay: int = DEFAULT_DPD_DELAY) -> None:
        self._process = process
        self.identity = identity
        self.own_spki = own_spki
        self.dpd_delay = dpd_delay  # the responder's conns carry it too
        self.keys_left = False  # mirrored from the worker after each call that changes it
        self.log = RemoteLog(process)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        if fn == self.load_conn:
            result: T = await self._process._call("load_conn", *args, kind="vici")
        elif fn == self.unload_conn:
            result = await self._process._call("unload_conn", *args, kind="vici")
        else:
            result = await self._process._call(fn, *args, kind="vici_call")  # type: ignore[arg-type]
        return result

    def load_conn(self, s: Any, payload: dict[str, Any]) -> None:
        """A marker for `call` (load-conn runs in the worker)."""
        raise NotImplementedError("RemoteVici.load_conn runs in the tunnel worker")

    def unload_conn(self, s: Any, name: str) -> None:
        """A marker for `call` (unload-conn runs in the worker)."""
        raise NotImplementedError("RemoteVici.unload_conn runs in the tunnel worker")

    async def ensure_key(self) -> None:
        await self._process._call("ensure_key", kind="vici")

    async def reload_credentials(self) -> int:
        result: int = await self._process._call("reload_credentials", kind="vici")
        return result


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("tunnel worker: %s", task.exception())


def _worker_env() -> dict[str, str]:
    """The worker imports the code the daemon runs: the directory our package (and, in an
    installed service, its dependencies beside it) was loaded from goes first on its path,
    since the daemon itself may run isolated (`python3 -I`), which no child inherits."""
    root = str(Path(__file__).resolve().parents[2])
    extra = [p for p in sys.path if p and Path(p).is_dir()]
    path = os.pathsep.join(dict.fromkeys([root, *extra]))
    return {**os.environ, "PYTHONPATH": path}
