"""The `autosp` command line: parse arguments, call one module, map errors to exit statuses.

Exit statuses: 0 done; 1 the operation failed (refused, timed out, raced; also permission
denied on the control socket); 2 bad input or configuration; 3 the resolver is not running (no
control socket, or nothing answers on it; endpoint commands, `stats` and `upstream` only).
Errors are one line on stderr, never a traceback (set AUTOSP_DEBUG=1 to get one). What the
daemon answers is printed as aligned text by autosp.output, or as JSON with --json.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.name

from autosp import control, keygen, output, records
from autosp.errors import OperationFailed, ResolverUnreachable
from autosp.plan import ROLLOVER_STEPS
from resolver.endpoints.core import PINNED_GROUPS
from resolver.errors import ConfigError
from resolver.metrics.registry import flat_lines
from resolver.policy import Group

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3
PLACEHOLDER_NAME = "host.example.com."
DEFAULT_PUBLISH_TTL = 300
DEFAULT_RECORD_TTL = 3600

EXIT_HELP = """\
exit status: 0 ok, 1 operation failed, 2 bad input or configuration, 3 resolver not running
(no control socket, or no answer on it). Permission denied on the control socket is 1."""
# keygen and publish never talk to the daemon: no status 3.
EXIT_HELP_LOCAL = """\
exit status: 0 ok, 1 operation failed, 2 bad input or configuration."""
# A host name as endpoints have them: letters, digits, '-' and '_' in each label.
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")

PUBLISH_EPILOG = """\
what is sent:
  One RFC 2136 UPDATE, TSIG-signed, over TCP to --server (the zone's primary). It replaces the A
  and AAAA RRsets of NAME with the given addresses and the IPSECKEY RRset with the key of --key.
  Its prerequisites state exactly the records read just before, so a racing publisher makes it
  fail (exit 1, nothing changed) instead of mixing two versions.

key rollover (make before break), when NAME already publishes a different key:
{steps}
  autosp does steps 1-3 (it waits in step 2); with --no-wait (implied by --nsupdate) it stops
  after step 1 and says when step 3 is safe: the same command with --finish-rollover.

check:
  Afterwards the records are asked for through a validating resolver (--resolver, default the
  first nameserver of /etc/resolv.conf) with DO and AD set. autosp prints "published, secure"
  when they come back unchanged with the AD bit, or "published, but not yet DNSSEC-secure: WHY".
  The exit status is 0 either way unless --require-secure is given.

examples:
  autosp publish laptop.example.com --server ns1.example.com --tsig-key /etc/autosp/ddns.key \\
      --key /etc/ipseckey-resolver/host.pem
  autosp publish laptop.example.com --server 192.0.2.53 --tsig-key ddns.key --address auto \\
      --nsupdate > update.txt && nsupdate -k ddns.key update.txt
""".replace("{steps}", "\n".join("  " + step for step in ROLLOVER_STEPS))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also rendered as the autosp(8) manual page)."""
    p = argparse.ArgumentParser(
        prog="autosp",
        description="Keep IPsec tunnels to endpoints known by name, and publish this host's "
                    "own key and address in DNS.",
        epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--control", type=Path, metavar="PATH",
                   default=Path(os.environ.get("AUTOSP_CONTROL", control.DEFAULT_SOCKET)),
                   help="the resolver's control socket (default: $AUTOSP_CONTROL or "
                        f"{control.DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true",
                   help="print the resolver's answer as JSON, for scripts (endpoint commands, "
                        "stats and upstream; times as POSIX seconds)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _endpoint_commands(sub)
    _keygen_command(sub)
    _publish_command(sub)
    return p


def _sub(sub: Any, name: str, help: str, description: str,
         epilog: str = EXIT_HELP) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _endpoint_commands(sub: Any) -> None:
    needs = ("Needs the resolver's control socket (--control); exits 3 if the resolver is not "
             "running.")
    add = _sub(sub, "add", "keep a tunnel to an endpoint known by name",
               "Resolve NAME (addresses and IPSECKEY, DNSSEC-validated), bring the tunnel up and "
               "keep it: the endpoint is pinned (no lease expiry), kept across resolver "
               "restarts and re-resolved when its records' TTL runs out, so a new address or "
               "key is followed. " + needs)
    add.add_argument("name", help="the endpoint's DNS name, e.g. vpn.example.com")
    groups = [g.value for g in Group]
    pinned = [g.value for g in PINNED_GROUPS]
    refused = ", ".join(g for g in groups if g not in pinned)
    add.add_argument("--group", choices=groups, metavar="GROUP",
                     help=f"policy group for it: {' or '.join(pinned)} ({refused} make no "
                          "tunnel and are refused; default: the group the resolver's [policy] "
                          "gives the name or its addresses)")
    rm = _sub(sub, "remove", "stop keeping an endpoint and tear its tunnel down",
              "Forget an endpoint added with `autosp add` and tear its tunnel down. " + needs)
    rm.add_argument("name", help="the endpoint's DNS name, as given to `autosp add`")
    _sub(sub, "list", "list the endpoints and their tunnels",
         "A table of the endpoints: name, tunnel state, DNSSEC status, key algorithm, next "
         "refresh, addresses (one per line); `autosp status NAME` shows the rest. " + needs)
    st = _sub(sub, "status", "everything known about one endpoint",
              "Everything the resolver knows about one endpoint, and why it failed if it did. "
              + needs)
    st.add_argument("name", help="the endpoint's DNS name, as given to `autosp add`")
    rf = _sub(sub, "refresh", "re-resolve endpoints now",
              "Re-resolve one endpoint (or all) now instead of waiting for the TTL. " + needs)
    rf.add_argument("name", nargs="?",
                    help="the endpoint to refresh (default: every endpoint)")
    _sub(sub, "stats", "print the resolver's counters",
         "The resolver's counters and histograms (queries by type and rcode, cache hits, "
         "validation outcomes, upstream round trips and failures, tunnels, setups, pinned "
         "endpoints), one `name{labels} value` line each, the same numbers its Prometheus "
         "listener ([metrics] listen) serves. " + needs)
    _sub(sub, "upstream", "where the resolver's answers come from, and why",
         "The resolver's upstream: its mode (auto, forward, iterate), the path in use "
         "(forwarding to which servers, or iterating from the root), the reason (e.g. which "
         "forwarder failed the DNSSEC probe, and how), since when, and the last probe's "
         "results. " + needs)


def _keygen_command(sub: Any) -> None:
    k = _sub(sub, "keygen", "make a private key and print its IPSECKEY record",
             "Generate a private key, write it as unencrypted PKCS#8 PEM with mode 0600 "
             "(atomically; never readable by others, not even briefly), and print the public key "
             "as an IPSECKEY record ready to publish (stdout, one line; notes go to stderr).",
             epilog=EXIT_HELP_LOCAL)
    k.add_argument("--algorithm", choices=[a.value for a in keygen.Algorithm],
                   default=keygen.Algorithm.ED25519.value,
                   help="key algorithm (default ed25519; rsa makes 3072-bit keys)")
    k.add_argument("--out", type=Path, required=True, metavar="FILE",
                   help="private key file to create")
    k.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    k.add_argument("--name", default=PLACEHOLDER_NAME,
                   help=f"owner name of the printed record (default {PLACEHOLDER_NAME}, a "
                        "placeholder to replace with this host's name)")
    k.add_argument("--ttl", type=int, default=DEFAULT_RECORD_TTL,
                   help=f"TTL of the printed record (default {DEFAULT_RECORD_TTL})")
    _record_options(k)


def _record_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", default=None, metavar="ADDR|NAME",
                   help="IPSECKEY gateway: an IPv4/IPv6 address or a host name (default: none, "
                        "the owner's own address is the peer)")
    p.add_argument("--precedence", type=int, default=10,
                   help="IPSECKEY precedence, lower is preferred (default 10)")


def _publish_command(sub: Any) -> None:
    p = _sub(sub, "publish", "publish this host's addresses and key with a signed DNS UPDATE",
             "Set NAME's A/AAAA records (default: this host's current global addresses) and its "
             "IPSECKEY record (from --key) with an RFC 2136 UPDATE signed with TSIG, then check "
             "that they come back DNSSEC-secure through a validating resolver.",
             epilog=PUBLISH_EPILOG + "\n" + EXIT_HELP_LOCAL)
    p.add_argument("name", help="this host's DNS name, e.g. laptop.example.com")
    p.add_argument("--server", required=True, help="the zone's primary server (address or name)")
    p.add_argument("--port", type=int, default=53, help="its port (default 53)")
    p.add_argument("--tsig-key", type=Path, metavar="KEYFILE",
                   help="TSIG key file as written by BIND's tsig-keygen (required unless "
                        "--nsupdate)")
    p.add_argument("--tsig-name", help="key to use if KEYFILE holds several")
    p.add_argument("--key", type=Path, metavar="PRIVKEYFILE",
                   help="this host's private key (mode 0600); its public key is published as "
                        "IPSECKEY. Without --key only the addresses are published")
    p.add_argument("--address", nargs="+", default=["auto"], metavar="auto|none|ADDR",
                   help="addresses to publish: auto (this host's global addresses, default), "
                        "none (leave A/AAAA alone) or a list of IPv4/IPv6 addresses")
    p.add_argument("--ttl", type=int, default=DEFAULT_PUBLISH_TTL,
                   help=f"TTL of the published records (default {DEFAULT_PUBLISH_TTL}: short, "
                        "because a travelling host's address changes)")
    _record_options(p)
    p.add_argument("--zone", help="the zone to update (default: found with an SOA query)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for each DNS answer (default 5)")
    p.add_argument("--resolver", metavar="ADDR",
                   help="validating resolver for the check (default: /etc/resolv.conf)")
    p.add_argument("--resolver-port", type=int, default=53, metavar="PORT",
                   help="its port (default 53)")
    p.add_argument("--check-timeout", type=float, default=10.0,
                   help="seconds to wait for the records to come back secure (default 10)")
    p.add_argument("--no-check", action="store_true", help="skip the validating lookup")
    p.add_argument("--require-secure", action="store_true",
                   help="exit 1 if the records are not (yet) DNSSEC-secure")
    roll = p.add_mutually_exclusive_group()
    roll.add_argument("--no-wait", action="store_true",
                      help="on a key change, stop after publishing the new key beside the old")
    roll.add_argument("--finish-rollover", action="store_true",
                      help="finish a rollover started with --no-wait: remove the old key(s)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--nsupdate", action="store_true",
                     help="print the equivalent nsupdate script instead of sending (no key "
                          "needed; a rollover script stops after its first step)")
    how.add_argument("--run-nsupdate", action="store_true",
                     help="send with the real /usr/bin/nsupdate -k KEYFILE instead of dnspython")


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "keygen":
        return _keygen(args)
    if cmd == "publish":
        from autosp.publish_cmd import run_publish

        return run_publish(args)
    return _endpoint(args)


def _keygen(args: argparse.Namespace) -> int:
    try:
        owner = dns.name.from_text(args.name)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"--name {args.name!r}: {exc}") from None
    if args.ttl < 0 or args.ttl > 0x7FFFFFFF:
        raise ConfigError(f"--ttl {args.ttl}: out of range")
    gateway = records.parse_gateway(args.gateway)
    records.check_precedence(args.precedence)
    out: Path = args.out
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; not overwriting a key file without --force")
    key = keygen.generate(keygen.Algorithm(args.algorithm))
    rdata = records.ipseckey_rdata(key.public_key(), gateway, args.precedence)
    keygen.write_private_key(out, keygen.pkcs8_pem(key), force=args.force)
    print(f"wrote {args.algorithm} private key to {out} (mode 0600)", file=sys.stderr)
    if args.name == PLACEHOLDER_NAME:
        print(f"note: {PLACEHOLDER_NAME} is a placeholder: replace it with this host's DNS "
              "name (or use --name), or let `autosp publish --key` publish the record",
              file=sys.stderr)
    print(records.record_line(owner, args.ttl, rdata))
    return EXIT_OK


def endpoint_name(text: str) -> str:
    """The absolute form of an endpoint's name.

    Raises:
        ConfigError: not a host name (exit 2: bad input, not "does not exist").
    """
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"{text!r} is not a DNS name: {exc}") from None
    labels = name.relativize(dns.name.root).labels
    for label in labels:
        try:
            ok = _LABEL.match(label.decode("ascii")) is not None
        except UnicodeDecodeError:
            ok = False
        if not ok:
            raise ConfigError(f"{text!r} is not a host name: each label must be letters, "
                              "digits, '-' or '_' (at most 63, not starting or ending with '-')")
    if not labels:
        raise ConfigError("the root is not an endpoint")
    return name.to_text()


def _endpoint(args: argparse.Namespace) -> int:
    path: Path = args.control
    cmd = args.command
    name = getattr(args, "name", None)
    if name is not None:
        name = endpoint_name(name)
    # Checked as the daemon will check it (bad input: exit 2 without connecting).
    req = control.make_request(cmd, name, getattr(args, "group", None))
    result = control.send(path, req)
    now = time.time()
    if cmd == "stats":
        print(output.as_json(result) if args.json else
              "\n".join(flat_lines(list((result or {}).get("metrics", [])))))
    elif args.json:
        print(output.as_json(result))
    elif cmd == "add":
        print(f"added {name}\n" + output.endpoint(result or {}, now))
    elif cmd == "remove":
        print(f"removed {name}")
    elif cmd == "list":
        print(output.table(list((result or {}).get("endpoints", [])), now))
    elif cmd == "status":
        print(output.endpoint(result or {}, now))
    elif cmd == "upstream":
        print(output.upstream(result or {}, now))
    else:
        print(f"refreshed {name or 'all endpoints'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run autosp; returns the exit status (also the console script's entry point)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        return _fail(exc, EXIT_INPUT)
    except OperationFailed as exc:
        return _fail(exc, EXIT_FAILED)
    except ResolverUnreachable as exc:
        return _fail(exc, EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        print("autosp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("AUTOSP_DEBUG"):
            raise
        # A bug, not a user error; still one line (AUTOSP_DEBUG=1 shows the traceback).
        return _fail(exc, EXIT_FAILED, prefix="internal error: ")


def _fail(exc: BaseException, status: int, prefix: str = "") -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"autosp: {prefix}{text}", file=sys.stderr)
    return status


def wrap(text: str) -> str:
    """Wrap a long message for the terminal (used for multi-sentence notes)."""
    return textwrap.fill(text, width=100, subsequent_indent="  ")

