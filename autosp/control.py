"""Client side of the resolver's control socket (`autosp add/remove/list/status/refresh`).

The protocol (one JSON request line, one JSON reply line, the codes and the size limits) is
resolver/endpoints/protocol.py, shared with the daemon's server; this module connects, sends,
reads the bounded reply, and maps its outcome onto autosp's errors (and so exit statuses):
a "bad-request" reply or a request that `check_request` refuses is ConfigError (exit 2), any
other failure reply OperationFailed (exit 1), as is a socket this user may not open (the same
sentence as the daemon's "forbidden" reply); no daemon listening (or none answering) is
ResolverUnreachable (exit 3). What autosp prints of a reply is autosp/output.py.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from autosp.errors import OperationFailed, ResolverUnreachable
from resolver.endpoints import protocol
from resolver.endpoints.core import parse_group
from resolver.endpoints.protocol import DEFAULT_SOCKET, EndpointError, Request
from resolver.errors import ConfigError

__all__ = ["DEFAULT_SOCKET", "make_request", "request", "send"]


def make_request(op: str, name: str | None = None, group: str | None = None) -> Request:
    """A request checked as the daemon will check it, before anything is sent.

    Raises:
        ConfigError: the daemon would refuse it as "bad-request" (not a DNS name, ...).
    """
    try:
        req = protocol.check_request(op, name, group)
        if op == "add":
            parse_group(group)  # the daemon's own check of --group (clear and block refused)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None
    return req


def request(path: Path, op: str, timeout: float = 30.0, *, name: str | None = None,
            group: str | None = None) -> Any:
    """Check and send one request; return the reply's `result` (see `send`)."""
    return send(path, make_request(op, name, group), timeout)


def send(path: Path, req: Request, timeout: float = 30.0) -> Any:
    """Send one request and return the reply's `result`.

    Raises:
        ResolverUnreachable: the socket is missing, refuses or the daemon does not answer.
        ConfigError: the daemon says the request was malformed.
        OperationFailed: the daemon could not do it (its sentence is the message), or this
            user may not open the socket.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(req.to_line())
            data = _read_line(s)
    except FileNotFoundError:
        raise ResolverUnreachable(f"no control socket at {path}: is ipseckey-resolver running "
                                  f"(with [control] enabled)? `autosp {req.op}` needs the "
                                  "resolver's control socket") from None
    except PermissionError:
        # Not "unreachable" (exit 3 means "resolver not running"): it may well be running.
        raise OperationFailed(f"{path}: {protocol.PERMISSION_DENIED}") from None
    except TimeoutError:
        raise ResolverUnreachable(f"{path}: the resolver did not answer within "
                                  f"{timeout:g} s") from None
    except OSError as exc:
        raise ResolverUnreachable(f"cannot reach the resolver at {path}: "
                                  f"{exc.strerror}") from None
    try:
        return protocol.parse_reply(data)
    except ValueError as exc:
        raise ResolverUnreachable(f"{path}: the resolver's reply is not usable: {exc}") from None
    except EndpointError as exc:
        if exc.code in protocol.INPUT_CODES:
            raise ConfigError(str(exc)) from None
        raise OperationFailed(str(exc)) from None


def _read_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > protocol.MAX_REPLY:
            raise OSError(0, "reply too large")
    if not buf:
        raise OSError(0, "the resolver closed the connection without a reply")
    return bytes(buf.split(b"\n", 1)[0])

