"""What the Provisioner asks a backend to do: tunnel specs, intents, and what a backend holds.

Pure data and naming, no I/O: the Provisioner, the backends and the endpoints core all speak
these types, and none of them imports another to get them.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

import dns.name

from resolver.ipseckey import NO_GATEWAY, IpsecKey

Address = IPv4Address | IPv6Address

CONN_PREFIX: Final = "isk-"

# What charon does with a CHILD_SA when DPD finds its peer dead: "clear" closes it and does
# nothing more (charon's default, written down because it matters): the watch sees the
# IKE_SA's ike-updown, shunts, marks the tunnel DOWN and repairs it on its own schedule.
# "restart" would have charon re-initiate beside our repair (two IKE_SAs racing), and "trap"
# adds nothing to the trap start_action already installs.
DPD_CHILD_OPTIONS: Final = {"dpd_action": "clear"}


def dpd_options(delay: int) -> dict[str, str]:
    """The IKE conn options for `[provision] dpd_delay` (0: off), on every conn we load, the
    initiator's (resolver/tunnels/vici.py) and the responder's (resolver/responder/core.py).

    IKEv2 has no DPD timeout of its own: charon sends an empty INFORMATIONAL request once
    `dpd_delay` seconds pass without any IKE or ESP packet from the peer and, if no reply
    comes, retransmits it per charon.retransmit_tries/_timeout/_base (defaults 5, 4 s, 1.8:
    about 165 s), then closes the IKE_SA, which the watch hears as down. `dpd_timeout` is
    IKEv1's alone (charon ignores it for IKEv2), so it is not sent."""
    return {"dpd_delay": f"{delay}s"}


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    """Everything a backend needs to bring one host-to-host tunnel up.

    `destination` is the address the DNS answer leads to (the remote traffic selector, /32 or
    /128); `remote_addr` is the IKE peer: the destination itself, or the gateway of a gateway
    IPSECKEY. `remote_id` is the IKE identity the key is bound to.
    """

    name: str
    destination: Address
    remote_addr: Address
    remote_id: str
    key: IpsecKey

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> TunnelSpec:
        """The spec of a `to_json` mapping (extra keys are ignored).

        Raises:
            ValueError: a field is missing or malformed (UnusableKey for the key's fields).
        """
        try:
            return cls(name=str(doc["name"]),
                       destination=ipaddress.ip_address(doc["destination"]),
                       remote_addr=ipaddress.ip_address(doc["remote_addr"]),
                       remote_id=str(doc["remote_id"]),
                       key=IpsecKey.from_json(doc))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"stored tunnel: {exc!r}") from None

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON values, its key's fields flat beside its own (the form of the
        provisioner's state file since version 1)."""
        return self.key.to_json() | {
            "name": self.name,
            "destination": str(self.destination),
            "remote_addr": str(self.remote_addr),
            "remote_id": self.remote_id,
        }


@dataclass(frozen=True, slots=True)
class InstallTunnel:
    """Load the peer's key and connection, initiate, and return once the CHILD_SA is INSTALLED.

    `replaces`: a tunnel of the same name is up with another key or gateway. Make before break:
    the backend brings a new SA up under the new configuration and only then ends the old SAs
    of that name; if the new one fails, the old SAs are left alone.
    """

    spec: TunnelSpec
    timeout: float
    replaces: bool = False


@dataclass(frozen=True, slots=True)
class RemoveTunnel:
    """Terminate the SAs (IKE too) of connection `name`, then unload it. Idempotent.

    `keep_conn`: terminate only; the connection stays loaded (a pinned peer whose setup failed:
    its conn, with a trap, is what lets the peer initiate to us meanwhile).
    """

    name: str
    keep_conn: bool = False


@dataclass(frozen=True, slots=True)
class InstallShunt:
    """Drop traffic to `destination` (a kernel BLOCK policy). Idempotent."""

    destination: Address


@dataclass(frozen=True, slots=True)
class RemoveShunt:
    """Remove our drop shunt for `destination`. Idempotent."""

    destination: Address


@dataclass(frozen=True, slots=True)
class InstallFloor:
    """Put a floor under the tunnel to `destination`: for as long as it stays, the
    destination's packets are dropped whenever the tunnel's own path is not there (charon lost
    the SA, stopped or died), from that instant, not when the watch has acted. It never
    blocks the tunnel itself, so it is applied once the tunnel is up (the backend looks at the
    tunnel's path to choose the mechanism). Idempotent."""

    destination: Address


@dataclass(frozen=True, slots=True)
class RemoveFloor:
    """Remove the floor under the tunnel to `destination`. Idempotent."""

    destination: Address


Intent = InstallTunnel | RemoveTunnel | InstallShunt | RemoveShunt | InstallFloor | RemoveFloor


class ItemKind(enum.Enum):
    TUNNEL = "tunnel"
    SHUNT = "shunt"
    FLOOR = "floor"


@dataclass(frozen=True, slots=True)
class PolicyKey:
    """One thing a backend has installed: a tunnel by connection name, a shunt or a floor by
    address."""

    kind: ItemKind
    ident: str

    @classmethod
    def tunnel(cls, name: str) -> PolicyKey:
        return cls(ItemKind.TUNNEL, name)

    @classmethod
    def shunt(cls, destination: Address) -> PolicyKey:
        return cls(ItemKind.SHUNT, str(destination))

    @classmethod
    def floor(cls, destination: Address) -> PolicyKey:
        return cls(ItemKind.FLOOR, str(destination))


_UNSAFE = re.compile(r"[^a-z0-9-]")


def connection_name(owner: dns.name.Name, destination: Address) -> str:
    """A connection name safe for charon: "isk-" + up to 20 sanitized characters of the first
    label + "-" + 10 hex digits of SHA-256(owner, destination).

    DNS labels may hold any octet; only [a-z0-9-] survive, and the hash keeps names of
    different owners/destinations apart whatever the sanitizing folded together.
    """
    first = owner.labels[0] if owner.labels and owner != dns.name.root else b"root"
    label = _UNSAFE.sub("", first.decode("ascii", "replace").lower())[:20] or "x"
    digest = hashlib.sha256(owner.to_digestable() + destination.packed).hexdigest()[:10]
    return f"{CONN_PREFIX}{label}-{digest}"


def tunnel_spec(key: IpsecKey, destination: Address, gateway_addr: Address | None) -> TunnelSpec:
    """The tunnel for `destination` authenticated by `key`.

    Args:
        key: the (best) secure IpsecKey of the destination's name.
        destination: one address of the answer.
        gateway_addr: the gateway's address when `key.gateway` is a name (resolved by the
            caller); ignored otherwise.

    Raises:
        ValueError: a name gateway without `gateway_addr`, or an address family mismatch.
    """
    gw = key.gateway
    if gw is NO_GATEWAY:
        remote: Address = destination
        remote_id = key.owner.to_text(omit_final_dot=True)
    elif isinstance(gw, dns.name.Name):
        if gateway_addr is None:
            raise ValueError(f"gateway {gw} of {key.owner} has no address")
        remote, remote_id = gateway_addr, gw.to_text(omit_final_dot=True)
    else:
        # An address gateway tells us where, not who: the key is what authenticates it, and the
        # identity is its address (charon matches the key to that id; see resolver/tunnels/vici.py).
        remote, remote_id = gw, str(gw)
    # The TTL is a property of one answer, not of the key: keep it out of the spec so that an
    # aged or republished TTL never looks like a key change (which would replace the tunnel).
    return TunnelSpec(connection_name(key.owner, destination), destination, remote, remote_id,
                      dataclasses.replace(key, ttl=0))
