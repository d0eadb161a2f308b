"""The control socket server: `autosp add/remove/list/status/refresh` talk to the daemon here.

Theory of operation. A Unix stream socket, owner root (the daemon's user), mode 0600 from the
moment it exists, in a directory of mode 0700. One connection carries one request line and one
reply line of the protocol in resolver/endpoints/protocol.py (shared with autosp's client); this
module binds the socket, checks the peer, reads the bounded line, dispatches it to the
`EndpointManager` and writes the reply. Expected failures (`EndpointError`) become replies with
their code; anything else is a bug, logged and answered with code "internal".

Security requirements, each enforced here and tested in tests/test_control.py:

  S1. Only root and the daemon's own uid may talk to it: the file mode is the first gate (0600,
      never briefly wider: it is bound under a umask of 0177), SO_PEERCRED is the second (a
      descriptor passed on by a privileged process still shows the connecting peer).
  S2. A request is bounded: MAX_REQUEST bytes, `read_timeout` seconds to arrive, `op_timeout`
      seconds to be carried out; JSON nested deeper than the parser's recursion limit is
      "bad-request" (protocol.py). Nothing a client sends can stop the daemon: every failure
      is a reply, and a bug is logged and answered with code "internal".
  S3. The socket path is never taken from anyone but the operator (config), a stale socket is
      removed only if nothing answers on it, and a non-socket file in its place is refused.

The endpoint operations themselves live in resolver/endpoints/manager.py (`EndpointManager`);
this module only checks and dispatches. It reads the clock (it is part of the asyncio layer,
like server.py) and passes `now` into the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import dns.name

from resolver.endpoints.config import ControlConfig
from resolver.endpoints.manager import EndpointManager, Tunnels
from resolver.endpoints.protocol import (
    MAX_REQUEST,
    NO_NAME,
    PERMISSION_DENIED,
    EndpointError,
    Request,
    parse_request,
    reply_error,
    reply_ok,
)
from resolver.errors import ConfigError
from resolver.policy import Policy
from resolver.resolve import Resolver
from resolver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_PEERCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}




# --- what the server dispatches to -------------------------------------------------------


class EndpointOps(Protocol):
    """The operations behind the socket (resolver.endpoints.manager.EndpointManager implements it).

    Each returns the reply's `result` (JSON-serialisable) or raises EndpointError.
    """

    async def add(self, name: dns.name.Name, group: str | None, now: float) -> Any: ...

    async def remove(self, name: dns.name.Name, now: float) -> Any: ...

    def list(self, now: float) -> Any: ...

    def status(self, name: dns.name.Name, now: float) -> Any: ...

    async def refresh(self, name: dns.name.Name | None, now: float) -> Any: ...


async def dispatch(ops: EndpointOps, req: Request, now: float) -> Any:
    """Carry out a checked request. Raises EndpointError for expected failures."""
    if req.op == "list":
        return ops.list(now)
    if req.op == "refresh":
        return await ops.refresh(req.name, now)
    name = req.name
    if name is None:  # parse_request guarantees it; this keeps mypy (and a future op) honest
        raise EndpointError("bad-request", f"{req.op} needs a name")
    if req.op == "add":
        return await ops.add(name, req.group, now)
    if req.op == "remove":
        return await ops.remove(name, now)
    return ops.status(name, now)


# --- the asyncio server --------------------------------------------------------------------


def peer_uid(sock: socket.socket | Any) -> int:
    """The uid of the process at the other end of a connected Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


class ControlServer:
    """The listening socket and its connections.

    Args:
        path: where to bind (the operator's config; see S3).
        ops: the endpoint operations.
        clock: POSIX time (the daemon's one clock; a test may pin it).
        allowed_uids: peers allowed besides root; default: the daemon's own effective uid.
        read_timeout: seconds for a request line to arrive.
        op_timeout: seconds an operation may take (autosp waits 30 s; answer before that).
    """

    def __init__(self, path: Path, ops: EndpointOps, *, clock: Callable[[], float] = time.time,
                 allowed_uids: frozenset[int] | None = None, read_timeout: float = 5.0,
                 op_timeout: float = 25.0,
                 extra: Mapping[str, Callable[[float], Awaitable[Any]]] | None = None) -> None:
        self.path = path
        self.ops = ops
        self.clock = clock
        self.allowed_uids = frozenset({0, os.geteuid()}) | (allowed_uids or frozenset())
        self.read_timeout = read_timeout
        self.op_timeout = op_timeout
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Operations that are not about endpoints (stats, debug-hang): name -> fn(now).
        self.extra = dict(extra or {})

    async def _dispatch(self, req: Request, now: float) -> Any:
        if req.op in self.extra:
            return await self.extra[req.op](now)
        if req.op not in NO_NAME or req.op == "list":
            return await dispatch(self.ops, req, now)
        raise EndpointError("bad-request", f"{req.op} is not enabled in this resolver")

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            ConfigError: the directory or path is unusable, or another daemon holds the socket.
        """
        sock = bind_socket(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._client, sock=sock,
                                                       limit=MAX_REQUEST)
        log.info("control socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening, cancel connections in progress, remove our socket file."""
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        # Remove the file only if it is still ours: a second daemon may have replaced it.
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            writer.write(await self._answer(reader, writer))
            await asyncio.wait_for(writer.drain(), self.read_timeout)
        except (OSError, TimeoutError):
            pass  # the client went away; nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._tasks.discard(task)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        sock = writer.get_extra_info("socket")
        try:
            uid: int | None = peer_uid(sock)
        except OSError:
            uid = None
        # Read the (bounded) request even from a peer we refuse: closing with its bytes unread
        # would reset the connection, and the client would see "broken pipe" instead of why.
        try:
            line = await asyncio.wait_for(reader.readline(), self.read_timeout)
        except TimeoutError:
            line, problem = b"", f"no request within {self.read_timeout:g} s"
        except (ValueError, asyncio.LimitOverrunError):
            line, problem = b"", f"request longer than {MAX_REQUEST} bytes"
        else:
            problem = ""
        if uid is None or uid not in self.allowed_uids:
            log.warning("control socket: refused a request from uid %s", uid)
            return reply_error("forbidden", PERMISSION_DENIED)
        if problem:
            return reply_error("bad-request", problem)
        try:
            req = parse_request(line)
            # `upstream` is a status poll: not worth a line each time.
            log.log(logging.DEBUG if req.op == "upstream" else logging.INFO, "control: %s %s",
                    req.op, req.name or "")
            # Shielded: an operation that outlives the client's patience (or the client) is
            # finished, not cancelled half-way (a tunnel up but the endpoint not recorded).
            op = asyncio.ensure_future(self._dispatch(req, self.clock()))
            op.add_done_callback(_log_late_failure)
            result = await asyncio.wait_for(asyncio.shield(op), self.op_timeout)
            return reply_ok(result)
        except EndpointError as exc:
            return reply_error(exc.code, str(exc))
        except TimeoutError:
            return reply_error("internal", f"the operation took longer than "
                                           f"{self.op_timeout:g} s; it goes on in the background "
                                           "(see `autosp status`)")
        except Exception as exc:
            # S2: a bug must not kill the daemon or leave the client hanging.
            log.exception("control: request failed")
            return reply_error("internal", f"internal error: {type(exc).__name__}: {exc}")


def _log_late_failure(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of an operation nobody waits for any more (no "never retrieved")."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, EndpointError):
        log.error("control operation failed: %r", exc)


def bind_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from birth, parent directory 0700.

    Raises:
        ConfigError: parent not a directory or writable by others, a non-socket in the way, or
            a live daemon answering on it.
    """
    parent = path.parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pst = os.stat(parent)
    except OSError as exc:
        raise ConfigError(f"control socket directory {parent}: {exc.strerror}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise ConfigError(f"control socket directory {parent}: not a directory")
    if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
        # Anyone who can write the directory can swap our socket for theirs.
        raise ConfigError(f"control socket directory {parent}: writable by group or others "
                          f"(mode {stat.S_IMODE(pst.st_mode):04o}); use a 0700 directory")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask is process-wide: another thread creating a file right now gets mode & ~0177 too,
    # which can only make that file stricter, never ours wider. Hence no lock.
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)  # explicit as well: documents the intent and survives odd filesystems
    sock.listen(16)
    sock.setblocking(False)
    return sock


def _remove_stale(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"control socket {path}: exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"control socket {path}: {exc.strerror}") from None
    else:
        raise ConfigError(f"control socket {path}: another resolver is running and listening "
                          "on it")
    finally:
        probe.close()
    log.info("removing stale control socket %s", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# --- wiring into the daemon ----------------------------------------------------------------


class ConfigLike(Protocol):
    """resolver.config.Config, as far as we read it."""

    @property
    def path(self) -> Path | None: ...

    @property
    def sections(self) -> Mapping[str, Mapping[str, Any]]: ...


@dataclass(slots=True)
class ControlService:
    """The running control socket, the endpoint manager and its timer task."""

    server: ControlServer
    manager: EndpointManager
    timer: asyncio.Task[None]

    async def close(self) -> None:
        """Stop the timer and the socket (tunnels stay up; the state file stays)."""
        await cancel_and_wait(self.timer)
        await self.server.close()


async def start_control(config: ConfigLike, resolution: Resolver, provisioner: Tunnels, *,
                        clock: Callable[[], float] = time.time,
                        policy: Policy | None = None,
                        extra: Mapping[str, Callable[[float], Awaitable[Any]]] | None = None
                        ) -> ControlService | None:
    """Parse [control], restore the pinned endpoints, listen on the control socket.

    Call it after the Provisioner's `reconcile(now)` (so restored endpoints find their
    tunnels) and before serving queries. Restored endpoints are re-resolved by the timer task
    right away, in the background: a slow upstream does not delay start-up.

    Args:
        config: the loaded Config (its `sections["control"]`).
        resolution: the Resolution (`resolve(qname, qtype, now)`).
        provisioner: the Provisioner (`pin`, `ensure`, `release`, `tunnels`).
        clock: POSIX time (the daemon's clock).
        policy: the Policy, for the group of endpoints added without --group.
        extra: operations beyond the endpoint ones (`stats`, `debug-hang`): name -> fn(now).

    Returns:
        The running service (close it at shutdown), or None if [control] enabled = false.

    Raises:
        ConfigError: a bad [control] table, or an unusable socket path.
    """
    source = str(config.path) if config.path is not None else "config"
    cfg = ControlConfig.from_section(config.sections.get("control", {}), source)
    if not cfg.enabled:
        log.info("control socket disabled ([control] enabled = false)")
        return None
    manager = EndpointManager(resolution, provisioner, cfg.state_file, policy=policy)
    manager.load()
    server = ControlServer(cfg.socket, manager, clock=clock, extra=extra)
    await server.start()
    timer = asyncio.create_task(manager.run(clock), name="endpoint-timer")
    return ControlService(server, manager, timer)


class NoEndpoints:
    """The EndpointOps of a daemon without tunnels: every endpoint request is refused."""

    def _refuse(self) -> EndpointError:
        return EndpointError("bad-request", "this resolver has no [identity]/[provision]: it "
                                            "keeps no endpoints")

    async def add(self, name: dns.name.Name, group: str | None, now: float) -> Any:
        raise self._refuse()

    async def remove(self, name: dns.name.Name, now: float) -> Any:
        raise self._refuse()

    def list(self, now: float) -> Any:
        raise self._refuse()

    def status(self, name: dns.name.Name, now: float) -> Any:
        raise self._refuse()

    async def refresh(self, name: dns.name.Name | None, now: float) -> Any:
        raise self._refuse()


async def start_status_socket(config: ConfigLike,
                              extra: Mapping[str, Callable[[float], Awaitable[Any]]], *,
                              clock: Callable[[], float] = time.time) -> ControlServer | None:
    """The control socket of a resolver without tunnels, for `autosp upstream` (and `extra`'s
    other requests) only.

    Only when the configuration has a [control] table (enabled): without tunnels there is
    nothing else to control, and two plain resolvers on one machine must not fight over the
    default socket path.

    Raises:
        ConfigError: a bad [control] table, or an unusable socket path.
    """
    if "control" not in config.sections:
        return None
    source = str(config.path) if config.path is not None else "config"
    cfg = ControlConfig.from_section(config.sections["control"], source)
    if not cfg.enabled:
        return None
    server = ControlServer(cfg.socket, NoEndpoints(), clock=clock, extra=extra)
    await server.start()
    return server
