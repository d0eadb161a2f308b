"""What the VICI log listener hands the responder: charon's events, filtered on its thread.

Theory of operation. resolver/tunnels/vici_log.py calls `EventFeed.feed(label, event)` on its
own thread for every event charon sends (about 20 log lines per IKE_SA), so the feed is cheap,
keeps its own state, and hands over (to the responder's event loop) only what matters:

  * `UnknownInitiator`: an IKE_SA fell back to our wildcard conn (the log lines paired by
    resolver/responder/charonlog.py `Tracker`; the IKE_SA's ike-updown "down" is the second
    source), once per IKE_SA whichever source reports it first;
  * `Up` / `Down`: an IKE_SA of one of our learned conns came up (the peer is authenticated:
    the responder logs how) or went;
  * `WildcardUp`: an IKE_SA came up under the wildcard, which its constraint forbids (the
    responder terminates it);
  * `Connected`: the listener (re)registered with charon, which may have restarted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from resolver.responder.charonlog import LogLine, Tracker, UnknownInitiator, from_updown
from resolver.responder.core import RESPONDER_PREFIX, WILDCARD

TRIGGERED_KEPT: Final = 4096  # IKE_SA ids already handed over (log and updown dedupe)


@dataclass(frozen=True, slots=True)
class Up:
    name: str
    ike_id: str
    remote_host: str
    remote_id: str


@dataclass(frozen=True, slots=True)
class Down:
    name: str
    ike_id: str


@dataclass(frozen=True, slots=True)
class WildcardUp:
    ike_id: str


@dataclass(frozen=True, slots=True)
class Connected:
    """The log session registered (again): charon may have restarted and lost our conns."""


Event = UnknownInitiator | Up | Down | WildcardUp | Connected


class EventFeed:
    """The listener thread's side (see the module docstring); its state is that thread's."""

    def __init__(self) -> None:
        self._tracker = Tracker(WILDCARD)
        self._triggered: OrderedDict[str, None] = OrderedDict()

    def feed(self, label: str, event: dict[str, Any]) -> Event | None:
        if label == "log":
            found = self._tracker.feed(LogLine.of(event))
            return self._first(found) if found is not None else None
        if label == "connected":
            return Connected()
        up = event.get("up") == "yes"
        for name, ike in event.items():
            if not isinstance(ike, dict):
                continue
            ike_id = str(ike.get("uniqueid", ""))
            if name == WILDCARD:
                if label == "ike-updown" and up:
                    return WildcardUp(ike_id)
                if label == "ike-updown":
                    found = from_updown(name, ike, WILDCARD)
                    return self._first(found) if found is not None else None
            elif name.startswith(RESPONDER_PREFIX) and label == "ike-updown":
                if up:
                    return Up(name, ike_id, str(ike.get("remote-host", "")),
                              str(ike.get("remote-id", "")))
                return Down(name, ike_id)
        return None

    def _first(self, found: UnknownInitiator) -> UnknownInitiator | None:
        """Each IKE_SA once (the log and the updown event both report it)."""
        if found.ike_id in self._triggered:
            return None
        self._triggered[found.ike_id] = None
        while len(self._triggered) > TRIGGERED_KEPT:
            self._triggered.popitem(last=False)
        return found
