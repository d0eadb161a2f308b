"""IPSECKEY records for this host's key: parse the user's gateway/precedence, build the rdata
(through `resolver.ipseckey`, the project's one IPSECKEY encoder) and print a zone-file line."""

from __future__ import annotations

import ipaddress

import dns.exception
import dns.name
import dns.rdata
import dns.rdtypes.IN.IPSECKEY

from autosp.keygen import PublicKey
from resolver.errors import ConfigError
from resolver.ipseckey import ipseckey_rdata_for

Gateway = ipaddress.IPv4Address | ipaddress.IPv6Address | dns.name.Name | None
Ipseckey = dns.rdtypes.IN.IPSECKEY.IPSECKEY


def parse_gateway(text: str | None) -> Gateway:
    """--gateway: absent/"none"/"." (no gateway), an IPv4/IPv6 address, or a host name.

    Raises:
        ConfigError: not an address and not a valid host name.
    """
    if text is None or text in ("none", "."):
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"--gateway {text!r}: neither an address nor a DNS name: {exc}") from None
    if len(name) < 3:  # at least "host.zone." -- a bare TLD is surely a mistake
        raise ConfigError(f"--gateway {text!r}: give a fully qualified host name")
    return name


def check_precedence(precedence: int) -> None:
    """Raises ConfigError unless 0 <= precedence <= 255 (an 8-bit field)."""
    if not 0 <= precedence <= 255:
        raise ConfigError(f"--precedence {precedence}: must be 0..255")


def ipseckey_rdata(public_key: PublicKey, gateway: Gateway, precedence: int) -> Ipseckey:
    """The IPSECKEY rdata publishing `public_key`.

    Raises:
        ConfigError: the key cannot be carried in IPSECKEY.
    """
    try:
        rdata = ipseckey_rdata_for(public_key, gateway=gateway, precedence=precedence)
    except ValueError as exc:
        raise ConfigError(f"cannot publish this key as IPSECKEY: {exc}") from None
    if not isinstance(rdata, Ipseckey):  # the contract says rdata; be strict about it
        raise TypeError(f"ipseckey_rdata_for returned {type(rdata).__name__}")
    return rdata


def record_line(owner: dns.name.Name, ttl: int, rdata: dns.rdata.Rdata) -> str:
    """`OWNER TTL IN IPSECKEY ...` as one zone-file line."""
    # chunksize=0: the key in one piece, so it can be copied (dnspython splits every 32).
    return f"{owner.to_text()} {ttl} IN IPSECKEY {rdata.to_text(chunksize=0)}"
