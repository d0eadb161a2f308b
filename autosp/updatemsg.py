"""An `Update` step as a TSIG-signed RFC 2136 message (dnspython), built without I/O."""

from __future__ import annotations

import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.tsig
import dns.update

from autosp.plan import Update


def build_update_message(update: Update, key: dns.tsig.Key | None) -> dns.update.UpdateMessage:
    """The UPDATE message for one step.

    Prerequisites: "RRset exists (value dependent)" with the exact rdatas, or "RRset does not
    exist" when the expected set is empty. Updates: delete the whole RRset of each changed type,
    then add its new contents (an empty set is just the delete), so the result does not depend
    on what was there.

    Args:
        update: the step.
        key: TSIG key to sign with (None leaves it unsigned: only for tests and printing).
    """
    msg = dns.update.UpdateMessage(update.zone, rdclass=dns.rdataclass.IN)
    for rdtype, rdatas in sorted(update.prereqs.items()):
        if rdatas:
            msg.present(update.name, *sorted(rdatas, key=canonical_order))
        else:
            msg.absent(update.name, rdtype)
    for rdtype, rdatas in sorted(update.sets.items()):
        msg.delete(update.name, rdtype)
        if rdatas:
            rds = dns.rdataset.Rdataset(dns.rdataclass.IN, rdtype, ttl=update.ttl)
            for rd in sorted(rdatas, key=canonical_order):
                rds.add(rd)
            msg.add(update.name, rds)
    if key is not None:
        msg.use_tsig(key)
    return msg


def canonical_order(rd: dns.rdata.Rdata) -> bytes:
    """Sort key: canonical wire form, so that messages and scripts are reproducible."""
    return rd.to_digestable()
