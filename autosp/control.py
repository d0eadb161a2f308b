"""Client side of the resolver's control socket (`autosp add/remove/list/status/refresh`).

The protocol (one JSON request line, one JSON reply line, the codes and the size limits) is
resolver/endpoints/protocol.py, shared with the daemon's server; this module connects, sends,
reads the bounded reply, and maps its outcome onto autosp's errors (and so exit statuses):
a "bad-request" reply or a request that `check_request` refuses is ConfigError (exit 2), any
other failure reply OperationFailed (exit 1), as is a socket this user may not open (the same
sentence as the daemon's "forbidden" reply); no daemon listening (or none answering) is
ResolverUnreachable (exit 3).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from autosp.errors import OperationFailed, ResolverUnreachable
from resolver.endpoints import protocol
from resolver.endpoints.protocol import DEFAULT_SOCKET, EndpointError, Request
from resolver.errors import ConfigError

__all__ = ["DEFAULT_SOCKET", "format_status", "format_table", "make_request", "request", "send"]


def make_request(op: str, name: str | None = None, group: str | None = None) -> Request:
    """A request checked as the daemon will check it, before anything is sent.

    Raises:
        ConfigError: the daemon would refuse it as "bad-request" (not a DNS name, ...).
    """
    try:
        return protocol.check_request(op, name, group)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None


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
                                  "(with [control] enabled)? The endpoint commands need the "
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


def format_table(endpoints: list[dict[str, Any]], now: float | None = None) -> str:
    """`autosp list` output: one row per endpoint, aligned columns."""
    now = time.time() if now is None else now
    header = ("NAME", "ADDRESSES", "KEY", "DNSSEC", "TUNNEL", "NEXT REFRESH")
    rows = [header]
    for e in endpoints:
        nxt = e.get("next_refresh")
        when = "-" if nxt is None else f"in {max(0, round(float(nxt) - now))} s"
        key = f"{e.get('algorithm') or '-'} {e.get('fingerprint') or ''}".strip()
        rows.append((str(e.get("name", "?")), ",".join(e.get("addresses") or []) or "-", key,
                     str(e.get("security") or "-"), str(e.get("tunnel") or "-"), when))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


_TIMES = ("next_refresh", "last_refresh", "added")  # POSIX seconds in the protocol


def format_status(e: dict[str, Any], now: float | None = None) -> str:
    """`autosp status NAME` output: every known field, one per line, failure reason last.

    Times are shown as UTC and relative to now ("2026-11-23 10:05:00 UTC (in 40 s)"), not as
    the raw POSIX seconds the protocol carries.
    """
    now = time.time() if now is None else now
    lines = [f"{k}: {_when(v, now) if k in _TIMES else v}" for k, v in e.items()
             if k != "error"]
    if e.get("error"):
        lines.append(f"error: {e['error']}")
    return "\n".join(lines)


def _when(value: Any, now: float) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-" if value is None else str(value)
    delta = round(float(value) - now)
    rel = f"in {delta} s" if delta >= 0 else f"{-delta} s ago"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value)))
    return f"{stamp} ({rel})"
