"""The exception hierarchy of ipseckey-resolver.

Results are values (see ``validate.Security``); exceptions are for faults. Foreign exceptions
(``NetlinkError``, ``vici.exception.*``, ``OSError`` from sockets) are translated once, at the
boundary where they arise, into one of these, so callers never need to know which library a
backend uses. Each class says whose fault it is, as h11's LocalProtocolError / RemoteProtocolError
split does.
"""

from pathlib import Path


class ResolverError(Exception):
    """Base class; never raised directly."""


class MalformedMessage(ResolverError):
    """The peer (a client or an upstream) sent bytes that are not valid DNS. Remote's fault.

    A client's malformed query becomes FORMERR when its header can be read; otherwise it is dropped.
    """


class UpstreamError(ResolverError):
    """No upstream gave a usable answer in time (timeouts, refused, mismatched answers)."""


class ConfigError(ResolverError):
    """Configuration or command-line input is invalid. Local (the operator's) fault.

    The message names the file, the key or line, and the problem. autosp exits 2 on it.
    """


class ProvisioningError(ResolverError):
    """A backend could not apply an intent.

    For example: the IKE daemon is unreachable, it rejected the key, or no CHILD_SA came up.
    """


class TunnelTimeout(ProvisioningError):
    """The CHILD_SA was not reported INSTALLED within the timeout. The peer's (or path's) fault."""


class IkeDaemonUnreachable(ProvisioningError):
    """The IKE daemon's control socket could not be used. Local fault."""


class TunnelRejected(ProvisioningError):
    """The IKE daemon refused or failed the setup (authentication, proposals, bad config)."""


class StateUnrecorded(ProvisioningError):
    """A tunnel came up but the state file could not record it (disk full, read-only state
    directory), so it was undone: nothing is answered over an SA that a restart would not know
    about. Local fault. The message says why the write failed.
    """


class StateCorrupt(ResolverError):
    """A state file exists but cannot be read as what its owner wrote. Local fault (writes are
    atomic, so not a crash of ours: a disk, an editor, another program).

    The file has been moved to `aside` (None: that failed too), so it is kept, not overwritten.
    """

    def __init__(self, path: Path, aside: Path | None, reason: str) -> None:
        kept = f"kept as {aside}" if aside is not None else "could not be set aside"
        super().__init__(f"state file {path} unreadable ({reason}); {kept}")
        self.path, self.aside, self.reason = path, aside, reason


class StateWriteFailed(ResolverError, OSError):
    """A state file could not be written (disk full, read-only, a directory in the way). Local
    fault. Also an OSError, which is what it wraps: a caller that cannot act on it lets it
    through as the bug-class failure it was before this class existed (SERVFAIL, logged)."""

class AddressBound(ProvisioningError):
    """A live tunnel to the address was made for another name, with another key.

    The address stays bound to the key of the name whose lookup made the tunnel until that
    lease ends (or, for a pinned endpoint, until it is removed): a second name cannot re-key it
    (DESIGN.md, security requirement 7). The other zone's fault, or an attack.
    """


class BudgetExceeded(ResolverError):
    """A per-query work limit (signature checks, NSEC3 hashes, upstream queries) ran out.

    Raised inside validation and caught there: it ends as a BOGUS or INDETERMINATE verdict, never as
    an exception that leaves the resolution core.
    """
