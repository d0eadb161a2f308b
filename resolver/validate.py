"""Chain of trust -> Security.  (Contract stub: the validator work replaces the body, keeps the names.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Security(enum.Enum):
    """Vocabulary taken from Unbound's sec_status."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The security status of one RRset or one whole answer, with why."""

    security: Security
    reason: str = ""
    ede: int | None = None  # a dns.edns.EDECode value for SERVFAIL answers
    valid_until: float | None = None  # earliest RRSIG expiration used (POSIX seconds)
