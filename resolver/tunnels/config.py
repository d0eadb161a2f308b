"""[provision] and [identity]: the provisioner's configuration and this host as an IKE peer.

Parsed from the raw tables in Config.sections through configtable.Table, so every problem is a
ConfigError of the one shape (file, table, key, why) and unknown keys are refused.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import ClassVar, Final

import dns.exception
import dns.name

from resolver.configtable import Section, Table, between, non_empty, one_of

Address = IPv4Address | IPv6Address

# Beside [control]'s endpoints.json, in the directory the unit may write (ReadWritePaths) and
# tmpfiles.d creates.
DEFAULT_STATE_FILE: Final = Path("/var/lib/ipseckey-resolver/state.json")
# Seconds without an IKE or ESP packet from a peer before charon asks it whether it is alive.
DEFAULT_DPD_DELAY: Final = 30


@dataclass(frozen=True, slots=True)
class ProvisionConfig(Section):
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
    queue_timeout = 10                 # seconds a setup may wait for its turn (not counted
                                       # in `timeout`, which starts with the turn)
    state_file = "/var/lib/ipseckey-resolver/state.json"  # the tunnels, kept over a restart
    watch_interval = 30                # seconds between checks of charon's SAs besides its
                                       # events (0: only events and reconnects)
    worker_process = true              # VICI and XFRM in a child process (false: in threads
                                       # of the daemon, which then share its GIL)
    dpd_delay = 30                     # seconds without traffic from a peer before charon
                                       # checks it is alive (dead peer detection; 0: off)
    ```

    `dpd_delay` goes on every conn we load, initiator's and responder's: a peer whose charon
    went without a DELETE (kill -9, power loss, a laptop that changed network) is found dead
    within `dpd_delay` plus charon's retransmission time, and the watch brings the tunnel
    down, shunted, and repairs it (DESIGN.md, "The watch"). Whole seconds: what charon keeps.

    `state_file` is always set when parsed from a file: without it a restart (a watchdog
    restart, an upgrade) would see our tunnels in charon as strays and remove them, and the
    directory is the one the instance lock and [control] state_file use anyway. The
    dataclass's own default, None (nothing kept), is for a ProvisionConfig built in code: the
    unit tests, which must never write to /var/lib.
    """

    TABLE: ClassVar[str] = "provision"

    backend: str = "vici"
    vici_socket: str = "unix:///var/run/charon.vici"
    shunts: str = "xfrm"
    timeout: float = 3.0
    lease: float = 600.0
    grace: float = 60.0
    failure_hold: float = 10.0
    max_setups: int = 32
    queue_timeout: float = 10.0
    state_file: Path | None = None
    watch_interval: float = 30.0
    worker_process: bool = True
    dpd_delay: int = DEFAULT_DPD_DELAY

    @classmethod
    def from_table(cls, t: Table) -> ProvisionConfig:
        """Parse the [provision] table."""
        d = cls()
        cfg = cls(
            backend=t.get("backend", str, d.backend, one_of("vici", "dryrun")),
            vici_socket=t.get("vici_socket", str, d.vici_socket, _vici_uri),
            shunts=t.get("shunts", str, d.shunts, one_of("xfrm", "none")),
            timeout=t.get("timeout", float, d.timeout, between(0.1, 60, "seconds")),
            lease=t.get("lease", float, d.lease, between(5, 86400, "seconds")),
            grace=t.get("grace", float, d.grace, between(0, 3600, "seconds")),
            failure_hold=t.get("failure_hold", float, d.failure_hold,
                               between(0, 3600, "seconds")),
            max_setups=t.get("max_setups", int, d.max_setups, between(1, 4096)),
            queue_timeout=t.get("queue_timeout", float, d.queue_timeout,
                                between(0.1, 600, "seconds")),
            state_file=Path(t.get("state_file", str, str(DEFAULT_STATE_FILE), _absolute)),
            watch_interval=t.get("watch_interval", float, d.watch_interval,
                                 between(0, 3600, "seconds")),
            worker_process=t.get("worker_process", bool, d.worker_process),
            dpd_delay=t.get("dpd_delay", int, d.dpd_delay, _dpd_delay),
        )
        t.done()
        return cfg


def _dpd_delay(value: int) -> str | None:
    if value < 0:
        return "must be a number of seconds, 0 (off) or more"
    if value > 86400:
        return "must be at most 86400 seconds (a day)"
    return None


def _absolute(value: str) -> str | None:
    # A relative path would depend on the daemon's working directory (/ under systemd).
    return None if Path(value).is_absolute() else f"{value!r} is not an absolute path"


def _vici_uri(value: str) -> str | None:
    # VICI has no authentication of its own: whoever reaches the socket commands charon.
    # A unix socket is guarded by the file system; a TCP one by nothing, so it is refused.
    if value.startswith("tcp://"):
        return ("tcp:// is not supported (VICI has no authentication): use charon's unix "
                "socket, e.g. unix:///var/run/charon.vici")
    if not value.startswith("unix://") or value == "unix://":
        return "must be a unix:// URI (charon's VICI socket, e.g. unix:///var/run/charon.vici)"
    return None


@dataclass(frozen=True, slots=True)
class Identity(Section):
    """This host as an IKE peer: [identity] fqdn, private_key (PKCS#8 PEM path), addresses."""

    TABLE: ClassVar[str] = "identity"

    fqdn: str
    private_key: Path
    addresses: tuple[Address, ...] = ()

    @classmethod
    def from_table(cls, t: Table) -> Identity:
        """Parse the [identity] table."""
        try:
            fqdn = dns.name.from_text(t.need("fqdn", str, non_empty))
        except dns.exception.DNSException as exc:
            raise t.fail("fqdn", str(exc)) from None
        identity = cls(fqdn.to_text(omit_final_dot=True),
                       Path(t.need("private_key", str, non_empty)),
                       t.each("addresses", ipaddress.ip_address, ()))
        t.done()
        return identity

    def local_address(self, family: int) -> Address | None:
        """Our configured address of an IP version (4 or 6), if any."""
        return next((a for a in self.addresses if a.version == family), None)
