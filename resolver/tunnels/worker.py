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
import logging
import os
import signal
import socket
import sys
from typing import Any, Final

from resolver.errors import ConfigError, ProvisioningError
from resolver.logsetup import setup_logging
from resolver.tunnels.backend import CompositeBackend, make_backend
from resolver.tunnels.events import BackendEvent
from resolver.tunnels.pipe import frame, receive, send

log = logging.getLogger(__name__)

METHODS: Final = frozenset({"apply", "installed", "live"})


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
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (message := await receive(reader)) is not None:
            if message[0] == "call" and message[2] in METHODS:
                task = asyncio.create_task(_call(backend, writer, *message[1:]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif message[0] == "watch":
                backend.watch(lambda event: _event(writer, event))
            else:
                log.error("bug: tunnel worker got %r", message[:2])
    except (ValueError, OSError) as exc:
        log.error("tunnel worker: the daemon's pipe failed: %s", exc)
    for task in tasks:
        task.cancel()
    await _close(backend)
    return 0


async def _call(backend: CompositeBackend, writer: asyncio.StreamWriter, ident: int,
                method: str, args: tuple[Any, ...]) -> None:
    try:
        value = await getattr(backend, method)(*args)
    except ProvisioningError as exc:
        reply: tuple[Any, ...] = ("error", ident, exc)
    except Exception as exc:  # a bug in a backend: the daemon gets a ProvisioningError
        log.exception("bug: tunnel worker %s failed", method)
        reply = ("error", ident, ProvisioningError(f"tunnel worker: {method}: {exc!r}"))
    else:
        reply = ("result", ident, value)
    try:
        data = frame(reply)
    except Exception as exc:  # an error that does not pickle: its text does
        data = frame(("error", ident, ProvisioningError(str(reply[2]) or repr(exc))))
    writer.write(data)


def _event(writer: asyncio.StreamWriter, event: BackendEvent) -> None:
    if not writer.is_closing():
        send(writer, ("event", event))


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
