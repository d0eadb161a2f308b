"""`autosp publish`: turn the command line into a `plan.Desired`, plan, execute, check.

The steps are listed in `autosp.publish`'s docstring; this module wires them to the arguments and
prints what happened. Output: what was published and the check's verdict on stdout; progress of a
rollover wait on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path

import dns.exception
import dns.name
import dns.rdata
import dns.rdatatype

from autosp import addresses, keygen, records
from autosp.errors import OperationFailed
from autosp.freshcheck import check_fresh
from autosp.nsupdate import plan_script, run_nsupdate
from autosp.plan import Desired, Ipseckey, Mode, Plan, Update, build_plan
from autosp.publish import (
    Server,
    find_zone,
    read_current,
    send_update,
    server_address,
    system_resolver,
)
from autosp.tsig import TsigKey, load_tsig_key
from resolver.errors import ConfigError

MAX_TTL = 0x7FFFFFFF


def _name(text: str, what: str) -> dns.name.Name:
    try:
        return dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"{what} {text!r}: not a DNS name: {exc}") from None


def parse_addresses(values: list[str]) -> tuple[addresses.IPAddress, ...] | None:
    """--address values: ["auto"] (this host's), ["none"] (leave alone) or a list.

    Raises:
        ConfigError: a value is not an address, or auto/none is mixed with addresses.
        OperationFailed: auto found no address worth publishing.
    """
    if values in (["auto"], ["none"]):
        if values == ["none"]:
            return None
        try:
            found = addresses.select_published(addresses.read_interface_addresses())
        except OSError as exc:
            raise OperationFailed(f"cannot list this host's addresses: {exc}") from None
        if not found:
            raise OperationFailed("this host has no global address to publish (only loopback "
                                  "or link-local); give --address")
        return tuple(found)
    out: list[addresses.IPAddress] = []
    for v in values:
        try:
            a = ipaddress.ip_address(v)
        except ValueError:
            raise ConfigError(f"--address {v!r}: not an IPv4/IPv6 address (or use auto/none "
                              "alone)") from None
        if a.is_loopback or a.is_link_local or a.is_multicast or a.is_unspecified:
            raise ConfigError(f"--address {v}: a loopback, link-local, multicast or unspecified "
                              "address cannot be published")
        if a not in out:
            out.append(a)
    return tuple(out)


def _desired(args: argparse.Namespace, name: dns.name.Name, zone: dns.name.Name,
             addrs: tuple[addresses.IPAddress, ...] | None) -> Desired:
    ipk: Ipseckey | None = None
    if args.key is not None:
        gateway = records.parse_gateway(args.gateway)
        records.check_precedence(args.precedence)
        key = keygen.load_private_key(args.key)
        ipk = records.ipseckey_rdata(key.public_key(), gateway, args.precedence)
    elif args.gateway is not None:
        raise ConfigError("--gateway needs --key (it is a field of the IPSECKEY record)")
    return Desired(name, zone, args.ttl, addrs, ipk)


def _check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.ttl <= MAX_TTL:
        raise ConfigError(f"--ttl {args.ttl}: out of range (0..{MAX_TTL})")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: out of range")
    if args.timeout <= 0 or args.check_timeout < 0:
        raise ConfigError("--timeout must be positive and --check-timeout not negative")
    if args.tsig_key is None and not args.nsupdate:
        raise ConfigError("--tsig-key KEYFILE is required (except with --nsupdate)")
    if args.key is None and args.address == ["none"]:
        raise ConfigError("nothing to publish: --address none and no --key")
    if args.finish_rollover and args.key is None:
        raise ConfigError("--finish-rollover needs --key (the key to keep)")


def run_publish(args: argparse.Namespace) -> int:
    """Run `autosp publish` with parsed arguments; returns the exit status."""
    _check_args(args)
    name = _name(args.name, "NAME")
    # Read every local input before touching the network, so bad input costs no traffic.
    tsig = load_tsig_key(args.tsig_key, args.tsig_name) if args.tsig_key is not None else None
    addrs = parse_addresses(list(args.address))
    server = server_address(args.server, args.port)
    if args.zone is not None:
        zone = _name(args.zone, "--zone")
        if not name.is_subdomain(zone):
            raise ConfigError(f"{name} is not in zone {zone}")
    else:
        zone = None
    desired = _desired(args, name, zone or dns.name.root, addrs)
    if zone is None:
        zone = find_zone(name, server, args.timeout)
        desired = Desired(name, zone, desired.ttl, desired.addresses, desired.ipseckey)
    current = read_current(name, server, args.timeout)
    mode = Mode.FINISH_ROLLOVER if args.finish_rollover else Mode.PUBLISH
    plan = build_plan(current, desired, mode, wait=not (args.no_wait or args.nsupdate))
    if args.nsupdate:
        sys.stdout.write(plan_script(plan, server.address, server.port))
        return 0
    sent_at = _execute(args, plan, server, tsig)
    _report(plan, name, zone, server)
    if args.no_check:
        return 0
    resolver = (server_address(args.resolver, args.resolver_port) if args.resolver
                else system_resolver(args.resolver_port))
    # Fresh from the primary, keys vouched for by the resolver: its cache cannot fool it.
    result = check_fresh(name, zone, plan.final, server, resolver, args.check_timeout)
    since = time.monotonic() - sent_at if sent_at is not None else None
    if result.secure:
        lag = f"; {since * 1000:.0f} ms after the update was sent" if since is not None else ""
        print(f"published, secure (signed at the primary {server}, keys validated by "
              f"{resolver}{lag})")
        return 0
    print(f"published, but not yet DNSSEC-secure: {result.why}")
    return 1 if args.require_secure else 0


def _execute(args: argparse.Namespace, plan: Plan, server: Server,
             tsig: TsigKey | None) -> float | None:
    """Run the plan's steps; returns the monotonic time the last update was sent, if any."""
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.run_nsupdate:
        assert isinstance(args.tsig_key, Path)
        run_nsupdate(plan, server.address, server.port, args.tsig_key, args.timeout, say=say)
        return time.monotonic() if plan.updates else None
    sent_at: float | None = None
    assert tsig is not None  # _check_args: required unless --nsupdate
    key = tsig.to_dnspython()
    for step in plan.steps:
        if isinstance(step, Update):
            sent_at = time.monotonic()
            send_update(step, key, server, args.timeout)
            say(f"{step.purpose}: done")
        else:
            say(f"waiting {step.seconds:.0f} s: {step.reason}")
            time.sleep(step.seconds)
    return sent_at


def _report(plan: Plan, name: dns.name.Name, zone: dns.name.Name, server: Server) -> None:
    for note in plan.notes:
        print(note)
    if not plan.updates:
        return
    print(f"published at {name} (zone {zone}, primary {server}):")
    for rdtype, rdatas in sorted(plan.final.items()):
        tname = dns.rdatatype.to_text(rdtype)
        if not rdatas:
            print(f"  {tname}: (none)")
        for rd in sorted(rdatas, key=lambda r: r.to_digestable()):
            print(f"  {tname} {_short(rd)}")


def _short(rd: dns.rdata.Rdata) -> str:
    text = rd.to_text()
    return text if len(text) <= 80 else text[:60] + "..." + text[-12:]
