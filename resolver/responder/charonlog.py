"""What charon's VICI events say, as values: the unknown initiators and why an initiate failed.

Theory of operation. This module is pure: it reads the dictionaries the VICI `log`, `ike-updown`
and `child-updown` events carry (already decoded to str) and returns small values; the thread
that receives them is resolver/tunnels/vici_log.py, and what to do about them is decided in
resolver/responder/ (unknown initiators) and resolver/tunnels/vici.py (failure reasons).

strongSwan 5.9.8 has no VICI hook that supplies a key during IKE_AUTH (the `alert` event naming
the peer arrives only in 6.0.3), so the responder learns an unknown initiator from the log
(lab-notes, "Measured 2026-12-03"). Measured lines, one IKE_SA (`ikesa-uniqueid`) as responder:

    looking for peer configs matching 198.51.100.11[bob.example.test]...198.51.100.10[alice...]
    selected peer config 'iskr-wildcard'
    no trusted ED25519 public key found for 'alice.example.test'

and, when a conn for that identity exists but its key is not the one the initiator signs with
(a rollover), `switching to peer config 'iskr-wildcard'` after the constraint check failed. So:
the first line gives the initiator's address and identity (IDi), the second says that no conn of
ours knew it. Both are needed; `Tracker` pairs them by the IKE_SA's unique id, with a bound.

Parsing attacker-chosen text. IDi and IDr are chosen by the initiator and may contain anything,
including "]...198.51.100.10[" to fake an address. The line is read left to right: the local
part up to the *first* "]...", then the remote address (digits, hex, dots and colons only), then
the identity up to the *last* "]". Anything the initiator smuggled in then ends up inside the
identity, which must be a host name (no brackets) to be used at all (`identity_name`). The
`ike-updown` event of the failed IKE_SA carries the same two facts as separate fields
(`remote-host`, `remote-id`); `from_updown` reads those as the second source.

Failure reasons (issue 11, item 6). When our initiate fails, the log of that IKE_SA (its name is
our conn name) says what the peer answered; `failure_reason` turns the lines into words a person
can use: "... refused our authentication (AUTHENTICATION_FAILED) ...", "no response ...".
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final

import dns.exception
import dns.name

Address = IPv4Address | IPv6Address

_LOOKING: Final = re.compile(
    r"^looking for peer configs matching (?P<local>[^\[]*)\[(?P<lid>.*?)\]\.\.\."
    r"(?P<remote>[0-9A-Fa-f.:]+)\[(?P<rid>.*)\]$")
_SELECTED: Final = re.compile(r"^(?:selected|switching to) peer config '(?P<name>[^']*)'$")
_NOTIFY_ERROR: Final = re.compile(r"^received (?P<notify>[A-Z_0-9]+) notify error$")
_TS_UNACCEPTABLE: Final = "received TS_UNACCEPTABLE notify, no CHILD_SA built"
_RETRANSMIT: Final = re.compile(r"^(?:retransmit \d+ of request|giving up after \d+ retransmits)")
_WE_REFUSED: Final = (re.compile(r"^no trusted \S+ public key found for"),
                      re.compile(r"^signature validation failed"),
                      re.compile(r"^constraint check failed"))
_ESTABLISHED: Final = re.compile(r"^IKE_SA (?P<name>\S+)\[\d+\] established between ")

TRACKED_IKE_SAS: Final = 4096  # pending "looking for" lines kept; oldest dropped first


@dataclass(frozen=True, slots=True)
class LogLine:
    """One VICI `log` event."""

    ike_name: str  # the IKE_SA's conn name, "(unnamed)" before one is selected, "" if none
    ike_id: str  # its unique id ("" if the line is not about an IKE_SA)
    msg: str

    @classmethod
    def of(cls, event: Mapping[str, object]) -> LogLine:
        return cls(str(event.get("ikesa-name", "")), str(event.get("ikesa-uniqueid", "")),
                   str(event.get("msg", "")))


@dataclass(frozen=True, slots=True)
class UnknownInitiator:
    """charon fell back to our wildcard conn for an initiator: no conn of ours knew it (or its
    key). `identity` is IDi as charon printed it (unchecked); `address` its source address."""

    identity: str
    address: Address
    ike_id: str


def identity_name(identity: str) -> dns.name.Name | None:
    """IDi as an absolute DNS host name, or None if it is not one (an address, an email, a DN,
    a key id, anything with characters a host name cannot have)."""
    text = identity.rstrip(".")
    if not text or len(text) > 253 or "." not in text:
        return None
    if not all(c.isascii() and (c.isalnum() or c in "-.") for c in text):
        return None
    try:
        ipaddress.ip_address(text)
        return None  # an address identity says where, not who
    except ValueError:
        pass
    labels = text.split(".")
    if any(not lab or len(lab) > 63 or lab.startswith("-") or lab.endswith("-")
           for lab in labels):
        return None
    if labels[-1].isdigit():
        return None
    try:
        return dns.name.from_text(text.lower())
    except dns.exception.DNSException:
        return None


class Tracker:
    """Pairs the "looking for peer configs" line of an IKE_SA with the selection of `wildcard`.

    Bounded: at most TRACKED_IKE_SAS IKE_SAs are remembered between the two lines (a flood of
    IKE_AUTHs cannot grow it); the pair is forgotten once used.
    """

    def __init__(self, wildcard: str, limit: int = TRACKED_IKE_SAS) -> None:
        self.wildcard = wildcard
        self.limit = limit
        self._seen: OrderedDict[str, tuple[str, Address]] = OrderedDict()

    def __len__(self) -> int:
        """IKE_SAs waiting for their selection line."""
        return len(self._seen)

    def feed(self, line: LogLine) -> UnknownInitiator | None:
        """The unknown initiator this line completes, if any."""
        if not line.ike_id:
            return None
        m = _LOOKING.match(line.msg)
        if m is not None:
            try:
                address = ipaddress.ip_address(m["remote"])
            except ValueError:
                return None
            self._seen[line.ike_id] = (m["rid"], address)
            self._seen.move_to_end(line.ike_id)
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            return None
        m = _SELECTED.match(line.msg)
        if m is not None and m["name"] == self.wildcard:
            seen = self._seen.pop(line.ike_id, None)
            if seen is not None:
                return UnknownInitiator(seen[0], seen[1], line.ike_id)
        return None


def from_updown(name: str, ike: Mapping[str, object], wildcard: str
                ) -> UnknownInitiator | None:
    """The unknown initiator of an `ike-updown` (down) event of the wildcard conn: an IKE_SA
    that failed there, with its remote host and id as separate fields."""
    if name != wildcard or str(ike.get("state", "")) not in ("CONNECTING", "DELETING",
                                                              "DESTROYING"):
        return None
    try:
        address = ipaddress.ip_address(str(ike.get("remote-host", "")))
    except ValueError:
        return None
    return UnknownInitiator(str(ike.get("remote-id", "")), address,
                            str(ike.get("uniqueid", "")))


def established(line: LogLine) -> str | None:
    """The conn name of an IKE_SA this line reports established."""
    m = _ESTABLISHED.match(line.msg)
    return m["name"] if m is not None else None


# --- why an initiate failed ----------------------------------------------------------------


class Failure(enum.Enum):
    """What the log of a failed initiate showed, strongest evidence first."""

    AUTH_REFUSED = "AUTHENTICATION_FAILED"  # the peer refused our authentication
    NO_PROPOSAL = "NO_PROPOSAL_CHOSEN"  # the peer has no conn (or proposal) for us
    TS_UNACCEPTABLE = "TS_UNACCEPTABLE"  # the peer refused the traffic selectors
    OTHER_NOTIFY = "notify"  # another error notify from the peer
    PEER_UNPROVEN = "peer-unproven"  # we refused the peer's authentication
    NO_RESPONSE = "no-response"  # retransmits, no answer


# Which evidence wins when one attempt logged several (retransmits then a notify: the notify).
_RANK: Final = {f: i for i, f in enumerate(Failure)}


@dataclass(frozen=True, slots=True)
class Reason:
    """Why one initiate failed, from its log lines."""

    failure: Failure
    detail: str = ""  # the notify name (OTHER_NOTIFY) or our log line (PEER_UNPROVEN)

    def stronger(self, other: Reason | None) -> Reason:
        if other is None or _RANK[self.failure] < _RANK[other.failure]:
            return self
        return other

    @property
    def retry(self) -> bool:
        """Whether trying again soon may succeed: the peer did not know our key yet (its
        responder is looking it up now)."""
        return self.failure is Failure.AUTH_REFUSED

    def words(self, peer: str, us: str) -> str:
        """The reason for an EDE text, a log line and `autosp status`: what the peer said, in
        words, never our internal conn names."""
        if self.failure is Failure.AUTH_REFUSED:
            return (f"{peer} refused our authentication (AUTHENTICATION_FAILED): it does not "
                    f"accept {us} with our key (no responder that looks our key up, or its "
                    f"rules refuse us)")
        if self.failure is Failure.NO_PROPOSAL:
            return (f"{peer} has no IKE configuration for us (NO_PROPOSAL_CHOSEN): it runs no "
                    f"responder for unknown peers, or none of our proposals")
        if self.failure is Failure.TS_UNACCEPTABLE:
            return (f"{peer} refused the traffic selectors (TS_UNACCEPTABLE): it does not "
                    f"accept a tunnel between these addresses")
        if self.failure is Failure.OTHER_NOTIFY:
            return f"{peer} refused the IKE exchange ({self.detail})"
        if self.failure is Failure.PEER_UNPROVEN:
            return (f"{peer} did not authenticate with the key it publishes in DNS "
                    f"(our IKE daemon: {self.detail})")
        return f"no response from {peer} to IKE (UDP 500/4500)"


def failure_reason(line: LogLine) -> Reason | None:
    """The failure evidence in one log line of our own initiating IKE_SA, if any."""
    msg = line.msg
    m = _NOTIFY_ERROR.match(msg)
    if m is not None:
        notify = m["notify"]
        for failure in (Failure.AUTH_REFUSED, Failure.NO_PROPOSAL, Failure.TS_UNACCEPTABLE):
            if notify == failure.value:
                return Reason(failure)
        return Reason(Failure.OTHER_NOTIFY, notify)
    if msg == _TS_UNACCEPTABLE:
        return Reason(Failure.TS_UNACCEPTABLE)
    if _RETRANSMIT.match(msg):
        return Reason(Failure.NO_RESPONSE)
    if any(p.match(msg) for p in _WE_REFUSED):
        return Reason(Failure.PEER_UNPROVEN, msg)
    return None
