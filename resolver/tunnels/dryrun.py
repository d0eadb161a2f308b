"""A backend that only logs: for trying the resolver on a machine without an IKE daemon.

It is used only when the configuration says `backend = "dryrun"`; nothing falls back to it. A
private destination answered through it is NOT protected, and it says so in every log line.
"""

from __future__ import annotations

import logging

from resolver.tunnels.intents import InstallShunt, InstallTunnel, Intent, PolicyKey, RemoveTunnel

log = logging.getLogger(__name__)


class DryRunBackend:
    """Logs intents and remembers them; brings nothing up. Only when configured explicitly
    (`backend = "dryrun"`): a private destination answered through it is NOT protected.

    `quiet`: no warning per intent. For the unit tests' fake (tests/fakes.py), which is this
    backend with faults injected; the daemon never sets it.
    """

    def __init__(self, *, quiet: bool = False) -> None:
        self.items: set[PolicyKey] = set()
        self.log: list[Intent] = []
        self.quiet = quiet

    async def apply(self, intent: Intent) -> None:
        if not self.quiet:
            log.warning("dry run (nothing is protected): %s", intent)
        self.log.append(intent)
        if isinstance(intent, InstallTunnel):
            self.items.add(PolicyKey.tunnel(intent.spec.name))
        elif isinstance(intent, RemoveTunnel):
            if not intent.keep_conn:  # kept: still loaded, as charon would have it
                self.items.discard(PolicyKey.tunnel(intent.name))
        elif isinstance(intent, InstallShunt):
            self.items.add(PolicyKey.shunt(intent.destination))
        else:
            self.items.discard(PolicyKey.shunt(intent.destination))

    async def installed(self) -> frozenset[PolicyKey]:
        return frozenset(self.items)
