"""The control socket: `autosp add/remove/list/status/refresh` talk to the daemon through it.

Theory of operation. A Unix stream socket, owner root (the daemon's user), mode 0600 from the
moment it exists, in a directory of mode 0700. The wire protocol is the one documented at the
top of autosp/control.py (its client side), kept to exactly:

    one connection = one request:  client -> {"op": ..., "name": ..., "group": ...} "\\n"
                                   server -> {"ok": true, "result": ...} "\\n", then close
                                          or {"ok": false, "error": "sentence", "code": CODE}

Codes: the client's documented ones ("unknown-name", "no-secure-key", "ike-unreachable",
"bad-request"; the client maps "bad-request" to its input-error exit 2 and everything else to
exit 1), plus "forbidden" (peer not allowed), "not-found" (no such endpoint), "tunnel-failed",
"resolution-failed" and "internal" (a bug in the daemon), all of which the client treats as
"the operation failed".

Security requirements, each enforced here and tested in tests/test_control.py:

  S1. Only root and the daemon's own uid may talk to it: the file mode is the first gate (0600,
      never briefly wider: it is bound under a umask of 0177), SO_PEERCRED is the second (a
      descriptor passed on by a privileged process still shows the connecting peer).
  S2. A request is bounded: MAX_REQUEST bytes, `read_timeout` seconds to arrive, `op_timeout`
      seconds to be carried out. Nothing a client sends can stop the daemon: every failure is
      a reply, and a bug is logged and answered with code "internal".
  S3. The socket path is never taken from anyone but the operator (config), a stale socket is
      removed only if nothing answers on it, and a non-socket file in its place is refused.

The endpoint operations themselves live in resolver/endpoints.py (`EndpointManager`); this
module only parses, checks and dispatches. It reads the clock (it is part of the asyncio layer,
like server.py) and passes `now` into the manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
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

import dns.exception
import dns.name

from resolver.endpoints.manager import EndpointError, EndpointManager, Resolver, Tunnels
from resolver.errors import ConfigError
from resolver.policy import Policy

log = logging.getLogger(__name__)

DEFAULT_SOCKET: Final = Path("/run/ipseckey-resolver/control.sock")
DEFAULT_STATE_FILE: Final = Path("/var/lib/ipseckey-resolver/endpoints.json")
MAX_REQUEST: Final = 64 * 1024  # a request is a few hundred bytes; this bounds a hostile one
OPS: Final = ("add", "remove", "list", "status", "refresh", "stats", "debug-hang")
_NO_NAME: Final = frozenset({"list", "stats", "debug-hang"})  # ops that take no name
_FIELDS: Final = {"op", "name", "group"}
_NEEDS_NAME: Final = frozenset({"add", "remove", "status"})
_PEERCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


# Expected failures end in an {"ok": false} reply with the exception's code; the endpoint
# manager raises the same class, so one `except` turns both into replies.
ControlError = EndpointError


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """The parsed [control] table.

    ```toml
    [control]
    enabled = true                                       # false: no socket, no endpoints
    socket = "/run/ipseckey-resolver/control.sock"       # parent dir is made 0700 if missing
    state_file = "/var/lib/ipseckey-resolver/endpoints.json"   # the pinned endpoints
    ```
    """

    enabled: bool = True
    socket: Path = DEFAULT_SOCKET
    state_file: Path = DEFAULT_STATE_FILE

    @classmethod
    def from_section(cls, section: Mapping[str, Any], source: str = "config") -> ControlConfig:
        """Parse Config.sections["control"].

        Raises:
            ConfigError: "SOURCE: [control] key 'K': problem" for the first bad key.
        """

        def err(key: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: [control] key {key!r}: {problem}")

        enabled, sock, state = True, DEFAULT_SOCKET, DEFAULT_STATE_FILE
        for key, value in section.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    raise err(key, "must be true or false")
                enabled = value
            elif key in ("socket", "state_file"):
                if not isinstance(value, str) or not value:
                    raise err(key, "must be a non-empty path")
                path = Path(value)
                if not path.is_absolute():
                    raise err(key, f"{value!r} must be an absolute path")
                if key == "socket":
                    # sun_path holds 108 bytes including the NUL; a longer path cannot be bound.
                    if len(os.fsencode(value)) > 107:
                        raise err(key, "path longer than 107 bytes (a Unix socket limit)")
                    sock = path
                else:
                    state = path
            else:
                raise err(key, "unknown key (known: enabled, socket, state_file)")
        return cls(enabled, sock, state)


# --- what the server dispatches to -------------------------------------------------------


class EndpointOps(Protocol):
    """The operations behind the socket (resolver.endpoints.manager.EndpointManager implements it).

    Each returns the reply's `result` (JSON-serialisable) or raises ControlError.
    """

    async def add(self, name: dns.name.Name, group: str | None, now: float) -> Any: ...

    async def remove(self, name: dns.name.Name, now: float) -> Any: ...

    def list(self, now: float) -> Any: ...

    def status(self, name: dns.name.Name, now: float) -> Any: ...

    async def refresh(self, name: dns.name.Name | None, now: float) -> Any: ...


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: `name` is absolute, `group` is a string or None."""

    op: str
    name: dns.name.Name | None = None
    group: str | None = None


def parse_request(line: bytes) -> Request:
    """One request line -> Request.

    Raises:
        ControlError("bad-request"): not JSON, not an object, unknown op or field, bad name.
    """

    def bad(problem: str) -> ControlError:
        return ControlError("bad-request", problem)

    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise bad("the request is not valid JSON") from None
    if not isinstance(doc, dict):
        raise bad("the request must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise bad(f"unknown field(s) in request: {', '.join(sorted(map(str, unknown)))}")
    op = doc.get("op")
    if op not in OPS:
        raise bad(f"unknown op {op!r} (known: {', '.join(OPS)})")
    raw_name, group = doc.get("name"), doc.get("group")
    if group is not None and (op != "add" or not isinstance(group, str)):
        raise bad("'group' is a string, and only for add")
    if raw_name is None:
        if op in _NEEDS_NAME:
            raise bad(f"{op} needs a name")
        return Request(op, None, group)
    if op in _NO_NAME:
        raise bad(f"{op} takes no name")
    if not isinstance(raw_name, str):
        raise bad("'name' must be a string")
    try:
        name = dns.name.from_text(raw_name)
    except dns.exception.DNSException as exc:
        raise bad(f"{raw_name!r} is not a DNS name: {exc}") from None
    if name == dns.name.root:
        raise bad("the root is not an endpoint")
    return Request(op, name, group)


async def dispatch(ops: EndpointOps, req: Request, now: float) -> Any:
    """Carry out a checked request. Raises ControlError for expected failures."""
    if req.op == "list":
        return ops.list(now)
    if req.op == "refresh":
        return await ops.refresh(req.name, now)
    name = req.name
    if name is None:  # parse_request guarantees it; this keeps mypy (and a future op) honest
        raise ControlError("bad-request", f"{req.op} needs a name")
    if req.op == "add":
        return await ops.add(name, req.group, now)
    if req.op == "remove":
        return await ops.remove(name, now)
    return ops.status(name, now)


def reply_ok(result: Any) -> bytes:
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def reply_error(code: str, message: str) -> bytes:
    return json.dumps({"ok": False, "error": message, "code": code}).encode() + b"\n"


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
        if req.op not in _NO_NAME or req.op == "list":
            return await dispatch(self.ops, req, now)
        raise ControlError("bad-request", f"{req.op} is not enabled in this resolver")

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
            return reply_error("forbidden", "the control socket is for root only")
        if problem:
            return reply_error("bad-request", problem)
        try:
            req = parse_request(line)
            log.info("control: %s %s", req.op, req.name or "")
            # Shielded: an operation that outlives the client's patience (or the client) is
            # finished, not cancelled half-way (a tunnel up but the endpoint not recorded).
            op = asyncio.ensure_future(self._dispatch(req, self.clock()))
            op.add_done_callback(_log_late_failure)
            result = await asyncio.wait_for(asyncio.shield(op), self.op_timeout)
            return reply_ok(result)
        except ControlError as exc:
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
    if exc is not None and not isinstance(exc, ControlError):
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
        self.timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.timer
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
