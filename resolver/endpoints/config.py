"""[control]: whether the control socket is on, where it is, and where pinned endpoints are kept.

Parsed through configtable.Table like every other table, so a problem is a ConfigError naming
the file, [control], the key and why. Apart from the server (control.py) so that the config
summary and `--check-config` need not import the socket code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

from resolver.configtable import Section, Table
from resolver.endpoints.protocol import DEFAULT_SOCKET

DEFAULT_STATE_FILE: Final = Path("/var/lib/ipseckey-resolver/endpoints.json")
# sun_path holds 108 bytes including the NUL; a longer path cannot be bound.
MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True, slots=True)
class ControlConfig(Section):
    """The parsed [control] table.

    ```toml
    [control]
    enabled = true                                       # false: no socket, no endpoints
    socket = "/run/ipseckey-resolver/control.sock"       # parent dir is made 0700 if missing
    state_file = "/var/lib/ipseckey-resolver/endpoints.json"   # the pinned endpoints
    ```
    """

    TABLE: ClassVar[str] = "control"

    enabled: bool = True
    socket: Path = DEFAULT_SOCKET
    state_file: Path = DEFAULT_STATE_FILE

    @classmethod
    def from_table(cls, t: Table) -> ControlConfig:
        """Parse the [control] table."""
        d = cls()
        cfg = cls(
            enabled=t.get("enabled", bool, d.enabled),
            socket=Path(t.get("socket", str, str(d.socket), _socket_path)),
            state_file=Path(t.get("state_file", str, str(d.state_file), _absolute)),
        )
        t.done()
        return cfg


def _absolute(value: str) -> str | None:
    return None if Path(value).is_absolute() else f"{value!r} is not an absolute path"


def _socket_path(value: str) -> str | None:
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        return f"path longer than {MAX_SOCKET_PATH} bytes (a Unix socket limit)"
    return _absolute(value)
