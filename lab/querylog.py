"""What a lab host asked the lab's authoritative servers, read from named's query logs.

Every lab named runs with `querylog yes` (lab/dns.py), so `run/<server>/named.log` has a line
per query: `<date> <time> client @0x.. <addr>#<port> (<name>): query: <name> IN <type> ...`.
`QueryLog(lab, host)` remembers where each log ends (`mark()`), and `since()` returns the
queries that host's addresses (IPv4 and IPv6) sent after that, in arrival order (named's clock,
1 ms), names in lower case (a resolver using 0x20 sends them in mixed case).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab.topology import HOSTS, ZONES

if TYPE_CHECKING:
    from lab.core import Lab

SERVERS = tuple(sorted({z.server for z in ZONES.values()}))
_QUERY = re.compile(r"^\S+ (\S+) client @\S+ (\S+)#\d+ \(\S+\): query: (\S+) IN (\S+) ", re.M)


@dataclass(frozen=True, slots=True)
class Query:
    """One query as an authoritative server logged it."""

    server: str  # the lab host that received it
    name: str  # lower case, no trailing dot ("." for the root)
    rdtype: str

    @property
    def labels(self) -> int:
        """Labels in the name (0 for the root)."""
        return 0 if self.name == "." else self.name.count(".") + 1


class QueryLog:
    """Queries from one lab host to the lab's named servers (see the module docstring)."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.paths = {s: lab.run_dir / s / "named.log" for s in SERVERS}
        self.clients = {HOSTS[host].v4, HOSTS[host].v6, lab.addr(host)}
        self.offsets = dict.fromkeys(SERVERS, 0)

    def mark(self) -> None:
        """Forget everything logged so far."""
        self.offsets = {s: p.stat().st_size for s, p in self.paths.items()}

    def since(self, server: str | None = None) -> list[Query]:
        """The queries since `mark()`, to one server or to all, in the order they arrived."""
        out: list[tuple[str, Query]] = []
        for name in (server,) if server is not None else SERVERS:
            with open(self.paths[name], "rb") as f:
                f.seek(self.offsets[name])
                text = f.read().decode(errors="replace")
            out += [(m.group(1), Query(name, m.group(3).lower(), m.group(4)))
                    for m in _QUERY.finditer(text) if m.group(2) in self.clients]
        return [q for _when, q in sorted(out, key=lambda x: x[0])]
