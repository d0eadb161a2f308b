"""Helpers shared by the test files: running coroutines, reading replies, checking the wire.

One copy of each thing several test files do. What is about the lab itself (pinging from a
host, dig, captures, charon's conns, DNS updates) is a method of `lab.Lab`; what is here
asserts on the lab's results (ESP only, fail closed) or on DNS replies, or runs async code.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
from collections.abc import Callable, Coroutine, Iterable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import dns.message
import dns.rdatatype

from lab.topology import HOSTS, ZONES
from resolver.provision import Provisioner
from resolver.tunnels.backend import CompositeBackend
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.tunnels.intents import RemoveTunnel
from resolver.tunnels.vici import ViciBackend
from resolver.tunnels.xfrm import (
    FLOOR_BLOCK_PRIORITY,
    XFRM_POLICY_BLOCK,
    XfrmBackend,
    XfrmPolicies,
)

if TYPE_CHECKING:
    from lab import Lab
    from lab.wire import WirePing

T = TypeVar("T")


# --- async ------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on a fresh event loop, failing it after `timeout` seconds (None: never)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], object], what: str = "", timeout: float = 5.0) -> None:
    """Wait, yielding to the loop, until `predicate()` is true; fail after `timeout` seconds.

    For "the tasks started have got this far": a fixed short sleep passes on a quiet
    machine and fails on a loaded CI runner, where the loop's timer fires before the other
    tasks have had their turns (seen: 50 lookups not yet at the backend after 10 ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what or predicate}")
        await asyncio.sleep(0.005)


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the project has no pytest-asyncio)."""

    @functools.wraps(fn)
    def runner(*args: Any, **kwargs: Any) -> None:
        run(fn(*args, **kwargs))

    return runner


# --- config files -----------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str,
                 resolv: str = "nameserver 192.0.2.53\n") -> tuple[Path, Path]:
    """A resolver.toml holding `text` and the resolv.conf it reads, both under `tmp_path`."""
    cfg = tmp_path / "resolver.toml"
    cfg.write_text(text)
    rc = tmp_path / "resolv.conf"
    rc.write_text(resolv)
    return cfg, rc


# --- DNS replies ------------------------------------------------------------------------------


def edes(reply: dns.message.Message) -> list[tuple[int, str]]:
    """Every Extended DNS Error in a reply, as (INFO-CODE, EXTRA-TEXT)."""
    return [(int(e.code), e.text or "") for e in reply.extended_errors()]


def ede(reply: dns.message.Message) -> tuple[int, str]:
    """The reply's one Extended DNS Error; fails the test when it has none or several."""
    found = edes(reply)
    assert len(found) == 1, f"{len(found)} EDE options in\n{reply}"
    return found[0]


def addresses(reply: dns.message.Message) -> list[str]:
    """The A and AAAA addresses in a reply's answer section, in order."""
    return [rd.address for r in reply.answer if r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in r]


# --- the lab ----------------------------------------------------------------------------------


def esp_ping(lab: Lab, target: str, *, host: str = "alice", peer: str | None = None,
             port: str | None = None, watch: Sequence[str] | None = None, family: int = 4,
             count: int = 3, wait: float = 1.0) -> WirePing:
    """`host` pings `target`: it answers, every echo and reply crosses the wire as ESP (at least
    `count` packets each way between `host` and `peer`, the tunnel's far end), and no ICMP is
    seen in clear. Arguments as for `Lab.ping_on_wire`; returns its result for more checks."""
    w = lab.ping_on_wire(host, target, peer=peer, port=port, watch=watch, family=family,
                         count=count, wait=wait)
    assert w.returncode == 0, w.report()
    assert len(w.esp_out) >= count and len(w.esp_back) >= count, w.report()
    assert w.cleartext == [], w.report()
    return w


def blocked_ping(lab: Lab, target: str, *, port: str, host: str = "alice", count: int = 1,
                 eperm: bool = True) -> WirePing:
    """Fail closed: `host`'s ping of `target` gets nowhere (with `eperm`, because an XFRM
    block refused it: "Operation not permitted") and no ICMP to or from `target` crosses the
    wire in clear (watched on `port`'s switch port)."""
    w = lab.ping_on_wire(host, target, port=port, watch=(target,), count=count)
    assert w.returncode != 0, w.report()
    if eperm:
        assert "Operation not permitted" in w.output, w.report()
    assert w.cleartext == [], w.report()
    return w


def children(lab: Lab, prefix: str = "isk-") -> dict[str, str]:
    """CHILD_SA name -> state in alice's charon, for the names starting with `prefix` (by
    default the resolver's own)."""
    return lab.child_states("alice", prefix)


def clean_alice(lab: Lab, extra: Iterable[str] = ()) -> None:
    """Take the resolver's traces out of alice: its ("isk-") conns and `extra` ones terminated
    and unloaded, its XFRM policies and its floors removed (foreign ones are left)."""
    extra = set(extra)
    lab.close_conns("alice", [n for n in lab.conns("alice")
                              if n.startswith("isk-") or n in extra])
    x = XfrmPolicies(lab.ns("alice"))
    try:
        x.flush_ours()
        x.routes.flush()
    finally:
        x.close()


def our_conns(lab: Lab, prefix: str = "") -> list[str]:
    """The resolver's ("isk-") conns in alice; with `prefix`, those whose name goes on with it
    (the first label of the name they were made for and a dash: "bob-")."""
    return [n for n in lab.conns("alice") if n.startswith(f"isk-{prefix}")]


def shunted(lab: Lab) -> set[str]:
    """Destinations with one of the resolver's XFRM BLOCK (drop shunt) policies in alice."""
    x = XfrmPolicies(lab.ns("alice"))
    try:
        return {str(r.destination) for r in x.ours()
                if r.action == XFRM_POLICY_BLOCK and r.priority != FLOOR_BLOCK_PRIORITY}
    finally:
        x.close()


def floored(lab: Lab) -> set[str]:
    """Destinations with a floor of the resolver's in alice (a route floor with
    kernel-libipsec, an XFRM floor with kernel ESP)."""
    x = XfrmPolicies(lab.ns("alice"))
    try:
        return ({str(r.destination) for r in x.ours()
                 if r.action == XFRM_POLICY_BLOCK and r.priority == FLOOR_BLOCK_PRIORITY}
                | {str(d) for d in x.routes.ours()})
    finally:
        x.close()


def endpoint_status(lab: Lab, control: Path, name: str) -> dict[str, Any]:
    """`autosp --json status NAME` in alice (the form for scripts), against the daemon behind
    `control`; the command must succeed."""
    r = lab.autosp("alice", "--json", "status", name, control=control)
    assert r.returncode == 0, r.stdout + r.stderr
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def publish(lab: Lab, name: str, *args: str, keyfile: Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """`autosp publish NAME ARGS` from bob to the lab's primary for example.test, with the lab's
    TSIG key (or `keyfile`) and the lab Unbound to check the result; with `check`, it must
    succeed."""
    primary = HOSTS[ZONES["example.test."].server].v4
    r = lab.autosp("bob", "publish", name, "--server", primary, "--tsig-key",
                   str(keyfile or lab.tsig_keyfile), "--resolver", lab.unbound_addr, *args)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class AliceTunnels:
    """The resolver's tunnel side as the daemon in alice builds it: charon over VICI and XFRM
    shunts under one Provisioner, with alice's identity (addresses of `families`).

    `joined`: the caller's thread is in alice's namespace already (`lab.call_in`), so XFRM
    needs no namespace of its own. `cleanup()` removes every tunnel and shunt it made and
    closes both backends; used as a context manager (outside an event loop) it cleans up on
    the way out.
    """

    def __init__(self, lab: Lab, *, families: Sequence[int] = (4,), joined: bool = False,
                 timeout: float = 3.0, state: Path | None = None) -> None:
        self.ident = Identity("alice.example.test", lab.private_key("alice"),
                              tuple(ip_address(lab.addr("alice", f)) for f in families))
        self.vici = ViciBackend(lab.vici_socket("alice"), self.ident)
        self.xfrm = XfrmBackend(None if joined else lab.ns("alice"))
        self.provisioner = Provisioner(CompositeBackend(self.vici, self.xfrm),
                                       ProvisionConfig(timeout=timeout, state_file=state))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run(self.cleanup())

    async def cleanup(self) -> None:
        for key in await self.vici.installed():
            await self.vici.apply(RemoveTunnel(key.ident))
        await self.xfrm.flush()
        await self.xfrm.aclose()
        self.vici.close()
