"""This host's addresses as the kernel reports them (netlink, via pyroute2).

Shared by the daemon (its own addresses are never tunnelled: policy rule 3) and by
`autosp publish --address auto` (which then keeps the publishable ones). One reader, so both
agree on what "our address" is, including the point-to-point case where IFA_ADDRESS is the
peer's address and IFA_LOCAL ours.

pyroute2 0.9 runs an event loop of its own: call this from a thread when one is running.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

IFF_UP = 0x1  # linux/if.h


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address as the kernel reports it."""

    address: IPAddress
    ifname: str
    scope: int  # RT_SCOPE_*: 0 universe (global), 253 link, 254 host
    flags: int  # IFA_F_*
    up: bool


def read_interface_addresses() -> list[InterfaceAddress]:
    """The kernel's address list in the current network namespace (netlink dump).

    Raises:
        OSError: netlink is unavailable (translated by the caller).
    """
    from pyroute2 import IPRoute  # imported here: only `publish --address auto` needs netlink

    out: list[InterfaceAddress] = []
    with IPRoute() as ipr:
        links = {int(m["index"]): (str(m.get("IFLA_IFNAME") or m["index"]), int(m["flags"]))
                 for m in ipr.get_links()}
        for m in ipr.addr("dump"):
            # For IPv4, IFA_LOCAL is our address (IFA_ADDRESS is the peer's on point-to-point).
            text = m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")
            if text is None:
                continue
            name, ifflags = links.get(int(m["index"]), (str(m["index"]), 0))
            flags = m.get("IFA_FLAGS")
            out.append(InterfaceAddress(
                address=ipaddress.ip_address(str(text).split("%")[0]),
                ifname=name,
                scope=int(m["scope"]),
                flags=int(flags if flags is not None else m["flags"]),
                up=bool(ifflags & IFF_UP),
            ))
    return out
