"""What a tunnel backend reports on its own: charon's SA events and its control connection.

Pure data, named in the past tense (they happened). A backend that can watch (ViciBackend, via
CompositeBackend) delivers them on the event loop to the one sink `watch(sink)` registered;
resolver/provisioning/watch.py turns them into the Provisioner's view. Events are hints, never the
truth by
themselves: a reported "down" is checked against what the daemon holds (`live()`) before any
tunnel counts as lost, so that a rekey, a make-before-break replacement or our own teardown
is not mistaken for a loss.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ChildSaWentDown:
    """charon reported a CHILD_SA (or its IKE_SA) of connection `name` down.

    `gone_ike` / `gone_child` hold the unique ids the event named (charon counts IKE_SAs and
    CHILD_SAs separately), so that the check that follows does not count an SA that is being
    deleted as one that is still held.
    """

    name: str
    reason: str
    gone_ike: frozenset[str] = frozenset()
    gone_child: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ChildSaCameUp:
    """charon reported a CHILD_SA of connection `name` INSTALLED."""

    name: str


@dataclass(frozen=True, slots=True)
class ChildSaRekeyed:
    """charon replaced a CHILD_SA of `name` by a new one (not a loss: the new one carries)."""

    name: str


@dataclass(frozen=True, slots=True)
class DaemonDisconnected:
    """The event session to the IKE daemon closed or failed: it stopped, crashed or restarted.

    Whatever it held may be gone (with kernel-libipsec, the TUN device and its routes go with
    the process, and packets then leave in clear).
    """

    reason: str


@dataclass(frozen=True, slots=True)
class DaemonConnected:
    """The event session is (again) registered: what the daemon holds can be checked now."""

    first: bool  # the first connection since the watch started (not a reconnection)


@dataclass(frozen=True, slots=True)
class HeldSa:
    """One CHILD_SA the daemon holds now (installed, in an IKE_SA that is not being deleted)."""

    name: str  # the connection (= CHILD_SA) name
    ike_id: str
    child_id: str


BackendEvent = (ChildSaWentDown | ChildSaCameUp | ChildSaRekeyed | DaemonDisconnected
                | DaemonConnected)
