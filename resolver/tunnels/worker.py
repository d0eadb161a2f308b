"""The tunnel worker: the VICI and XFRM backends in a process of their own.

Theory of operation. `python -m resolver.tunnels.worker FD` is started by the daemon
(resolver/tunnels/process.py) with one end of a socketpair as FD. It builds the very backends
the daemon would build in-process (`make_backend`: ViciBackend with its threads and event
listener, XfrmBackend on its thread) and runs each call the daemon sends on its own event loop;
results, errors and charon's events go back as frames (resolver/tunnels/pipe.py).

Why a process: in the daemon, the VICI threads (parsing charon's replies and events in pure
Python), the XFRM thread and the event listener took the GIL from the event loop in bursts,
and every cached answer waited for it to come back (issue 4's note; bench/bench_scale.py
measures it). Here they hold their own GIL; the daemon's loop only reads and writes frames.

Lifetime: the worker lives as long as its socket. The daemon's end closing (a clean stop, or
SIGKILL of the daemon: the kernel closes it) ends the worker; SIGINT and SIGTERM are ignored,
since the daemon decides (a terminal's Ctrl-C or systemd's stop reach the whole group, and a
worker dying first would make the daemon count every tunnel as lost while it shuts down).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

from resolver.errors import ConfigError, ProvisioningError
from resolver.logs.setup import setup_logging
from resolver.tunnels.backend import CompositeBackend, make_backend
from resolver.tunnels.pipe import Outbox, frame, receive, send
from resolver.tunnels.vici import ViciBackend

log = logging.getLogger(__name__)

METHODS: Final = frozenset({"apply", "installed", "live"})
# The responder's (resolver/tunnels/process.py RemoteVici): ViciBackend methods run by name,
# and the module whose functions `call` may run in a VICI session.
VICI_METHODS: Final = frozenset({"ensure_key", "reload_credentials"})
VICI_CONN_METHODS: Final = frozenset({"load_conn", "unload_conn"})
VICI_CALLABLE_MODULE: Final = "resolver.responder.charon"


async def serve(fd: int) -> int:
    """Serve the daemon on socket `fd` until it closes. Returns the exit status."""
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    init = await receive(reader)
    if init is None or init[0] != "init":
        return 2
    _, config, identity, level = init
    setup_logging(level)
    try:
        backend = make_backend(config, identity, source="tunnel worker")
    except ConfigError as exc:
        send(writer, ("failed", str(exc)))
        await writer.drain()
        return 2
    send(writer, ("ready", config.backend == "vici"))
    out = Outbox(writer)  # results and events of one loop turn: one write
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (message := await receive(reader)) is not None:
            job = _job(backend, message)
            if job is not None:
                task = asyncio.create_task(_call(backend, out, message[1], message[2], job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif message[0] == "watch":
                backend.watch(lambda event: out.send(("event", event)))
            elif message[0] == "subscribe_log" and isinstance(backend.tunnels, ViciBackend):
                # the feed runs on the log listener's thread, here; its values go back
                ident, feed = message[1], message[2]
                backend.tunnels.log.subscribe(asyncio.get_running_loop(), feed,
                                              functools.partial(_log_value, out, ident))
            else:
                log.error("bug: tunnel worker got %r", message[:2])
    except (ValueError, OSError) as exc:
        log.error("tunnel worker: the daemon's pipe failed: %s", exc)
    for task in tasks:
        task.cancel()
    await _close(backend)
    return 0


def _job(backend: CompositeBackend, message: tuple[Any, ...]
         ) -> Callable[[], Awaitable[Any]] | None:
    """What a "call", "vici" or "vici_call" message asks for (None: not one of those, or not
    allowed: only the methods and the module named above run)."""
    kind = message[0]
    if kind not in ("call", "vici", "vici_call") or len(message) != 4:
        return None
    _, _, what, args = message
    if kind == "call" and what in METHODS:
        return lambda: getattr(backend, what)(*args)
    vici = backend.tunnels
    if not isinstance(vici, ViciBackend):
        return None
    if kind == "vici" and what in VICI_METHODS:
        return lambda: getattr(vici, what)(*args)
    if kind == "vici" and what in VICI_CONN_METHODS:
        return lambda: vici.call(getattr(vici, what), *args)
    if kind == "vici_call" and getattr(what, "__module__", None) == VICI_CALLABLE_MODULE:
        return lambda: vici.call(what, *args)
    return None


async def _call(backend: CompositeBackend, out: Outbox, ident: int,
                method: object, job: Callable[[], Awaitable[Any]]) -> None:
    keys_left = _keys_left(backend)
    try:
        value = await job()
    except ProvisioningError as exc:
        reply: tuple[Any, ...] = ("error", ident, exc)
    except Exception as exc:  # a bug in a backend: the daemon gets a ProvisioningError
        log.exception("bug: tunnel worker %s failed", method)
        reply = ("error", ident, ProvisioningError(f"tunnel worker: {method}: {exc!r}"))
    else:
        reply = ("result", ident, value)
    if _keys_left(backend) != keys_left:  # before the result: the caller may read it next
        out.send(("keys_left", not keys_left))
    try:
        data = frame(reply)
    except Exception as exc:  # an error that does not pickle: its text does
        data = frame(("error", ident, ProvisioningError(str(reply[2]) or repr(exc))))
    out.put(data)


def _keys_left(backend: CompositeBackend) -> bool:
    """ViciBackend.keys_left (a key left charon with a conn: the responder sweeps)."""
    return isinstance(backend.tunnels, ViciBackend) and backend.tunnels.keys_left


def _log_value(out: Outbox, ident: int, value: Any) -> None:
    out.send(("log_value", ident, value))


async def _close(backend: CompositeBackend) -> None:
    close = getattr(backend.tunnels, "close", None)
    if close is not None:
        close()
    aclose = getattr(backend.shunts, "aclose", None)
    if aclose is not None:
        await aclose()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    status = asyncio.run(serve(int(argv[1])))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the backends' worker threads may still be blocked in charon's socket


if __name__ == "__main__":
    main(sys.argv)
