"""`autosp publish`'s edge: talk to the primary server and to a validating resolver.

Theory of operation (the decisions are in `autosp.plan`; this module only does I/O):

1. find the zone of NAME with an SOA query to the primary (unless --zone is given);
2. read the A, AAAA and IPSECKEY RRsets at NAME from the primary (authoritative answers, TCP);
3. `plan.build_plan` turns what was read and what is wanted into UPDATE steps with
   prerequisites (and a wait, for a key rollover);
4. each step is sent TSIG-signed over TCP; every failure becomes one `OperationFailed` with a
   sentence saying what happened and what to do (REFUSED/NOTAUTH: wrong or missing key, BADSIG:
   wrong secret, NXRRSET/YXRRSET: someone else changed the records first, timeout: server
   unreachable);
5. the final records are looked up through a validating resolver with DO=1 and AD=1 until they
   come back equal to what was published and with the AD bit, or the check time runs out. The
   result says "secure" or why not.

Every foreign exception (dnspython, socket) is translated here, once.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.tsig
import dns.update

from autosp.errors import OperationFailed
from autosp.plan import AAAA, IPSECKEY, A, Current, RRsetState, Update
from autosp.updatemsg import build_update_message
from resolver.errors import ConfigError

READ_TYPES = (A, AAAA, IPSECKEY)


@dataclass(frozen=True, slots=True)
class Server:
    """An address and port to send DNS messages to."""

    address: str
    port: int = 53

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else \
            f"{self.address}:{self.port}"


def server_address(text: str, port: int) -> Server:
    """A server given as an address or a host name (resolved with the system resolver).

    Raises:
        ConfigError: the name does not resolve.
    """
    try:
        return Server(str(ipaddress.ip_address(text)), port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(text, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--server {text}: cannot resolve: {exc}") from None
    return Server(str(infos[0][4][0]), port)


def _exchange(msg: dns.message.Message, server: Server, timeout: float,
              what: str) -> dns.message.Message:
    """Send one message over TCP and translate every transport and TSIG failure."""
    try:
        return dns.query.tcp(msg, server.address, port=server.port, timeout=timeout)
    except dns.exception.Timeout:
        raise OperationFailed(f"{what}: no answer from {server} within {timeout:g} s "
                              "(server down or unreachable?)") from None
    except dns.tsig.PeerBadKey:
        raise OperationFailed(f"{what}: {server} does not know our TSIG key name (BADKEY): "
                              "wrong key file?") from None
    except dns.tsig.PeerBadSignature:
        raise OperationFailed(f"{what}: {server} rejected our TSIG signature (BADSIG): the "
                              "key's secret or algorithm does not match the server's") from None
    except dns.tsig.PeerBadTime:
        raise OperationFailed(f"{what}: {server} rejected our TSIG time (BADTIME): this "
                              "host's clock is off by more than 5 minutes") from None
    except dns.tsig.PeerError as exc:
        raise OperationFailed(f"{what}: {server} rejected our TSIG signature: {exc}") from None
    except dns.tsig.BadSignature:
        raise OperationFailed(f"{what}: the TSIG signature on {server}'s reply does not "
                              "verify (a different key on the server, or tampering)") from None
    except (OSError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else \
            (str(exc) or type(exc).__name__)
        raise OperationFailed(f"{what}: cannot reach {server}: {reason}") from None
    except dns.exception.DNSException as exc:
        raise OperationFailed(f"{what}: bad reply from {server}: {exc}") from None


def find_zone(name: dns.name.Name, server: Server, timeout: float) -> dns.name.Name:
    """The zone containing `name`, from the primary's own SOA answer.

    Raises:
        OperationFailed: the server refuses, is not authoritative, or has delegated `name`.
    """
    q = dns.message.make_query(name, dns.rdatatype.SOA)
    q.flags &= ~dns.flags.RD
    r = _exchange(q, server, timeout, f"finding the zone of {name}")
    rcode = r.rcode()
    if rcode == dns.rcode.REFUSED:
        raise OperationFailed(f"{server} refuses queries for {name}: it is not a server for "
                              "its zone (give the primary with --server)")
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise OperationFailed(f"{server} answers {dns.rcode.to_text(rcode)} to the SOA query "
                              f"for {name}")
    for section in (r.answer, r.authority):
        for rrset in section:
            if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
                return rrset.name
    raise OperationFailed(f"{server} is not authoritative for {name} (no SOA in its answer; "
                          "delegated elsewhere?). Give the zone's primary with --server, or "
                          "--zone")


def read_current(name: dns.name.Name, server: Server, timeout: float) -> Current:
    """The A, AAAA and IPSECKEY RRsets at `name` as the primary serves them now.

    Raises:
        OperationFailed: no authoritative answer.
    """
    rrsets: dict[dns.rdatatype.RdataType, RRsetState] = {}
    for rdtype in READ_TYPES:
        q = dns.message.make_query(name, rdtype)
        q.flags &= ~dns.flags.RD
        r = _exchange(q, server, timeout, f"reading {name} {dns.rdatatype.to_text(rdtype)}")
        if r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise OperationFailed(f"{server} answers {dns.rcode.to_text(r.rcode())} for "
                                  f"{name} {dns.rdatatype.to_text(rdtype)}")
        if not r.flags & dns.flags.AA:
            raise OperationFailed(f"{server} is not authoritative for {name} (no AA bit); "
                                  "--server must be the zone's primary")
        for rrset in r.answer:
            if rrset.name == name and rrset.rdtype == rdtype:
                rrsets[rdtype] = RRsetState(rdtype, frozenset(rrset), rrset.ttl)
    return Current(name, rrsets)


_PREREQ_FAILED = {dns.rcode.NXRRSET, dns.rcode.YXRRSET, dns.rcode.NXDOMAIN, dns.rcode.YXDOMAIN}


def send_update(update: Update, key: dns.tsig.Key, server: Server, timeout: float) -> None:
    """Send one step, TSIG-signed, and check the answer.

    Raises:
        OperationFailed: the update was not applied (the message says why).
    """
    msg = build_update_message(update, key)
    what = f"updating {update.name} ({update.purpose})"
    r = _exchange(msg, server, timeout, what)
    rcode = r.rcode()
    if rcode == dns.rcode.NOERROR:
        if not r.had_tsig:
            raise OperationFailed(f"{what}: {server}'s reply is not TSIG-signed; cannot tell "
                                  "whether the update was applied")
        return
    zone = update.zone.to_text()
    text = dns.rcode.to_text(rcode)
    if rcode in (dns.rcode.REFUSED, dns.rcode.NOTAUTH):
        raise OperationFailed(f"{what}: {server} refused the update ({text}): key "
                              f"{key.name} is not allowed to update {zone}, or the server is "
                              "not the zone's primary. Nothing was changed.")
    if rcode in _PREREQ_FAILED:
        raise OperationFailed(f"{what}: prerequisite failed ({text}): the records at "
                              f"{update.name} changed since they were read (another publisher?)."
                              " Nothing was changed; run the command again.")
    if rcode == dns.rcode.NOTZONE:
        raise OperationFailed(f"{what}: {update.name} is not in zone {zone} (NOTZONE)")
    raise OperationFailed(f"{what}: {server} answered {text}; nothing was changed")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Outcome of the validating lookup after publishing."""

    secure: bool
    why: str  # empty when secure
    elapsed: float  # seconds from the start of the check to the last answer


def check_secure(name: dns.name.Name,
                 final: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]],
                 resolver: Server, timeout: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> CheckResult:
    """Ask a validating resolver until it returns the published records with AD set.

    Polls every 20 ms (the primary signs within milliseconds, but a resolver that still caches
    the old data only lets go after its TTL) until `timeout` seconds have passed.
    """
    per_query = max(0.5, min(2.0, timeout))
    return poll_check(lambda: _check_once(name, final, resolver, per_query), clock(), timeout,
                      clock=clock, sleep=sleep)


def poll_check(once: Callable[[], str], start: float, timeout: float, *,
               clock: Callable[[], float], sleep: Callable[[float], None]) -> CheckResult:
    """Run `once` (it returns '' when secure, else why not) every 20 ms until it says secure or
    `timeout` seconds from `start` have passed; the last reason is the result's `why`."""
    while True:
        why = once()
        now = clock()
        if not why:
            return CheckResult(True, "", now - start)
        if now - start >= timeout:
            return CheckResult(False, why, now - start)
        sleep(0.02)


def ask(server: Server, name: dns.name.Name, rdtype: dns.rdatatype.RdataType, timeout: float,
        *, tcp: bool = False, role: str = "") -> dns.message.Message | str:
    """One query with DO and AD set (UDP with TCP fallback, or TCP only); the reply, or why
    there is none in words. `role` ("the resolver ") goes before the server in those words."""
    q = dns.message.make_query(name, rdtype, want_dnssec=True, use_edns=0)
    q.flags |= dns.flags.AD
    try:
        if tcp:
            return dns.query.tcp(q, server.address, port=server.port, timeout=timeout)
        r, _ = dns.query.udp_with_fallback(q, server.address, port=server.port, timeout=timeout)
    except dns.exception.Timeout:
        return f"{role}{server} did not answer within {timeout:g} s"
    except (OSError, dns.exception.DNSException) as exc:
        return f"cannot ask {role}{server}: {exc}"
    return r


def _check_once(name: dns.name.Name,
                final: dict[dns.rdatatype.RdataType, frozenset[dns.rdata.Rdata]],
                resolver: Server, timeout: float) -> str:
    """'' if every RRset is as published and AD is set; otherwise the reason why not."""
    for rdtype, want in sorted(final.items()):
        tname = f"{name} {dns.rdatatype.to_text(rdtype)}"
        r = ask(resolver, name, rdtype, timeout, role="the resolver ")
        if isinstance(r, str):
            return r
        if r.rcode() == dns.rcode.SERVFAIL:
            ede = "; ".join(f"EDE {e.code}: {e.text or dns.edns.EDECode.to_text(e.code)}"
                            for e in r.extended_errors())
            detail = f"; {ede}" if ede else ""
            return f"{resolver} answers SERVFAIL for {tname} (validation failed?{detail})"
        got: frozenset[dns.rdata.Rdata] = frozenset()
        ttl = 0
        for rrset in r.answer:
            if rrset.name == name and rrset.rdtype == rdtype:
                got, ttl = frozenset(rrset), rrset.ttl
        if got != want:
            return (f"{resolver} still returns other data for {tname} (cached, TTL {ttl} s "
                    "left)" if got else f"{resolver} does not return {tname} yet "
                    f"({dns.rcode.to_text(r.rcode())}; negative answer cached?)")
        if not r.flags & dns.flags.AD:
            return (f"{resolver} returns {tname} without the AD bit: the zone is unsigned, its "
                    "chain of trust is broken, or the resolver does not validate")
    return ""


def system_resolver(port: int = 53) -> Server:
    """The first nameserver of /etc/resolv.conf.

    Raises:
        ConfigError: no usable nameserver configured.
    """
    try:
        nameservers = dns.resolver.Resolver().nameservers
    except dns.exception.DNSException as exc:
        raise ConfigError(f"/etc/resolv.conf: {exc}; give --resolver") from None
    for ns in nameservers:
        try:
            return Server(str(ipaddress.ip_address(str(ns))), port)
        except ValueError:
            continue
    raise ConfigError("/etc/resolv.conf names no nameserver address; give --resolver")
