"""The provisioner's state file document: the wanted tunnels, shunts and adopted conns.

Pure data and JSON, no I/O: resolver/provision.py takes the snapshot and reads the result,
resolver/statefile.py owns the file (atomic writes, `.bad` copies). Version 1, with `adopted`
added for the adopted conns of resolver/provision.py's Rule 6 (absent in older files,
which still parse).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from resolver.tunnels.intents import CONN_PREFIX, TunnelSpec

Address = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one write holds, copied on the event loop (`dump` runs on the file's thread)."""

    tunnels: tuple[tuple[TunnelSpec, float, bool], ...]  # spec, lease end, pinned
    shunts: tuple[tuple[Address, float], ...]
    adopted: tuple[tuple[str, float], ...]  # conn name, lease end


@dataclass(frozen=True, slots=True)
class Saved:
    """What a state file held, as `parse` read it."""

    tunnels: list[tuple[TunnelSpec, float]]  # spec, lease end
    pinned: set[Address]
    shunts: dict[Address, float]
    adopted: dict[str, float]


def dump(snap: Snapshot) -> bytes:
    """The state file's bytes (runs on the state file's thread)."""
    doc: dict[str, object] = {
        "version": 1,
        "tunnels": [spec.to_json() | {"expires_at": exp, "pinned": pinned}
                    for spec, exp, pinned in snap.tunnels],
        "shunts": [{"destination": str(d), "expires_at": u} for d, u in snap.shunts],
    }
    if snap.adopted:  # only then: a file without adopted conns stays as version 1 wrote it
        doc["adopted"] = [{"name": n, "expires_at": u} for n, u in snap.adopted]
    # No indent: with one, json falls back to its pure-Python encoder.
    return json.dumps(doc, sort_keys=True).encode()


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
