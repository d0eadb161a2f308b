"""The one fake provisioning backend of the unit tests.

It is the product's `DryRunBackend` (quiet: its warnings are for people running the resolver,
not for tests), so what the fake reports as installed is what the dry run would, plus faults
injected into InstallTunnel: a gate to hold setups open, a hang, a failure (for every
destination or some). `intents` records every intent asked for, in order, failed ones too;
the dry run's own `log` and `items` record only what succeeded.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv6Address

from resolver.errors import ProvisioningError
from resolver.tunnels.dryrun import DryRunBackend
from resolver.tunnels.intents import InstallTunnel, Intent


class FakeBackend(DryRunBackend):
    """Args:
        fail: raised by InstallTunnel (after `gate`), for the destinations in `fail_for`
            (None: all).
    """

    def __init__(self, fail: ProvisioningError | None = None, *,
                 fail_for: set[IPv4Address | IPv6Address] | None = None) -> None:
        super().__init__(quiet=True)
        self.intents: list[Intent] = []
        self.fail = fail
        self.fail_for = fail_for
        self.gate: asyncio.Event | None = None  # InstallTunnel waits for it, if set
        self.hang = False  # InstallTunnel never returns

    async def apply(self, intent: Intent) -> None:
        self.intents.append(intent)
        if isinstance(intent, InstallTunnel):
            if self.gate is not None:
                await self.gate.wait()
            if self.hang:
                await asyncio.sleep(3600)
            if self.fail is not None and (self.fail_for is None
                                          or intent.spec.destination in self.fail_for):
                raise self.fail
        await super().apply(intent)

    def kinds(self) -> list[str]:
        """The intents' type names, in order."""
        return [type(i).__name__ for i in self.intents]

    def of(self, kind: type) -> list[Intent]:
        """The intents of one type, in order."""
        return [i for i in self.intents if isinstance(i, kind)]
