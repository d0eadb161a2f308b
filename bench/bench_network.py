"""Benchmark: following the network. How long from a change to answers through the new path.

The daemon runs in the lab host `plain` with `[upstream] mode = "auto"` (the default), no
`servers`, following a resolv.conf in its run directory (as it would follow
/run/NetworkManager/resolv.conf), root hint = the lab root. Two forwarders: the lab Unbound
(198.51.100.53) and a "home router", lab/stripper.py in `dave` (198.51.100.13) in front of it.

(a) resolv.conf rewritten (atomic rename, as NetworkManager does), alternately to the router
    and to Unbound, `--rounds` times: the time from the rename to the first answer that came
    through the new forwarder. A client in plain asks a fresh name (NXDOMAIN, so no cache can
    answer) every 20 ms; "through the router" is read from the router's own query log,
    "through Unbound" from example.test's query log (Unbound's address) without the router's.
(b) the router starts stripping DNSSEC (no resolv.conf change): the time from the switch to
    the first *secure* answer again (the first stripped answer is bogus, which makes the daemon
    probe again; it then iterates and forgets the bogus entries).
(c) the router dies (`drop`): the time until names resolve again (now by iteration); bounded
    by the forwarder's timeouts (`timeout` = 0.5 s here, 2 attempts) plus one probe.

Figures depend on the 1-second poll of the file (resolver/upstream/resolvconf.py): (a) is about
0.1 s (the read-again pause) plus the probe plus half a poll on average.

Usage (root; brings its own lab instance up and down):
  LAB_ID=nb .venv/bin/python bench/bench_network.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from lab.core import Lab  # noqa: E402
from lab.querylog import QueryLog  # noqa: E402
from lab.resolverd import ResolverDaemon  # noqa: E402
from lab.stripper import Stripper  # noqa: E402
from lab.topology import HOSTS, ZONES  # noqa: E402

HOST, ROUTER = "plain", "dave"
POLL = 0.02


def write_resolv_conf(path: Path, nameserver: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"nameserver {nameserver}\n")
    os.replace(tmp, path)


class Client:
    """Fresh-name queries to the daemon, from inside plain."""

    def __init__(self, lab: Lab) -> None:
        self.lab, self.n = lab, 0

    def ask(self) -> tuple[str, dns.message.Message | None]:
        self.n += 1
        name = f"nb-{os.getpid()}-{self.n}.example.test."
        q = dns.message.make_query(name, "A", want_dnssec=True)

        def send() -> dns.message.Message | None:
            try:
                return dns.query.udp(q, "127.0.0.1", timeout=3)
            except Exception:  # a timeout while the path changes is part of the figure
                return None

        reply: dns.message.Message | None = self.lab.call_in(HOST, send)
        return name.lower(), reply


def secure(reply: dns.message.Message | None) -> bool:
    return reply is not None and reply.rcode() == dns.rcode.NXDOMAIN and bool(
        reply.flags & dns.flags.AD)


def until(check: object, limit: float = 30.0) -> float:
    """Seconds until check() is true (polling every POLL); exits the bench on timeout."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        if time.monotonic() - start > limit:
            sys.exit("bench: no answer through the new path within the limit")
        time.sleep(POLL)
    return time.monotonic() - start


def summary(label: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (f"  {label:<44} n={len(ms):<3} p50 {statistics.median(ms):7.0f} ms  "
            f"min {ms[0]:6.0f} ms  max {ms[-1]:6.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="resolv.conf rewrites in (a)")
    ap.add_argument("--failures", type=int, default=5, help="rounds of (b) and (c)")
    args = ap.parse_args()
    lab = Lab()
    lab.up()
    to_router: list[float] = []
    to_unbound: list[float] = []
    stripping: list[float] = []
    dying: list[float] = []
    try:
        router = Stripper(lab, ROUTER, mode="pass").start()
        root = HOSTS[ZONES["."].server]
        run = lab.run_dir / "bench-network"
        run.mkdir(parents=True, exist_ok=True)
        rc = run / "resolv.conf"
        write_resolv_conf(rc, lab.unbound_addr)
        daemon = ResolverDaemon(lab, HOST, name="bench-network", tunnels=False, sections={
            "upstream": {"servers": None, "resolv_conf": str(rc), "timeout": 0.5,
                         "probe_interval": 2, "root_hints": [root.v4, root.v6]},
            "log": {"level": "warning"}})
        daemon.start()
        client, unbound_log = Client(lab), QueryLog(lab, "unbound")
        try:
            rng = random.Random(12)
            for i in range(args.rounds):
                target = lab.addr(ROUTER) if i % 2 == 0 else lab.unbound_addr
                # A network changes at any moment, not in step with our 1 s poll.
                time.sleep(rng.uniform(0, 1))
                unbound_log.mark()
                seen_router = len(router.queries())
                write_resolv_conf(rc, target)

                def via_new(target: str = target, seen: int = seen_router) -> bool:
                    name, reply = client.ask()
                    if not secure(reply):
                        return False
                    routed = name in {q[1] for q in router.queries()[seen:]}
                    if target != lab.unbound_addr:
                        return routed
                    time.sleep(0.01)  # named's log line
                    return not routed and name.rstrip(".") in {
                        q.name for q in unbound_log.since("ns-example")}

                (to_router if target != lab.unbound_addr else to_unbound).append(until(via_new))
            for _ in range(args.failures):
                write_resolv_conf(rc, lab.addr(ROUTER))
                router.mode = "pass"
                until(lambda: daemon.upstream()["using"] == [f"{lab.addr(ROUTER)}:53"])
                router.mode = "strip"
                stripping.append(until(lambda: secure(client.ask()[1])))
                router.mode = "pass"
                until(lambda: daemon.upstream()["path"] == "forward")
                router.mode = "drop"
                dying.append(until(lambda: secure(client.ask()[1])))
                router.mode = "pass"
        finally:
            daemon.stop()
            router.stop()
    finally:
        lab.down()
    print("\nfollowing the network (daemon in plain, mode auto, 1 s file poll; client asks a "
          f"fresh name every {POLL * 1000:.0f} ms)\n")
    print(summary("(a) resolv.conf -> first answer via router", to_router))
    print(summary("(a) resolv.conf -> first answer via Unbound", to_unbound))
    print(summary("(b) router starts stripping -> secure again", stripping))
    print(summary("(c) router dies -> resolving again", dying))
    return 0


if __name__ == "__main__":
    sys.exit(main())
