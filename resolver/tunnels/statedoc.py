"""The provisioner's state file document: the wanted tunnels, shunts and adopted conns.

Pure data and JSON, no I/O: resolver/provisioning/books.py marks what changed and reads the
result, resolver/statefile.py owns the file (atomic writes, the journal, `.bad` copies) and
writes the entries made here as `json.dumps(doc, sort_keys=True)` would. Version 1, with `adopted`
added for the adopted conns of resolver/provision.py's Rule 6 (absent in older files,
which still parse).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

from resolver.tunnels.intents import CONN_PREFIX, TunnelSpec

Address = IPv4Address | IPv6Address


# The document's shape, for resolver/statefile.py's Layout: fixed fields, each section and the
# field that keys its entries, and the section left out while empty (a file without adopted
# conns stays as version 1 wrote it).
HEADER: Final = {"version": 1}
SECTIONS: Final = {"tunnels": "destination", "shunts": "destination", "adopted": "name"}
OPTIONAL: Final = frozenset({"adopted"})


@dataclass(frozen=True, slots=True)
class Saved:
    """What a state file held, as `parse` read it."""

    tunnels: list[tuple[TunnelSpec, float]]  # spec, lease end
    pinned: set[Address]
    shunts: dict[Address, float]
    adopted: dict[str, float]


def tunnel_entry(spec: TunnelSpec, expires_at: float, pinned: bool) -> dict[str, Any]:
    """One entry of "tunnels" (made on the state file's thread from values copied)."""
    return spec.to_json() | {"expires_at": expires_at, "pinned": pinned}


def shunt_entry(destination: Address, expires_at: float) -> dict[str, Any]:
    """One entry of "shunts"."""
    return {"destination": str(destination), "expires_at": expires_at}


def adopted_entry(name: str, expires_at: float) -> dict[str, Any]:
    """One entry of "adopted"."""
    return {"name": name, "expires_at": expires_at}


def parse(data: bytes) -> Saved:
    """Raises ValueError for anything but a document `dump` wrote."""
    try:
        doc = json.loads(data)
        return Saved(
            tunnels=[(TunnelSpec.from_json(e), float(e["expires_at"])) for e in doc["tunnels"]],
            pinned={ipaddress.ip_address(e["destination"]) for e in doc["tunnels"]
                    if e.get("pinned") is True},
            shunts={ipaddress.ip_address(e["destination"]): float(e["expires_at"])
                    for e in doc["shunts"]},
            adopted={_conn_name(e["name"]): float(e["expires_at"])
                     for e in doc.get("adopted", [])})  # absent before Rule 6
    except (KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"not a provisioning state document: {exc!r}") from None


def _conn_name(name: object) -> str:
    """An adopted conn's name as stored; only ours ("isk-") are ever removed by name."""
    if not isinstance(name, str) or not name.startswith(CONN_PREFIX):
        raise ValueError(f"not one of our connection names: {name!r}")
    return name
