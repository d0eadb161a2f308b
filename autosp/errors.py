"""autosp's errors, each mapped to one exit status by `autosp.cli`.

`resolver.errors.ConfigError` (bad input or configuration, the user's fault) exits 2. The two
classes here cover the other outcomes the CLI distinguishes:

- `OperationFailed` (exit 1): the input was fine but the operation did not succeed: the DNS server
  refused the update, the TSIG signature was rejected, the server did not answer, a racing
  publisher changed the records first.
- `ResolverUnreachable` (exit 3): the resolver's control socket cannot be reached (no daemon
  listening, or none answering). Not the IKE daemon: that one is the resolver's business
  (`resolver.errors.IkeDaemonUnreachable`, reported to autosp as code "ike-unreachable").
"""

from resolver.errors import ResolverError


class OperationFailed(ResolverError):
    """A well-formed request did not succeed (remote refusal, timeout, race). autosp exits 1."""


class ResolverUnreachable(ResolverError):
    """The ipseckey-resolver daemon's control socket cannot be reached. autosp exits 3."""
