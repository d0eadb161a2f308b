"""[provision] and [identity]: the provisioner's configuration and this host as an IKE peer.

Parsed from the raw tables in Config.sections; every problem is a ConfigError that names the
file, the table and the key. Re-exported by resolver.provision.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any, Final

import dns.exception
import dns.name

from resolver.errors import ConfigError

Address = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class ProvisionConfig:
    """The parsed [provision] table.

    ```toml
    [provision]
    backend = "vici"                   # "vici", or "dryrun" (never implicit: logs only)
    vici_socket = "unix:///var/run/charon.vici"
    shunts = "xfrm"                    # "xfrm" or "none"
    timeout = 3.0                      # seconds until a setup counts as failed
    lease = 600                        # seconds a tunnel lives after the last answer...
    grace = 60                         # ...plus this, before teardown
    failure_hold = 10                  # seconds a failed setup is answered from memory
    max_setups = 32                    # IKE setups in flight at once; the rest wait their turn
    state_file = "/var/lib/ipseckey-resolver/state.json"
    watch_interval = 30                # seconds between checks of charon's SAs besides its
                                       # events (0: only events and reconnects)
    ```
    """

    backend: str = "vici"
    vici_socket: str = "unix:///var/run/charon.vici"
    shunts: str = "xfrm"
    timeout: float = 3.0
    lease: float = 600.0
    grace: float = 60.0
    failure_hold: float = 10.0
    max_setups: int = 32
    state_file: Path | None = None
    watch_interval: float = 30.0

    @classmethod
    def from_section(cls, section: Mapping[str, Any], source: str = "config") -> ProvisionConfig:
        """Parse Config.sections["provision"]. Raises ConfigError naming the key."""
        values: dict[str, Any] = {}
        for key, value in section.items():
            values[key] = _provision_value(key, value, source)
        return cls(**values)


_CHOICES: Final = {"backend": ("vici", "dryrun"), "shunts": ("xfrm", "none")}
_SECONDS: Final = {"timeout": (0.1, 60.0), "lease": (5.0, 86400.0), "grace": (0.0, 3600.0),
                   "failure_hold": (0.0, 3600.0), "watch_interval": (0.0, 3600.0)}


def _provision_value(key: str, value: Any, source: str) -> Any:
    def err(problem: str) -> ConfigError:
        return ConfigError(f"{source}: [provision] key {key!r}: {problem}")

    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise err(f"must be one of {', '.join(_CHOICES[key])}")
        return value
    if key in _SECONDS:
        lo, hi = _SECONDS[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise err(f"must be a number of seconds {lo:g}..{hi:g}")
        return float(value)
    if key == "max_setups":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise err("must be an integer 1..4096")
        return value
    if key == "vici_socket":
        if not isinstance(value, str) or not value.startswith(("unix://", "tcp://")):
            raise err("must be a unix:// or tcp:// URI")
        return value
    if key == "state_file":
        if not isinstance(value, str) or not value:
            raise err("must be a path")
        return Path(value)
    known = ", ".join([*_CHOICES, *_SECONDS, "max_setups", "vici_socket", "state_file"])
    raise err(f"unknown key (known: {known})")


@dataclass(frozen=True, slots=True)
class Identity:
    """This host as an IKE peer: [identity] fqdn, private_key (PKCS#8 PEM path), addresses."""

    fqdn: str
    private_key: Path
    addresses: tuple[Address, ...] = ()

    @classmethod
    def from_section(cls, section: Mapping[str, Any], source: str = "config") -> Identity:
        """Parse Config.sections["identity"]. Raises ConfigError naming the key."""

        def err(key: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: [identity] key {key!r}: {problem}")

        for key in section:
            if key not in ("fqdn", "private_key", "addresses"):
                raise err(key, "unknown key (known: fqdn, private_key, addresses)")
        for key in ("fqdn", "private_key"):
            if not isinstance(section.get(key), str) or not section[key]:
                raise err(key, "required, a string")
        try:
            fqdn = dns.name.from_text(section["fqdn"]).to_text(omit_final_dot=True)
        except dns.exception.DNSException as exc:
            raise err("fqdn", str(exc)) from None
        raw = section.get("addresses", [])
        if not isinstance(raw, list):
            raise err("addresses", "must be a list of addresses")
        try:
            addrs = tuple(ipaddress.ip_address(a) for a in raw)
        except ValueError as exc:
            raise err("addresses", str(exc)) from None
        return cls(fqdn, Path(section["private_key"]), addrs)

    def local_address(self, family: int) -> Address | None:
        """Our configured address of an IP version (4 or 6), if any."""
        return next((a for a in self.addresses if a.version == family), None)
