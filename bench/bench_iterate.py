"""Benchmark: cold iterative lookups, ipseckey-resolver (`mode = "iterate"`) against Unbound.

Both resolve from the lab's root (root hints = ns-root, trust anchor = the lab root DS), both
validate, both run in the lab host `plain` pinned to one CPU with `taskset -c 1` (one after the
other); dnsperf runs on CPU 0. Unbound runs with its defaults (QNAME minimisation on,
target-fetch-policy "3 2 1 0 0") plus what the lab needs (`local-zone: "test." nodefault`).
Upstream queries are counted where they arrive: the query logs of the lab's named servers
(`querylog yes`, lab/querylog.py), from `plain`'s addresses: both are measured the same way.

1. Names: one TSIG-signed UPDATE batch adds `b<i>.example.test A` (named signs them).
2. Cold start, per resolver, `--rounds` times: a fresh process, readiness with `. SOA` (the
   root primed and its DNSKEY validated, as both do at start), then one lookup of a new name
   (`dig +dnssec`): its latency and the upstream queries it cost (the whole chain: referrals,
   DS and DNSKEY of test. and example.test., the answer).
3. First lookups, per resolver: a fresh process warmed with one name of example.test., then
   dnsperf sends `--names` names never asked before, each once (DO=1, 20 outstanding): qps,
   p50/p99 latency, and upstream queries per client query.

Usage (root; brings its own lab instance up and down):
  LAB_ID=i .venv/bin/python bench/bench_iterate.py [--names 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
import dns.update  # noqa: E402

from lab.core import Lab  # noqa: E402
from lab.probes import python_argv  # noqa: E402
from lab.querylog import QueryLog  # noqa: E402
from lab.topology import DOMAIN, HOSTS, ZONES  # noqa: E402

HOST = "plain"
OURS_PORT, UNBOUND_PORT = 5301, 5302
SERVER_CPU, CLIENT_CPU = "1", "0"
_VERBOSE = re.compile(r"^> (\S+) (\S+) (\S+) ([0-9.]+)$")


def add_names(lab: Lab, first: int, count: int) -> None:
    """b<first>..b<first+count-1>.example.test A, in one TSIG-signed UPDATE.

    One message (at most 2500 names, under 64 KB): a second UPDATE that arrived while named's
    inline signing was busy with the first was dropped ("receive_secure_serial: unchanged").
    """
    if count > 2500:
        sys.exit("bench: at most 2500 names (one UPDATE message)")

    def build(msg: dns.update.UpdateMessage) -> None:
        for i in range(first, first + count):
            msg.add(f"b{i}.{DOMAIN}", 60, "A", f"192.0.2.{i % 250 + 1}")

    lab.update(build, host=HOST, timeout=60)
    for i in (first, first + count - 1):
        lab.wait_signed(f"b{i}.{DOMAIN}", "A", HOSTS[ZONES[DOMAIN].server].v4, host=HOST,
                        timeout=60)


def ours_argv(lab: Lab, work: Path) -> list[str]:
    root = HOSTS[ZONES["."].server]
    cfg = work / "ours.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{OURS_PORT}"]
[upstream]
mode = "iterate"
root_hints = ["{root.v4}", "{root.v6}"]
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["{lab.root_anchor_file}"]
[cache]
max_entries = 100000
[log]
level = "warning"
""")
    return ["taskset", "-c", SERVER_CPU, *python_argv("-m", "resolver", "--config", str(cfg))]


def unbound_argv(lab: Lab, work: Path) -> list[str]:
    conf = work / "unbound.conf"
    conf.write_text(f"""
server:
    verbosity: 0
    use-syslog: no
    logfile: ""
    username: ""
    chroot: ""
    directory: "{work}"
    pidfile: ""
    do-daemonize: no
    num-threads: 1
    so-reuseport: no
    interface: 127.0.0.1@{UNBOUND_PORT}
    access-control: 127.0.0.0/8 allow
    root-hints: "{lab.run_dir / 'unbound' / 'root.hints'}"
    trust-anchor-file: "{lab.root_anchor_file}"
    local-zone: "test." nodefault
    module-config: "validator iterator"
remote-control:
    control-enable: no
""")
    return ["taskset", "-c", SERVER_CPU, "/usr/sbin/unbound", "-d", "-c", str(conf)]


def dig(lab: Lab, port: int, *args: str) -> str:
    return lab.exec(HOST, ["dig", "@127.0.0.1", "-p", str(port), "+time=5", "+tries=1", *args],
                    check=False, timeout=30).stdout


@contextmanager
def resolver(lab: Lab, argv: list[str], port: int, log: Path) -> Iterator[None]:
    with open(log, "ab") as out:
        proc = lab.popen(HOST, argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "status: NOERROR" not in dig(lab, port, "+dnssec", ".", "SOA"):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: resolver on port {port} did not come up:\n{log.read_text()}")
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Result:
    label: str
    cold_ms: list[float] = field(default_factory=list)
    cold_queries: list[int] = field(default_factory=list)
    cold_example: list[str] = field(default_factory=list)
    qps: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rcodes: dict[str, int] = field(default_factory=dict)
    first_queries: int = 0
    names: int = 0

    def pct(self, values: list[float], p: float) -> float:
        data = sorted(values)
        return data[min(len(data) - 1, int(p / 100 * len(data)))] if data else float("nan")


def timed_query(lab: Lab, port: int, name: str) -> tuple[int, float]:
    """(rcode, milliseconds) of one DO=1 query, timed inside the lab host."""
    q = dns.message.make_query(name, "A", want_dnssec=True)

    def ask() -> tuple[int, float]:
        start = time.perf_counter()
        reply = dns.query.udp(q, "127.0.0.1", port=port, timeout=10)
        return reply.rcode(), (time.perf_counter() - start) * 1000

    result: tuple[int, float] = lab.call_in(HOST, ask)
    return result


def cold_rounds(lab: Lab, res: Result, argv: list[str], port: int, work: Path,
                names: list[str]) -> None:
    logs = QueryLog(lab, HOST)
    for name in names:
        with resolver(lab, argv, port, work / f"{res.label}.log"):
            logs.mark()
            rcode, ms = timed_query(lab, port, name)
            if rcode != dns.rcode.NOERROR:
                sys.exit(f"bench: {res.label}: {name}: {dns.rcode.to_text(rcode)}")
            res.cold_ms.append(ms)
            time.sleep(0.2)  # let the last log lines reach the files
            sent = logs.since()
            res.cold_queries.append(len(sent))
            if not res.cold_example:
                res.cold_example = [f"{q.name} {q.rdtype}" for q in sent]


def first_lookups(lab: Lab, res: Result, argv: list[str], port: int, work: Path,
                  names: list[str]) -> None:
    data = work / f"names-{res.label}.txt"
    data.write_text("".join(f"{n} A\n" for n in names))
    logs = QueryLog(lab, HOST)
    with resolver(lab, argv, port, work / f"{res.label}.log"):
        out = dig(lab, port, "+dnssec", f"warm.{DOMAIN}", "A")  # example.test's chain, cached
        if "status: NXDOMAIN" not in out:
            sys.exit(f"bench: {res.label}: warm-up failed:\n{out}")
        logs.mark()
        perf = lab.exec(HOST, ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", "127.0.0.1", "-p",
                               str(port), "-d", str(data), "-n", "1", "-c", "4", "-q", "20",
                               "-t", "5", "-D", "-v"], timeout=600).stdout
        time.sleep(0.3)
        res.first_queries = len(logs.since())
    res.names = len(names)
    for line in perf.splitlines():
        m = _VERBOSE.match(line)
        if m:
            res.rcodes[m.group(1)] = res.rcodes.get(m.group(1), 0) + 1
            res.latencies.append(float(m.group(4)) * 1000)
    qps = re.search(r"Queries per second:\s+([0-9.]+)", perf)
    res.qps = float(qps.group(1)) if qps else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=1000, help="first lookups per resolver")
    ap.add_argument("--rounds", type=int, default=10, help="cold starts per resolver")
    args = ap.parse_args()
    lab = Lab()
    lab.up()
    try:
        add_names(lab, 0, 2 * args.rounds + args.names)
        with tempfile.TemporaryDirectory(prefix="isk-bench-iter-") as tmp:
            work = Path(tmp)
            ours, unb = Result("ours"), Result("unbound")
            runs = ((ours, ours_argv(lab, work), OURS_PORT, 0),
                    (unb, unbound_argv(lab, work), UNBOUND_PORT, args.rounds))
            for res, argv, port, offset in runs:
                cold_rounds(lab, res, argv, port, work,
                            [f"b{offset + i}.{DOMAIN}" for i in range(args.rounds)])
            first = [f"b{2 * args.rounds + i}.{DOMAIN}" for i in range(args.names)]
            for res, argv, port, _offset in runs:
                first_lookups(lab, res, argv, port, work, first)
    finally:
        lab.down()
    print(f"\ncold iterative lookups in the lab hierarchy (. -> test. -> example.test.), "
          f"validating, DO=1; resolvers on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}\n")
    print(f"cold start ({args.rounds} rounds: fresh process, root primed, one new name):")
    for r in (ours, unb):
        print(f"  {r.label:<8} p50 {r.pct(r.cold_ms, 50):6.2f} ms  max {max(r.cold_ms):6.2f} ms"
              f"  upstream queries per lookup: mean {statistics.mean(r.cold_queries):.1f} "
              f"(min {min(r.cold_queries)}, max {max(r.cold_queries)})")
    for r in (ours, unb):
        print(f"  {r.label} first cold lookup, as the servers logged it (1 ms clock): "
              f"{', '.join(r.cold_example)}")
    print(f"\nfirst lookups ({args.names} new names in a warm zone, 20 outstanding):")
    for r in (ours, unb):
        rc = ",".join(f"{k}:{v}" for k, v in sorted(r.rcodes.items()))
        print(f"  {r.label:<8} {r.qps:8.0f} qps  p50 {r.pct(r.latencies, 50):6.2f} ms  "
              f"p99 {r.pct(r.latencies, 99):6.2f} ms  upstream queries per client query "
              f"{r.first_queries / max(1, r.names):.2f}  [{rc}]")
    cold_ratio = statistics.mean(ours.cold_queries) / statistics.mean(unb.cold_queries)
    print(f"\nratio ours/unbound: first-lookup qps {ours.qps / unb.qps:.2f}, "
          f"cold-start queries {cold_ratio:.2f}, "
          f"first-lookup queries {ours.first_queries / max(1, unb.first_queries):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
