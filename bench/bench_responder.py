"""Benchmark: first contact through a responder that learns initiators from DNS (issue 11).
Prints figures only.

Brings up its own lab instance (LAB_ID from --lab-id, default "q": namespaces iskq-*) with bare
charons (each holds only its own key) and takes it down at the end, also on error or Ctrl-C.
Needs root. bob runs ipseckey-resolver with the default configuration: his responder learns
unknown initiators from charon's log and looks them up.

Set-up: alice gets N extra IPv6 addresses 2001:db8:100::2:<i> (nodad); one TSIG-signed UPDATE
publishes fc<i>-<tag>.example.test with AAAA = that address and IPSECKEY = alice's key. Each is
a distinct initiator bob has never heard of, with an address of its own (so the per-address
rate of bob's responder is that of a real host, not shared by all).

(a) IKE level, per fresh identity: our own initiator (resolver.tunnels.vici.ViciBackend, what the
    daemon runs) in alice's charon brings a tunnel to bob up: first contact (bob's responder
    looks the identity up; the initiator tries again after AUTHENTICATION_FAILED), then, the
    tunnel removed on alice's side, again (bob's learned conn is loaded: a known peer). Median
    and p90 of both, the extra ms and the extra IKE exchanges (2 round trips each).
(b) Lookup level, what a user sees: `bob.example.test A` through alice's daemon, each sample
    with fresh daemons (cold caches) in alice and bob: first contact (bob's daemon fresh, his
    charon wiped), then known (alice's daemon fresh again, bob keeps the conn he learned).
(c) 50 unknown initiators at once to bob (default [responder] config): how many come up, and
    the time to the last.
(d) Identity flood: dave's charon initiates with 1,000 random identities, from dave's one
    address and then from 100 addresses; bob's daemon's CPU time and RSS before/after, bob's
    charon's CPU time, the lookups bob made and the refusals, and a DNS answer's latency
    during the flood.

Usage: .venv/bin/python bench/bench_responder.py [--runs 20] [--lookups 15] [--crowd 50]
                                                 [--flood 1000] [--flood-sources 100]
                                                 [--parts abcd] [--lab-id q]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import dns.name
import dns.rcode
import dns.update

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab import Lab, ike  # noqa: E402
from lab.resolverd import ResolverDaemon  # noqa: E402
from lab.topology import HOSTS  # noqa: E402
from resolver.errors import ProvisioningError  # noqa: E402
from resolver.ipseckey import IpsecKey, ipseckey_rdata_for  # noqa: E402
from resolver.tunnels.config import Identity  # noqa: E402
from resolver.tunnels.intents import InstallTunnel, RemoveTunnel, tunnel_spec  # noqa: E402
from resolver.tunnels.vici import ViciBackend  # noqa: E402

PREFIX = "2001:db8:100::2:"


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


def row(label: str, values: list[float]) -> str:
    return (f"  {label:<34} median {statistics.median(values):7.1f} ms   "
            f"p90 {pct(values, 90):7.1f} ms   (n={len(values)})")


class Tries(logging.Handler):
    """Counts "up on try N" of our ViciBackend (1 when no line: up on the first try)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.last: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if "up on try" in record.getMessage():
            self.last[str(record.args[0])] = int(record.args[2])  # type: ignore[index]


TRIES = Tries()


# --- set-up --------------------------------------------------------------------------------


def publish_initiators(lab: Lab, count: int, tag: str) -> list[tuple[str, str]]:
    """count fresh names fc<i>-<tag>.example.test -> (fqdn, address) on alice, in DNS."""
    names = [(f"fc{i}-{tag}.example.test", f"{PREFIX}{i:x}") for i in range(1, count + 1)]
    lab.exec("alice", ["ip", "-batch", "-"],
             input="".join(f"addr add {a}/64 dev eth0 nodad\n" for _, a in names))
    rdata = ipseckey_rdata_for(lab.public_key("alice"))

    def build(msg: dns.update.UpdateMessage) -> None:
        for name, addr in names:
            label = name.split(".")[0]
            msg.replace(label, 300, "AAAA", addr)
            msg.replace(label, 300, rdata)

    lab.update(build)
    lab.wait_signed(names[-1][0], "IPSECKEY", HOSTS["ns-example"].v4, timeout=30)
    return names


def initiator(lab: Lab, name: str, addr: str) -> ViciBackend:
    """Our initiator for identity `name` from `addr`, its event listeners registered (as in a
    running daemon; a fresh listener needs up to 0.1 s, which is not first contact's cost)."""
    b = ViciBackend(lab.vici_socket("alice"),
                    Identity(name, lab.private_key("alice"), (ip_address(addr),)),
                    max_workers=2)
    if not b.listening():
        raise RuntimeError("VICI listeners not registered")
    return b


def bob_spec(lab: Lab) -> Any:
    owner = dns.name.from_text("bob.example.test.")
    return tunnel_spec(IpsecKey.from_public_key(owner, lab.public_key("bob")),
                       ip_address(lab.addr("bob", 6)), None)


async def timed_install(backend: ViciBackend, spec: Any, timeout: float = 3.0
                        ) -> tuple[float, int, str]:
    """(ms, tries, error or "") of one InstallTunnel; the tunnel is left up."""
    TRIES.last.pop(spec.name, None)
    t0 = time.perf_counter()
    try:
        await backend.apply(InstallTunnel(spec, timeout))
        error = ""
    except ProvisioningError as exc:
        error = str(exc)
    return (time.perf_counter() - t0) * 1000, TRIES.last.get(spec.name, 1), error


# --- (a) -------------------------------------------------------------------------------------


def part_a(lab: Lab, names: list[tuple[str, str]]) -> None:
    spec = bob_spec(lab)

    async def run() -> list[tuple[float, int, float, int]]:
        rows = []
        for name, addr in names:
            b = initiator(lab, name, addr)
            try:
                first = await timed_install(b, spec)
                await b.apply(RemoveTunnel(spec.name))
                known = await timed_install(b, spec)
                await b.apply(RemoveTunnel(spec.name))
            finally:
                b.close()
            if first[2] or known[2]:
                raise RuntimeError(f"{name}: {first[2] or known[2]}")
            rows.append((first[0], first[1], known[0], known[1]))
        return rows

    rows = asyncio.run(run())
    firsts, knowns = [r[0] for r in rows], [r[2] for r in rows]
    extra = [r[0] - r[2] for r in rows]
    tries = [r[1] for r in rows]
    print(f"(a) IKE level, {len(rows)} fresh identities, alice -> bob (IPv6), our initiator:")
    print(row("first contact (unknown to bob)", firsts))
    print(row("known peer (bob's conn loaded)", knowns))
    print(row("extra cost of first contact", extra))
    print(f"  initiates per first contact: median {statistics.median(tries):g}, max "
          f"{max(tries)} (each failed one: IKE_SA_INIT + IKE_AUTH = 2 round trips); "
          f"known peers: {max(r[3] for r in rows)} try")
    print(f"  ratio first/known: median {statistics.median(firsts) / statistics.median(knowns):.2f}"
          f", p90 {pct(firsts, 90) / pct(knowns, 90):.2f}")


# --- (b) -------------------------------------------------------------------------------------


def part_b(lab: Lab, runs: int) -> None:
    def fresh(host: str, name: str) -> ResolverDaemon:
        d = ResolverDaemon(lab, host, name=name)
        d.start()
        return d

    def lookup(d: ResolverDaemon) -> float:
        t0 = time.perf_counter()
        r = d.query("bob.example.test.", timeout=8)
        if r.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"bob.example.test: {dns.rcode.to_text(r.rcode())}\n{d.tail()}")
        return (time.perf_counter() - t0) * 1000

    firsts, knowns = [], []
    for i in range(runs):
        lab.wipe_charon("bob")
        lab.wipe_charon("alice")
        bob = fresh("bob", f"bench-bob-{i}")
        alice = fresh("alice", f"bench-alice-{i}a")
        try:
            firsts.append(lookup(alice))
        finally:
            alice.stop()
        lab.wipe_charon("alice")  # alice forgets; bob keeps the conn he learned
        alice = fresh("alice", f"bench-alice-{i}b")
        try:
            knowns.append(lookup(alice))
        finally:
            alice.stop()
            bob.stop()
    print(f"(b) lookup level, `bob.example.test A` through alice's daemon, fresh daemons each "
          f"time ({runs} runs):")
    print(row("first contact (bob never saw alice)", firsts))
    print(row("known peer (bob's conn loaded)", knowns))
    print(f"  ratio first/known: median {statistics.median(firsts) / statistics.median(knowns):.2f}"
          f", p90 {pct(firsts, 90) / pct(knowns, 90):.2f}; extra median "
          f"{statistics.median(firsts) - statistics.median(knowns):.1f} ms")


# --- (c) -------------------------------------------------------------------------------------


def part_c(lab: Lab, names: list[tuple[str, str]]) -> None:
    # One conn name per initiator: they all live in alice's one charon here, where 50 hosts
    # would each have their own.
    specs = [dataclasses.replace(bob_spec(lab), name=f"isk-crowd{i}-bob")
             for i in range(len(names))]

    async def run() -> tuple[list[tuple[float, int, str]], float]:
        first = initiator(lab, *names[0])
        backends = [first]
        for n, a in names[1:]:
            b = ViciBackend(lab.vici_socket("alice"),
                            Identity(n, lab.private_key("alice"), (ip_address(a),)),
                            max_workers=2)
            # One charon here stands for 50 hosts: the initiators share its event and log
            # listeners (keyed by conn name), as each host's daemon has one of its own. With
            # 50 of each, every listener parsed every event of all 50 and fell behind.
            b.log, b._events = first.log, first._events
            backends.append(b)
        t0 = time.perf_counter()
        try:
            results = await asyncio.gather(*(timed_install(b, s)
                                             for b, s in zip(backends, specs, strict=True)))
            last = (time.perf_counter() - t0) * 1000
            await asyncio.gather(*(b.apply(RemoveTunnel(s.name))
                                   for b, s in zip(backends, specs, strict=True)))
        finally:
            first.close()
            for b in backends[1:]:
                b._pool.shutdown(wait=False)
        return list(results), last

    results, last = asyncio.run(run())
    up = [r for r in results if not r[2]]
    print(f"(c) {len(names)} unknown initiators at once to bob (default [responder]): "
          f"{len(up)} up, the last after {last:.0f} ms; per initiator median "
          f"{statistics.median(r[0] for r in up):.0f} ms, p90 {pct([r[0] for r in up], 90):.0f}"
          f" ms, tries median {statistics.median(r[1] for r in up):g} max "
          f"{max(r[1] for r in up)}")
    for r in results:
        if r[2]:
            print(f"  failed: {r[2]}")


# --- (d) -------------------------------------------------------------------------------------


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
               if ln.startswith("VmRSS:")) / 1024
    return cpu, rss


def metrics(lab: Lab, d: ResolverDaemon) -> dict[str, float]:
    r = lab.autosp(d.host, "--json", "stats", control=d.control)
    out = {}
    for family in json.loads(r.stdout)["metrics"]:
        for s in family["samples"]:
            key = s["name"].removeprefix("ipseckey_resolver_")
            if s["labels"]:
                key += "{" + ",".join(f"{k}={v}" for k, v in s["labels"].items()) + "}"
            out[key] = s["value"]
    return out


def part_d(lab: Lab, count: int, sources: int) -> None:
    """The flood from `sources` addresses of dave's (1: dave's own IPv4 address; more: extra
    IPv6 addresses 2001:db8:100::3:<j>, so that neither charon's per-address half-open limit
    nor our per-address rate holds it back: only the global rate does)."""
    lab.wipe_charon("bob")
    lab.wipe_charon("dave")
    if sources > 1:
        addrs = [f"2001:db8:100::3:{j:x}" for j in range(1, sources + 1)]
        lab.exec("dave", ["ip", "-batch", "-"],
                 input="".join(f"addr add {a}/64 dev eth0 nodad\n" for a in addrs))
        target = lab.addr("bob", 6)
    else:
        addrs, target = [lab.addr("dave")], lab.addr("bob")
    bob = ResolverDaemon(lab, "bob", name="bench-bob-flood")
    bob.start()
    try:
        assert bob.proc is not None
        charon_pid = int((lab.run_dir / "pids" / "charon-bob.pid").read_text().split()[0])
        m0, (cpu0, rss0), (ccpu0, _) = metrics(lab, bob), proc_usage(bob.proc.pid), \
            proc_usage(charon_pid)
        tag = os.urandom(3).hex()
        t0 = time.monotonic()
        with lab.vici("dave") as s:
            for i in range(count):
                conn = ike.initiator_conn(f"flood{i}", HOSTS["dave"], target,
                                          "bob.example.test", lab.public_key_pem("dave"),
                                          lab.public_key_pem("bob"),
                                          local_addr=addrs[i % len(addrs)])
                conn[f"flood{i}"]["local"]["id"] = f"f{i}-{tag}.flood.example.test"
                s.load_conn(conn)
            loaded = time.monotonic() - t0
            for i in range(count):
                for _ in s.initiate({"child": f"flood{i}", "ike": f"flood{i}", "timeout": -1,
                                     "init-limits": "no"}):
                    pass
        q0 = time.perf_counter()
        bob.query("example.test.", "SOA", timeout=3)
        during = (time.perf_counter() - q0) * 1000
        time.sleep(6.0)  # charon's retransmits (1 s, then 1.4 x) run out
        elapsed = time.monotonic() - t0
        m1, (cpu1, rss1), (ccpu1, _) = metrics(lab, bob), proc_usage(bob.proc.pid), \
            proc_usage(charon_pid)
        refused = {k.split("reason=")[1].rstrip("}"): m1[k] - m0.get(k, 0.0)
                   for k in m1 if k.startswith("responder_refusals_total")}
        lookups = m1["responder_lookups_total"] - m0["responder_lookups_total"]
        seen = sum(refused.values()) + m1["responder_admissions_total"] \
            - m0["responder_admissions_total"]
        print(f"(d) identity flood: dave initiated {count} random identities to bob from "
              f"{len(addrs)} address(es) (conns loaded in {loaded:.1f} s), measured over "
              f"{elapsed:.1f} s:")
        print(f"  reached bob's wildcard (our responder saw them): {seen:.0f} (charon's own "
              f"limits held back the rest); bob looked up {lookups:.0f} of them")
        print("  refusals by reason: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                    sorted(refused.items()) if v))
        print(f"  bob's daemon: {cpu1 - cpu0:.2f} s CPU, RSS {rss0:.1f} -> {rss1:.1f} MiB; "
              f"bob's charon: {ccpu1 - ccpu0:.2f} s CPU; a DNS answer during the flood: "
              f"{during:.1f} ms")
    finally:
        bob.stop()
        lab.wipe_charon("dave")
        lab.wipe_charon("bob")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="fresh identities for (a)")
    p.add_argument("--lookups", type=int, default=15, help="runs of (b)")
    p.add_argument("--crowd", type=int, default=50, help="initiators at once in (c)")
    p.add_argument("--flood", type=int, default=1000, help="random identities in (d)")
    p.add_argument("--flood-sources", type=int, default=100,
                   help="addresses the flood of (d) comes from, besides a run from one")
    p.add_argument("--parts", default="abcd", help="which parts to run (default: all)")
    p.add_argument("--lab-id", default="q")
    args = p.parse_args(argv)
    logging.getLogger("resolver.tunnels.vici").addHandler(TRIES)
    logging.getLogger("resolver.tunnels.vici").setLevel(logging.INFO)
    lab = Lab(lab_id=args.lab_id, preload=False)
    steps: list[tuple[str, Callable[[], None]]] = []
    try:
        print(f"lab up in {lab.up():.1f} s (bare charons)", flush=True)
        tag = os.urandom(3).hex()
        names = publish_initiators(lab, args.runs + args.crowd, tag)
        bob = ResolverDaemon(lab, "bob", name="bench-bob")
        bob.start()
        try:
            steps = [("a", lambda: part_a(lab, names[:args.runs])),
                     ("c", lambda: part_c(lab, names[args.runs:]))]
            for part, step in steps:
                if part in args.parts:
                    step()
                    sys.stdout.flush()
        finally:
            bob.stop()
        if "b" in args.parts:
            part_b(lab, args.lookups)
            sys.stdout.flush()
        if "d" in args.parts:
            part_d(lab, args.flood, 1)
            sys.stdout.flush()
            part_d(lab, args.flood, args.flood_sources)
    finally:
        print(f"lab down in {lab.down():.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
