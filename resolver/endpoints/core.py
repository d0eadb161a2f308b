"""Pinned endpoints, the pure part: what a resolution proves, which tunnels follow, what is
shown and what is persisted.

Theory of operation. No I/O, no asyncio, no clock (`now` is passed in). `observe` reduces the
validated A, AAAA and IPSECKEY answers of a name to an `Observation` (or a `Failure` carrying a
control-protocol code); `choose_key` and `plan_tunnels` decide which tunnels should exist and
which go; `view` makes the ENDPOINT dict of the control protocol; `dump_state`/`load_state`
(de)serialize the endpoint list. resolver/endpoints/manager.py (`EndpointManager`) runs them:
it performs the lookups and the provisioning these functions ask for, and owns the timers.

Rules (each has a test in tests/test_endpoints.py):

  Rule 1: a pinned endpoint is authenticated by a DNSSEC-secure IPSECKEY only. Insecure zones,
          proven absence, bogus or unprovable keys are code "no-secure-key"; NXDOMAIN (or a
          name without addresses) is "unknown-name"; `add` then adds nothing. Addresses that
          are never tunnelled (this host's own, loopback) are left out.
  Rule 2: make before break. A new address gets its tunnel before the old address's tunnel is
          released, and old tunnels are released only once every wanted tunnel is up.
  Rule 3: key rollover. The key in use is kept as long as it is still published (during a
          rollover both keys are; the peer may still sign with the old one). Only when it has
          disappeared do the tunnels move to the best published key; `Provisioner.ensure`
          replaces the connection (new SA first, then the old one closed).
  Rule 4: a failed refresh (DNS trouble, IKE trouble) never tears a working tunnel down: the
          error is shown and the refresh retried with backoff. Tunnels are torn down only by
          `remove` and by Rule 2.
  Rule 5: records are re-resolved when their TTL runs out (bounded to MIN_REFRESH..MAX_REFRESH).
  Rule 6: the endpoint list, with the key in use, is written atomically after every change and
          read at start-up; a restored endpoint is re-resolved at once.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Final

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype

from resolver.endpoints.protocol import EndpointError
from resolver.errors import ProvisioningError
from resolver.ipseckey import NO_GATEWAY, IpsecKey
from resolver.policy import AnswerLike, Group, KeyStatus, SetupFailure, classify, key_evidence
from resolver.rrsets import ADDRESS_TYPES, addresses_of, chain_end
from resolver.tunnels.intents import TunnelSpec, tunnel_spec
from resolver.validator.response import Security
from resolver.validator.types import worst

Address = IPv4Address | IPv6Address

MIN_REFRESH: Final = 5.0  # a TTL of 0 or 1 must not make us query in a loop
MAX_REFRESH: Final = 86400.0
REFRESH_SLACK: Final = 1.0  # re-resolve just after the TTL, when no cache holds the old data
RETRY_MIN: Final = 5.0
RETRY_MAX: Final = 300.0
PINNED_GROUPS: Final = (Group.PRIVATE, Group.PRIVATE_OR_CLEAR)
STATE_VERSION: Final = 1


# --- pure core: observing ------------------------------------------------------------------


class Health(enum.Enum):
    """The tunnel state of an endpoint, as `autosp list` shows it."""

    PENDING = "pending"  # not resolved yet (just restored)
    UP = "up"  # a tunnel to every address
    PARTIAL = "partial"  # to some addresses
    DOWN = "down"  # to none, and no error recorded (e.g. the provisioner lost them)
    FAILED = "failed"  # to none, and the last attempt failed


@dataclass(frozen=True, slots=True)
class Observation:
    """What one resolution of a name proved: secure keys (best first) and its addresses."""

    addresses: tuple[Address, ...]
    keys: tuple[IpsecKey, ...]
    security: Security  # the worse of the A and AAAA answers (the keys are SECURE: Rule 1)
    ttl: int  # the smallest TTL of the three answers


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a resolution gives no usable endpoint (`code` is the control protocol's)."""

    code: str
    reason: str


def observe(name: dns.name.Name, a: AnswerLike | BaseException,
            aaaa: AnswerLike | BaseException,
            ipseckey: AnswerLike | BaseException) -> Observation | Failure:
    """Reduce the three lookups of `name` to an Observation, or a Failure (Rule 1).

    Each argument is the validated answer, or the ResolverError its lookup raised.
    """
    text = name.to_text(omit_final_dot=True)
    answers: list[AnswerLike] = []
    for qtype, ans in (("A", a), ("AAAA", aaaa)):
        if isinstance(ans, BaseException):
            return Failure("resolution-failed", f"{text} {qtype}: lookup failed: {ans}")
        sec = ans.verdict.security
        if sec in (Security.BOGUS, Security.INDETERMINATE):
            return Failure("resolution-failed",
                           f"{text} {qtype} is {sec.value}: {ans.verdict.reason or 'no reason'}")
        answers.append(ans)
    if all(x.rcode == dns.rcode.NXDOMAIN for x in answers):
        return Failure("unknown-name", f"{text} does not exist (NXDOMAIN)")
    for qtype, ans in zip(("A", "AAAA"), answers, strict=True):
        if ans.rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            rcode = dns.rcode.to_text(dns.rcode.Rcode(ans.rcode))
            return Failure("resolution-failed", f"{text} {qtype}: {rcode}")
    # The key that counts is the one of the name the addresses belong to: the end of a CNAME
    # chain (as in capture.py), so the address and the key are vouched for by one signer.
    found: dict[dns.name.Name, set[Address]] = {}
    for ans, rdtype in zip(answers, ADDRESS_TYPES, strict=True):
        end = chain_end(ans.answer, name)
        addrs = addresses_of(ans.answer, end, rdtype)
        if addrs:
            found.setdefault(end, set()).update(addrs)
    if len(found) > 1:
        return Failure("resolution-failed", f"{text}: A and AAAA lead to different names "
                                            f"({', '.join(sorted(map(str, found)))})")
    owner, owned = found.popitem() if found else (name, set())
    addresses = tuple(sorted(owned, key=lambda x: (x.version, x)))
    if not addresses:
        return Failure("unknown-name", f"{text} has no A or AAAA record")
    addr_security = worst(answers[0].verdict, answers[1].verdict).security
    if isinstance(ipseckey, BaseException):
        evidence = key_evidence(None, addr_security, failure=str(ipseckey), owner=owner)
    else:
        evidence = key_evidence(ipseckey, addr_security, owner=owner)
    if evidence.status is not KeyStatus.FOUND:
        why = {KeyStatus.ABSENT: "publishes no DNSSEC-secure IPSECKEY",
               KeyStatus.UNUSABLE: "publishes no usable IPSECKEY"}.get(
                   evidence.status, "has no DNSSEC-secure IPSECKEY")
        return Failure("no-secure-key", f"{text} {why} ({evidence.reason})")
    ttl = min([ans.ttl for ans in answers] + [evidence.ttl if evidence.ttl is not None else 0])
    return Observation(addresses, evidence.keys, addr_security, ttl)


# --- pure core: deciding -------------------------------------------------------------------


def same_key(a: IpsecKey, b: IpsecKey) -> bool:
    """The same key at the same peer (precedence and TTL may differ)."""
    return (a.algorithm, a.public_key, a.gateway) == (b.algorithm, b.public_key, b.gateway)


def choose_key(current: IpsecKey | None, published: Sequence[IpsecKey]) -> IpsecKey:
    """Rule 3: keep `current` (the very object, so tunnel specs compare equal) while it is
    still published; otherwise the best published key."""
    if current is not None and any(same_key(current, k) for k in published):
        return current
    return published[0]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a refresh does: ensure `up` (all of them, also unchanged ones: that extends their
    lease), then, only if all succeeded, release `down` (Rule 2)."""

    key: IpsecKey
    up: tuple[TunnelSpec, ...]
    down: tuple[TunnelSpec, ...]
    impossible: tuple[tuple[Address, str], ...] = ()  # destinations without a usable spec


def plan_tunnels(current_key: IpsecKey | None, current: Mapping[Address, TunnelSpec],
                 obs: Observation,
                 gateway_addresses: Sequence[Address] = ()) -> Plan:
    """The tunnels `obs` calls for, given those we hold.

    Args:
        current_key: the key the endpoint's tunnels use now (None for a new endpoint).
        current: the tunnels we hold, by destination.
        obs: the fresh observation.
        gateway_addresses: addresses of the key's gateway when it is a name (resolved by the
            caller); the destination's family is preferred.
    """
    key = choose_key(current_key, obs.keys)
    up: list[TunnelSpec] = []
    impossible: list[tuple[Address, str]] = []
    for dest in obs.addresses:
        gw = [g for g in gateway_addresses if g.version == dest.version] or list(gateway_addresses)
        try:
            spec = tunnel_spec(key, dest, gw[0] if gw else None)
        except ValueError as exc:
            impossible.append((dest, str(exc)))
            continue
        held = current.get(dest)
        # Reuse the spec we hold when nothing that matters changed (see same_key), so that
        # the provisioner does not see a "changed" tunnel because a TTL moved.
        up.append(held if held is not None and held == spec else spec)
    down = tuple(s for d, s in current.items() if d not in obs.addresses)
    return Plan(key, tuple(up), down, tuple(impossible))


def without_exempt(obs: Observation | Failure,
                   is_exempt: Callable[[Address], bool]) -> Observation | Failure:
    """Drop the addresses that are never tunnelled (this host's own, loopback: policy Rule 3).

    A name that leads only there is a mistake of the operator's: "bad-request".
    """
    if isinstance(obs, Failure):
        return obs
    kept = tuple(a for a in obs.addresses if not is_exempt(a))
    if kept == obs.addresses:
        return obs
    if not kept:
        return Failure("bad-request", "its addresses are this host's own or loopback "
                                      f"({', '.join(map(str, obs.addresses))}): "
                                      "nothing to tunnel")
    return dataclasses.replace(obs, addresses=kept)


def next_refresh(now: float, ttl: int) -> float:
    """Rule 5: when to resolve again after a successful refresh."""
    return now + min(MAX_REFRESH, max(MIN_REFRESH, float(ttl))) + REFRESH_SLACK


def retry_delay(failures: int) -> float:
    """Backoff after `failures` consecutive failed refreshes (1, 2, ...)."""
    return float(min(RETRY_MAX, RETRY_MIN * 2 ** max(0, min(failures - 1, 16))))


def failure_code(exc: ProvisioningError) -> str:
    """The control protocol's code for a tunnel that did not come up."""
    if classify(exc) is SetupFailure.DAEMON_UNREACHABLE:
        return "ike-unreachable"
    return "tunnel-failed"


# --- the endpoint record -------------------------------------------------------------------


@dataclass(slots=True)
class Endpoint:
    """One pinned endpoint and everything known about it."""

    name: dns.name.Name
    group: Group | None = None  # as given to `add`; None: the policy's group for it
    added_at: float = 0.0
    addresses: tuple[Address, ...] = ()
    key: IpsecKey | None = None  # the key the tunnels use (Rule 3)
    published: int = 0  # how many secure keys the name published at the last refresh
    security: Security | None = None
    tunnels: dict[Address, TunnelSpec] = field(default_factory=dict)  # held, by destination
    failures: dict[Address, str] = field(default_factory=dict)  # per destination, last attempt
    next_refresh: float | None = None
    last_refresh: float | None = None
    keepalive_at: float | None = None
    error: str = ""
    code: str = ""
    attempts: int = 0  # consecutive failed refreshes (backoff)
    restored: bool = False  # read from the state file, not refreshed since


def health(ep: Endpoint, installed: Mapping[Address, TunnelSpec]) -> Health:
    """The tunnel state of `ep` given the provisioner's installed tunnels."""
    if ep.restored or (ep.last_refresh is None and not ep.error):
        return Health.PENDING
    wanted = ep.addresses
    up = [d for d in wanted if d in ep.tunnels and installed.get(d) == ep.tunnels[d]]
    if wanted and len(up) == len(wanted):
        return Health.UP
    if up:
        return Health.PARTIAL
    return Health.FAILED if ep.error or ep.failures else Health.DOWN


def view(ep: Endpoint, installed: Mapping[Address, TunnelSpec],
         policy_group: Group | None = None) -> dict[str, Any]:
    """The ENDPOINT dict of the control protocol (resolver/endpoints/protocol.py), plus details.

    The protocol's fields come first, always present (null when unknown): name, addresses,
    algorithm, fingerprint, security, tunnel, next_refresh, error. The details after them are
    for `autosp status` (printed as "key: value") and left out when they say nothing.

    Args:
        policy_group: the group the policy gives the endpoint (shown when `add` gave none).
    """
    key = ep.key
    out: dict[str, Any] = {
        "name": ep.name.to_text(),
        "addresses": [str(a) for a in ep.addresses],
        "algorithm": key.key_type() if key is not None else None,
        "fingerprint": key.fingerprint() if key is not None else None,
        "security": ep.security.value if ep.security is not None else None,
        "tunnel": health(ep, installed).value,
        "next_refresh": ep.next_refresh,
        "error": ep.error,
    }
    if ep.code:
        out["code"] = ep.code
    if ep.group is not None:
        out["group"] = ep.group.value
    elif policy_group is not None:
        out["group"] = f"{policy_group.value} (from the policy)"
    if key is not None and key.gateway is not NO_GATEWAY:
        out["gateway"] = str(key.gateway)
    out["keys_published"] = ep.published
    out["tunnels"] = ", ".join(_tunnel_lines(ep, installed)) or "-"
    out["last_refresh"] = ep.last_refresh
    out["added"] = ep.added_at
    return out


def _tunnel_lines(ep: Endpoint, installed: Mapping[Address, TunnelSpec]) -> list[str]:
    """One phrase per tunnel we hold (and per destination that failed), for `status`."""
    lines = []
    for dest, spec in sorted(ep.tunnels.items(), key=lambda ds: (ds[0].version, ds[0])):
        state = "up" if installed.get(dest) == spec else "down"
        if dest in ep.failures:
            state = f"failed: {ep.failures[dest]}"
        note = "" if dest in ep.addresses else " (old address, released when the new is up)"
        if ep.key is not None and not same_key(spec.key, ep.key):
            note += f" (key {spec.key.fingerprint()})"
        lines.append(f"{dest} via {spec.remote_addr} {spec.name} {state}{note}")
    lines += [f"{d} failed: {why}" for d, why in sorted(ep.failures.items(), key=str)
              if d not in ep.tunnels]
    return lines


# --- state file (Rule 6) -------------------------------------------------------------------


# The state file's shape, for resolver/statefile.py's Layout (entries keyed by "name").
STATE_HEADER: Final = {"version": STATE_VERSION}
STATE_SECTIONS: Final = {"endpoints": "name"}


def state_entry(ep: Endpoint) -> dict[str, Any]:
    """One endpoint as the state file keeps it: its key in use and the tunnels it holds."""
    return {
        "name": ep.name.to_text(),
        "group": ep.group.value if ep.group is not None else None,
        "added_at": ep.added_at,
        "addresses": [str(a) for a in ep.addresses],
        "key": ep.key.to_json() if ep.key is not None else None,
        "security": ep.security.value if ep.security is not None else None,
        "tunnels": [{"destination": str(s.destination), "name": s.name,
                     "remote_addr": str(s.remote_addr), "remote_id": s.remote_id,
                     "key_ttl": s.key.ttl}
                    for s in ep.tunnels.values()],
    }


def dump_state(endpoints: Sequence[Endpoint]) -> bytes:
    """A whole state file's bytes (the store writes entry by entry; this is the same
    document at once, for tests and tools)."""
    doc = STATE_HEADER | {"endpoints": [state_entry(ep) for ep in endpoints]}
    return json.dumps(doc, sort_keys=True).encode()


def load_state(data: bytes) -> list[Endpoint]:
    """Parse a state file written by `dump_state`.

    Raises:
        ValueError: anything unexpected (the caller keeps the file aside and starts empty).
    """
    doc = json.loads(data)
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError("not an endpoints state file of version 1")
    out: list[Endpoint] = []
    try:
        for e in doc["endpoints"]:
            key = IpsecKey.from_json(e["key"]) if e.get("key") else None
            tunnels: dict[Address, TunnelSpec] = {}
            for t in e.get("tunnels", []):
                if key is None:
                    raise ValueError("tunnels without a key")
                dest = ipaddress.ip_address(t["destination"])
                # The spec's copy of the key differs from the endpoint's in its TTL only (the
                # provisioner normalizes it): keep it exact, so restored specs compare equal.
                tunnels[dest] = TunnelSpec(str(t["name"]), dest,
                                           ipaddress.ip_address(t["remote_addr"]),
                                           str(t["remote_id"]),
                                           dataclasses.replace(key, ttl=int(t["key_ttl"])))
            out.append(Endpoint(
                name=dns.name.from_text(e["name"]),
                group=Group(e["group"]) if e.get("group") else None,
                added_at=float(e.get("added_at", 0.0)),
                addresses=tuple(ipaddress.ip_address(a) for a in e.get("addresses", [])),
                key=key,
                security=Security(e["security"]) if e.get("security") else None,
                tunnels=tunnels,
                restored=True,
            ))
    except (KeyError, TypeError, dns.exception.DNSException) as exc:
        raise ValueError(f"malformed endpoint entry: {exc!r}") from None
    return out


def parse_group(group: str | None) -> Group | None:
    """The --group of `autosp add`: a group that makes tunnels, or None."""
    if group is None:
        return None
    try:
        grp = Group(group)
    except ValueError:
        raise EndpointError("bad-request", f"--group {group!r}: not a policy group "
                                           f"(one of {', '.join(g.value for g in Group)})"
                            ) from None
    if grp not in PINNED_GROUPS:
        raise EndpointError("bad-request", f"--group {group}: a pinned endpoint is a tunnel; "
                                           "use private or private-or-clear")
    return grp


def display_name(name: dns.name.Name) -> str:
    """A name as people write it (no final dot), for messages."""
    return name.to_text(omit_final_dot=True)
