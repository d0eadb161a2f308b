"""This host's current addresses, as `autosp publish --address auto` publishes them.

Theory of operation: the kernel's address list (netlink, via pyroute2) is read at the edge and
turned into plain `InterfaceAddress` values; `select_published` (pure) keeps the addresses that
other hosts can reach us at:

- scope global only (drops loopback ::1/127.0.0.1 and link-local fe80::/10, 169.254/16);
- no temporary (RFC 8981 privacy), deprecated, tentative or DAD-failed IPv6 addresses: privacy
  addresses change on purpose and a deprecated one is on its way out, so publishing them would
  make the name point at an address that soon stops working;
- nothing on an interface that is down.

Private (RFC 1918) and ULA addresses are kept: on a site network they are exactly what peers use.
Behind NAT the right public address cannot be seen from here; pass it with `--address`.
"""

from __future__ import annotations

from resolver.hostaddr import InterfaceAddress, IPAddress, read_interface_addresses

__all__ = ["IPAddress", "InterfaceAddress", "read_interface_addresses", "select_published"]


# linux/if_addr.h
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
_UNUSABLE = IFA_F_TEMPORARY | IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE
RT_SCOPE_UNIVERSE = 0


def select_published(entries: list[InterfaceAddress]) -> list[IPAddress]:
    """The addresses worth publishing, IPv4 first, each once, in a stable order."""
    chosen: set[IPAddress] = set()
    for e in entries:
        a = e.address
        if not e.up or e.scope != RT_SCOPE_UNIVERSE or e.flags & _UNUSABLE:
            continue
        if a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified:
            continue
        chosen.add(a)
    return sorted(chosen, key=lambda a: (a.version, int(a)))
