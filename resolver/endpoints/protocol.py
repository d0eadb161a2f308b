"""The control protocol: one JSON request line from `autosp`, one JSON reply line from the daemon.

Both sides import this module: resolver/endpoints/control.py serves the protocol,
autosp/control.py speaks it. No I/O here: bytes in, values out (and back).

    one connection = one request:  client -> {"op": ..., "name": ..., "group": ...} "\\n"
                                   server -> {"ok": true, "result": ...} "\\n", then close
                                          or {"ok": false, "error": "sentence", "code": CODE}

    request:  {"op": "add", "name": "vpn.example.com.", "group": "private"}  (group optional)
              {"op": "remove", "name": ...}   {"op": "list"}   {"op": "status", "name": ...}
              {"op": "refresh"}   {"op": "refresh", "name": ...}
              {"op": "stats"}   {"op": "debug-hang"} (only with [debug] allow_hang = true)
              {"op": "upstream"}   (the daemon's upstream: mode, path in use and why)

`list` and `refresh` return {"endpoints": [ENDPOINT...]}, `status` and `add` return ENDPOINT,
`remove` returns {"removed": NAME}, `stats` {"now": POSIX time, "metrics": [FAMILY...]} with
FAMILY = {"name", "type", "help", "samples": [{"name", "labels": {..}, "value"}]} (the numbers
of resolver/metrics/registry.py), `debug-hang` {"hanging": SECONDS}, `upstream` the dict of
resolver.upstream.select.UpstreamSelector.status ({"mode", "path", "using", "reason", "since",
"forwarders", "source", "last_probe", "probes": [...]}). ENDPOINT is the dict made by
resolver.endpoints.core.view:
{"name", "addresses": [..], "algorithm", "fingerprint", "security", "tunnel",
 "next_refresh": POSIX time or null, "error": "" or why it failed}, then details for `status`.

A request is bounded (MAX_REQUEST bytes); so is a reply (MAX_REPLY). A request is checked the
same way on both sides (`check_request`): autosp refuses bad input before it connects, and the
daemon refuses whatever another client sends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dns.exception
import dns.name

DEFAULT_SOCKET: Final = Path("/run/ipseckey-resolver/control.sock")  # where each looks first
MAX_REQUEST: Final = 64 * 1024  # a request is a few hundred bytes; this bounds a hostile one
MAX_REPLY: Final = 4 << 20  # `list` of many endpoints; bounds what a client reads
OPS: Final = ("add", "remove", "list", "status", "refresh", "stats", "debug-hang", "upstream")
NO_NAME: Final = frozenset({"list", "stats", "debug-hang", "upstream"})  # ops without a name
_FIELDS: Final = frozenset({"op", "name", "group"})
_NEEDS_NAME: Final = frozenset({"add", "remove", "status"})

# The `code` of an {"ok": false} reply, and what it means.
CODES: Final = {
    "bad-request": "the request is malformed (autosp: bad input, exit 2)",
    "forbidden": "the peer is neither root nor the daemon's user",
    "not-found": "no such endpoint",
    "unknown-name": "the name does not exist or has no addresses",
    "no-secure-key": "the name publishes no DNSSEC-secure, usable IPSECKEY",
    "resolution-failed": "a lookup failed (bogus, unreachable upstream, SERVFAIL)",
    "ike-unreachable": "the IKE daemon could not be reached",
    "tunnel-failed": "a tunnel did not come up",
    "internal": "a bug in the daemon, or an operation that outlived its time limit",
}
INPUT_CODES: Final = frozenset({"bad-request"})  # the client's fault: autosp exits 2
# The sentence for a peer that may not use the socket: the daemon's "forbidden" reply, and
# autosp's message when the file mode already stops it.
PERMISSION_DENIED: Final = "permission denied: run as root or as the daemon's user"


class EndpointError(Exception):
    """An operation (or its request) that ends in an `{"ok": false}` reply; `code` is one of
    CODES.

    Expected failures only (unknown name, no secure key, IKE daemon unreachable, bad input);
    the message is the one sentence autosp prints.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Request:
    """A checked request: `name` is absolute, `group` is a string or None."""

    op: str
    name: dns.name.Name | None = None
    group: str | None = None

    def to_line(self) -> bytes:
        """The request as the client sends it (absent fields left out)."""
        doc: dict[str, str] = {"op": self.op}
        if self.name is not None:
            doc["name"] = self.name.to_text()
        if self.group is not None:
            doc["group"] = self.group
        return json.dumps(doc).encode() + b"\n"


def _bad(problem: str) -> EndpointError:
    return EndpointError("bad-request", problem)


def _load(line: bytes, what: str) -> Any:
    """JSON of one line; a hostile nesting depth is bad input, not a crash."""
    try:
        return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise _bad(f"the {what} is not valid JSON") from None
    except RecursionError:
        raise _bad(f"the {what} is nested too deeply") from None


def check_request(op: Any, name: Any = None, group: Any = None) -> Request:
    """The fields of a request -> Request, checked as the daemon checks them.

    Raises:
        EndpointError("bad-request"): unknown op, a name missing or not allowed or not a DNS
            name, a group other than a string for add.
    """
    if not isinstance(op, str) or op not in OPS:
        raise _bad(f"unknown op {op!r} (known: {', '.join(OPS)})")
    if group is not None and (op != "add" or not isinstance(group, str)):
        raise _bad("'group' is a string, and only for add")
    if name is None:
        if op in _NEEDS_NAME:
            raise _bad(f"{op} needs a name")
        return Request(op, None, group)
    if op in NO_NAME:
        raise _bad(f"{op} takes no name")
    if not isinstance(name, str):
        raise _bad("'name' must be a string")
    try:
        parsed = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise _bad(f"{name!r} is not a DNS name: {exc}") from None
    if parsed == dns.name.root:
        raise _bad("the root is not an endpoint")
    return Request(op, parsed, group)


def parse_request(line: bytes) -> Request:
    """One request line -> Request (the server side).

    Raises:
        EndpointError("bad-request"): not JSON, not an object, unknown field, or what
            `check_request` refuses.
    """
    doc = _load(line, "request")
    if not isinstance(doc, dict):
        raise _bad("the request must be a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise _bad(f"unknown field(s) in request: {', '.join(sorted(map(str, unknown)))}")
    return check_request(doc.get("op"), doc.get("name"), doc.get("group"))


def reply_ok(result: Any) -> bytes:
    """A success reply line carrying `result`."""
    return json.dumps({"ok": True, "result": result}).encode() + b"\n"


def reply_error(code: str, message: str) -> bytes:
    """A failure reply line: `message` is the sentence autosp prints."""
    return json.dumps({"ok": False, "error": message, "code": code}).encode() + b"\n"


def parse_reply(line: bytes) -> Any:
    """One reply line -> its `result` (the client side).

    Raises:
        EndpointError: the daemon said `"ok": false` (its code and sentence).
        ValueError: the line is not a reply of this protocol.
    """
    try:
        doc = _load(line, "reply")
    except EndpointError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(doc, dict):
        raise ValueError("the reply is not a JSON object")
    if doc.get("ok") is True:
        return doc.get("result")
    raise EndpointError(str(doc.get("code") or "internal"),
                        str(doc.get("error") or "failed (no reason given)"))
