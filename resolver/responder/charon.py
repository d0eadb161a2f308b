"""The responder's VICI commands: blocking functions of one session, run in the ViciBackend's
workers (`ViciBackend.call`), never on the event loop.

Each iterates charon's lazy generators to the end before sending anything else on the session
(resolver/tunnels/vici.py explains why), and returns plain values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import vici
import vici.exception

from resolver.responder.core import RESPONDER_PREFIX, WILDCARD
from resolver.tunnels.intents import CONN_PREFIX

_TERMINATE_MS = 1000


@dataclass(frozen=True, slots=True)
class LoadedConn:
    """A conn charon holds, as far as the responder cares."""

    name: str
    remote_ids: tuple[str, ...]
    remote_classes: tuple[str, ...]  # "public key", "pre-shared key", ...


def conns(s: vici.Session) -> list[LoadedConn]:
    """Every conn loaded in charon (ours and others')."""
    out = []
    for entry in list(s.list_conns()):
        for name, conn in entry.items():
            rounds = [v for k, v in conn.items() if _text(k).startswith("remote")
                      and isinstance(v, dict)]
            out.append(LoadedConn(_text(name), tuple(_text(r.get("id", b"%any")) for r in rounds),
                                  tuple(_text(r.get("class", b"")) for r in rounds)))
    return out


def has_conn(s: vici.Session, name: str) -> bool:
    """Whether charon holds conn `name`."""
    return any(name in entry for entry in list(s.list_conns({"ike": name})))


def psk_wildcards(loaded: list[LoadedConn]) -> list[str]:
    """Conns that accept any identity by a pre-shared key (lab-notes, Careful 2): whoever has
    the key may claim any name there, so such an identity proves nothing."""
    return [c.name for c in loaded
            if any(cls == "pre-shared key" and ident in ("%any", "")
                   for ident, cls in zip(c.remote_ids, c.remote_classes, strict=True))]


def foreign(loaded: list[LoadedConn]) -> list[str]:
    """Conns neither the Provisioner nor the responder loaded."""
    return [c.name for c in loaded if not c.name.startswith((CONN_PREFIX, RESPONDER_PREFIX))]


def ike_sas(s: vici.Session, name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(conn name, IKE_SA) of every IKE_SA (of conn `name`)."""
    sas = list(s.list_sas({"ike": name} if name else None))
    return [(_text(n), ike) for sa in sas for n, ike in sa.items()]


def live_ike_ids(s: vici.Session, name: str) -> set[str]:
    """Unique ids of the ESTABLISHED IKE_SAs of conn `name` that hold an INSTALLED CHILD_SA."""
    out = set()
    for _, ike in ike_sas(s, name):
        children = (ike.get("child-sas") or {}).values()
        if _text(ike.get("state", b"")) == "ESTABLISHED" and any(
                _text(c.get("state", b"")) == "INSTALLED" for c in children):
            out.add(_text(ike.get("uniqueid", b"")))
    return out


def responder_sas(s: vici.Session) -> dict[str, list[dict[str, str]]]:
    """Our responder conns' IKE_SAs: conn name -> [{"id", "remote-host", "state"}]."""
    out: dict[str, list[dict[str, str]]] = {}
    for name, ike in ike_sas(s):
        if name.startswith(RESPONDER_PREFIX) and name != WILDCARD:
            out.setdefault(name, []).append({k: _text(ike.get(k, b"")) for k in
                                             ("uniqueid", "remote-host", "remote-id", "state")})
    return out


def terminate_id(s: vici.Session, ike_id: str) -> None:
    """Terminate one IKE_SA by unique id (gone already: fine)."""
    with contextlib.suppress(vici.exception.CommandException):
        for _ in s.terminate({"ike-id": ike_id, "force": "yes", "timeout": _TERMINATE_MS}):
            pass


def _text(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
