"""How autosp shows the daemon's answers: aligned text for people, JSON for scripts.

Rules: no Python reprs (lists are joined, None is "-"); times are shown absolute (UTC) and
relative, with the direction right both ways ("in 5 s", "5 s ago", "now" within a second);
`autosp list` fits 80 columns for ordinary names (addresses go one per line in the last
column, the key fingerprint is left to `autosp status`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Final

# Fields of an ENDPOINT that are POSIX times (see autosp/control.py's protocol).
TIME_FIELDS: Final = frozenset({"next_refresh", "last_refresh", "added"})
# `status` shows these first, in this order; the rest follow as the daemon sent them.
STATUS_ORDER: Final = ("name", "tunnel", "security", "addresses", "algorithm", "fingerprint",
                       "group", "gateway", "keys_published", "tunnels", "next_refresh",
                       "last_refresh", "added")
LABELS: Final = {"security": "dnssec", "algorithm": "key", "keys_published": "keys published",
                 "next_refresh": "next refresh", "last_refresh": "last refresh"}


def relative(delta: float) -> str:
    """Seconds from now as words: "in 5 s", "5 s ago", "in 3 min", "2 h ago", "now"."""
    if abs(delta) < 1:
        return "now"
    size = abs(delta)
    if size < 120:
        text = f"{round(size)} s"
    elif size < 7200:
        text = f"{round(size / 60)} min"
    elif size < 172800:
        text = f"{round(size / 3600)} h"
    else:
        text = f"{round(size / 86400)} d"
    return f"in {text}" if delta > 0 else f"{text} ago"


def when(value: Any, now: float) -> str:
    """A POSIX time as "2026-11-23 10:05:00 UTC (in 40 s)"; None as "-"."""
    if value is None:
        return "-"
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(value)))
    return f"{stamp} ({relative(float(value) - now)})"


def plain(value: Any) -> str:
    """A JSON value as text: lists joined with ", ", None and "" as "-"."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(plain(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def key_values(rows: Sequence[tuple[str, str]], indent: str = "") -> str:
    """`label:  value` lines with the values aligned."""
    width = max((len(k) for k, _ in rows), default=0) + 1
    return "\n".join(f"{indent}{(k + ':').ljust(width)}  {v}" for k, v in rows)


def endpoint(e: dict[str, Any], now: float) -> str:
    """One endpoint, every field on its own aligned line; the error last."""
    keys = [k for k in STATUS_ORDER if k in e] + [
        k for k in e if k not in STATUS_ORDER and k not in ("error", "code")]
    rows = [(LABELS.get(k, k.replace("_", " ")),
             when(e[k], now) if k in TIME_FIELDS else plain(e[k])) for k in keys]
    if e.get("error"):
        reason = str(e["error"]) + (f" ({e['code']})" if e.get("code") else "")
        rows.append(("error", reason))
    return key_values(rows)


def table(endpoints: Sequence[dict[str, Any]], now: float) -> str:
    """`autosp list`: NAME TUNNEL DNSSEC KEY NEXT-REFRESH ADDRESSES, addresses one per line."""
    header = ("NAME", "TUNNEL", "DNSSEC", "KEY", "REFRESH", "ADDRESSES")
    rows: list[tuple[str, ...]] = [header]
    for e in endpoints:
        addrs = [str(a) for a in e.get("addresses") or []] or ["-"]
        nxt = e.get("next_refresh")
        refresh = "-" if not isinstance(nxt, int | float) else relative(float(nxt) - now)
        rows.append((str(e.get("name", "?")), plain(e.get("tunnel")), plain(e.get("security")),
                     plain(e.get("algorithm")), refresh, addrs[0]))
        rows += [("", "", "", "", "", a) for a in addrs[1:]]
    if len(rows) == 1:
        return "no endpoints (add one with `autosp add NAME`)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def as_json(value: Any) -> str:
    """The daemon's result for scripts: JSON, keys sorted, times as POSIX seconds."""
    return json.dumps(value, indent=2, sort_keys=True)


def upstream(s: dict[str, Any], now: float) -> str:
    """`autosp upstream`: mode, the path in use and why, since when, the last probe."""
    path = plain(s.get("path"))
    if path == "forward" and s.get("using"):
        path += " to " + plain(s.get("using"))
    rows = [("mode", plain(s.get("mode"))), ("path", path), ("reason", plain(s.get("reason"))),
            ("since", when(s.get("since"), now)),
            ("forwarders", f"{plain(s.get('forwarders'))} (from {plain(s.get('source'))})")]
    probes = [p for p in s.get("probes") or [] if isinstance(p, dict)]
    if probes:
        rows.append(("last probe", when(s.get("last_probe"), now)))
    lines = [key_values(rows)]
    lines += [f"  {plain(p.get('server'))}: {plain(p.get('status'))}"
              + (f": {p['reason']}" if p.get("reason") else "") for p in probes]
    return "\n".join(lines)
