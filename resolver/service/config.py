"""[metrics] and [debug]: the tables of the service layer (resolver/service/runtime.py).

Apart from the code that uses them so that --check-config and --help (confighelp.py) parse
them without importing the HTTP listener or the metered parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final

from resolver.config import HostPort, parse_hostport
from resolver.configtable import Section, Table

DEFAULT_METRICS_PORT: Final = 9153  # the port CoreDNS' and other DNS exporters use


@dataclass(frozen=True, slots=True)
class MetricsConfig(Section):
    """The parsed [metrics] table.

    ```toml
    [metrics]
    listen = "127.0.0.1:9153"   # serve GET /metrics here; absent: no listener (the numbers
                                # are still counted, and shown by `autosp stats`)
    ```
    """

    TABLE: ClassVar[str] = "metrics"

    listen: HostPort | None = None

    @classmethod
    def from_table(cls, t: Table) -> MetricsConfig:
        """Parse the [metrics] table."""
        text = t.get("listen", str, None)
        t.done()
        if text is None:
            return cls(None)
        try:
            return cls(parse_hostport(text, default_port=DEFAULT_METRICS_PORT))
        except ValueError as exc:
            raise t.fail("listen", str(exc)) from None


@dataclass(frozen=True, slots=True)
class DebugConfig(Section):
    """The parsed [debug] table (never set in production).

    ```toml
    [debug]
    allow_hang = false   # true: the control socket accepts `debug-hang`, which blocks the
                         # event loop (to test that systemd's watchdog restarts us)
    ```
    """

    TABLE: ClassVar[str] = "debug"

    allow_hang: bool = False

    @classmethod
    def from_table(cls, t: Table) -> DebugConfig:
        """Parse the [debug] table."""
        cfg = cls(allow_hang=t.get("allow_hang", bool, False))
        t.done()
        return cfg
