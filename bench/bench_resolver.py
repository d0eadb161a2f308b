"""Benchmark: ipseckey-resolver against Unbound, both validating, with dnsperf.

What it does (root not needed; loopback only):
  1. Signs a zone `bench.test.` (ECDSA P-256 KSK + ZSK, NSEC) with dnssec-keygen/-signzone and
     serves it with `named` on 127.0.0.1:5381 (authoritative only).
  2. Starts Unbound on 127.0.0.82:5382 (stub-zone to named, trust anchor = the zone's DS,
     one thread) and our resolver on 127.0.0.83:5383 (forwarding to named, same anchor). Both
     servers are pinned to CPU 0 with `taskset -c 0`; named and dnsperf run on CPU 1.
  3. For each server: a cold pass (N unique names, each asked once: every query goes upstream
     and is validated), then a cached pass (the same names again, for a fixed time, as fast as
     dnsperf can push them), then a paced pass at half of our cached peak to read latency
     percentiles under load. dnsperf -v reports each query's latency; we compute percentiles.
  4. Prints QPS and latency percentiles per pass and the ratio ours/Unbound.

Usage: .venv/bin/python bench/bench_resolver.py [--names 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

AUTH = ("127.0.0.1", 5381)  # named listens only on addresses an interface holds
UNBOUND = ("127.0.0.82", 5382)
OURS = ("127.0.0.83", 5383)
ZONE = "bench.test."
ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.net import poll, stop_process  # noqa: E402


def need(program: str) -> str:
    path = shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        sys.exit(f"bench: {program} not found (apt-get install bind9 bind9-utils unbound dnsperf)")
    return path


def run(argv: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_zone(work: Path, names: int) -> Path:
    """Sign bench.test. and return the anchor file (DS of the KSK)."""
    keys = work / "keys"
    keys.mkdir()
    ksk = run([need("dnssec-keygen"), "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", "-f",
               "KSK", ZONE]).strip()
    zsk = run([need("dnssec-keygen"), "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", ZONE]).strip()
    lines = [f"$TTL 3600\n@ IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 300\n",
             f"@ IN NS ns.{ZONE}\nns IN A {AUTH[0]}\nwww IN A 192.0.2.1\n"]
    lines += [f"n{i} IN A 192.0.2.{i % 250 + 1}\n" for i in range(names)]
    lines += [f"$INCLUDE {keys / ksk}.key\n$INCLUDE {keys / zsk}.key\n"]
    zone = work / "bench.test.zone"
    zone.write_text("".join(lines))
    run([need("dnssec-signzone"), "-q", "-K", str(keys), "-d", str(work), "-o", ZONE, "-f",
         str(work / "bench.test.signed"), str(zone), str(keys / ksk), str(keys / zsk)])
    ds = run([need("dnssec-dsfromkey"), "-2", str(keys / f"{ksk}.key")])
    anchor = work / "anchor.ds"
    anchor.write_text(ds)
    return anchor


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop_process(proc, 5)


def wait_ready(addr: tuple[str, int], qname: str, timeout: float = 15.0) -> None:
    def answers() -> bool:
        r = subprocess.run([need("dig"), f"@{addr[0]}", "-p", str(addr[1]), "+tries=1",
                            "+time=1", "+norec" if addr == AUTH else "+rec", qname, "SOA"],
                           capture_output=True, text=True, check=False)
        return "status: NOERROR" in r.stdout

    if not poll(answers, timeout, 0.2):
        sys.exit(f"bench: server on {addr[0]}:{addr[1]} did not come up")


def start_named(work: Path) -> list[str]:
    conf = work / "named.conf"
    conf.write_text(f"""
options {{ directory "{work}"; listen-on port {AUTH[1]} {{ {AUTH[0]}; }}; listen-on-v6 {{ none; }};
  recursion no; pid-file "{work}/named.pid"; dnssec-validation no; minimal-responses yes; }};
controls {{ }};
zone "{ZONE}" {{ type primary; file "{work}/bench.test.signed"; }};
""")
    return ["taskset", "-c", "1", need("named"), "-g", "-n", "1", "-c", str(conf)]


def start_unbound(work: Path, anchor: Path) -> list[str]:
    conf = work / "unbound.conf"
    conf.write_text(f"""
server:
  interface: {UNBOUND[0]}@{UNBOUND[1]}
  port: {UNBOUND[1]}
  num-threads: 1
  do-ip6: no
  chroot: ""
  username: ""
  directory: "{work}"
  pidfile: "{work}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  do-not-query-localhost: no
  trust-anchor-file: "{anchor}"
  access-control: 127.0.0.0/8 allow
  module-config: "validator iterator"
  so-reuseport: no
  prefetch: no
  local-zone: "test." nodefault  # RFC 6761 reserves test.; Unbound serves it empty by default
stub-zone:
  name: "{ZONE}"
  stub-addr: {AUTH[0]}@{AUTH[1]}
remote-control:
  control-enable: no
""")
    return ["taskset", "-c", "0", need("unbound"), "-d", "-c", str(conf)]


def start_ours(work: Path, anchor: Path) -> list[str]:
    conf = work / "resolver.toml"
    conf.write_text(f"""
[server]
listen = ["{OURS[0]}:{OURS[1]}"]
[upstream]
servers = ["{AUTH[0]}:{AUTH[1]}"]
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["{anchor}"]
[cache]
max_entries = 100000
[log]
level = "warning"
""")
    return ["taskset", "-c", "0", str(PYTHON), "-m", "resolver", "--config", str(conf)]


@dataclass
class Pass:
    name: str
    qps: float
    sent: int
    completed: int
    latencies: list[float]
    rcodes: dict[str, int]

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(p / 100 * len(data)))] * 1000

    def line(self) -> str:
        rc = ",".join(f"{k}:{v}" for k, v in sorted(self.rcodes.items()))
        lost = self.sent - self.completed
        return (f"{self.name:<22} {self.qps:>9.0f} qps  p50 {self.pct(50):6.3f} ms  "
                f"p90 {self.pct(90):6.3f}  p99 {self.pct(99):6.3f}  max {self.pct(100):7.3f}  "
                f"lost {lost}  [{rc}]")


_VERBOSE = re.compile(r"^> (\S+) (\S+) (\S+) ([0-9.]+)$")


def dnsperf(addr: tuple[str, int], datafile: Path, name: str, *, seconds: float | None,
            once: bool = False, qps: float | None = None, clients: int = 4,
            outstanding: int = 100) -> Pass:
    argv = ["taskset", "-c", "1", need("dnsperf"), "-s", addr[0], "-p", str(addr[1]), "-d",
            str(datafile), "-c", str(clients), "-q", str(outstanding), "-t", "3", "-D", "-v"]
    if once:
        argv += ["-n", "1"]
    if seconds is not None:
        argv += ["-l", str(seconds)]
    if qps is not None:
        argv += ["-Q", str(int(qps))]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    lat: list[float] = []
    rcodes: dict[str, int] = {}
    for line in out.splitlines():
        m = _VERBOSE.match(line)
        if m:
            rcodes[m.group(1)] = rcodes.get(m.group(1), 0) + 1
            lat.append(float(m.group(4)))
    qps_m = re.search(r"Queries per second:\s+([0-9.]+)", out)
    sent_m = re.search(r"Queries sent:\s+(\d+)", out)
    done_m = re.search(r"Queries completed:\s+(\d+)", out)
    if not (qps_m and sent_m and done_m):
        sys.exit(f"bench: cannot parse dnsperf output:\n{out[-2000:]}")
    return Pass(name, float(qps_m.group(1)), int(sent_m.group(1)), int(done_m.group(1)), lat,
                rcodes)


def bench_one(label: str, addr: tuple[str, int], work: Path, names: int, seconds: float,
              paced_qps: float | None) -> dict[str, Pass]:
    cold_file = work / f"cold-{label}.txt"
    cold_file.write_text("".join(f"n{i}.{ZONE} A\n" for i in range(names)))
    hot_file = work / f"hot-{label}.txt"
    hot_file.write_text("".join(f"n{i}.{ZONE} A\n" for i in range(min(names, 200))))
    res = {"cold": dnsperf(addr, cold_file, f"{label} cold", seconds=None, once=True,
                           clients=4, outstanding=20)}
    res["cached"] = dnsperf(addr, hot_file, f"{label} cached (peak)", seconds=seconds)
    if paced_qps is not None:
        res["paced"] = dnsperf(addr, hot_file, f"{label} cached @{paced_qps:.0f}/s",
                               seconds=seconds, qps=paced_qps, clients=1, outstanding=50)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=2000, help="distinct names in the zone")
    ap.add_argument("--seconds", type=float, default=10, help="length of each cached pass")
    args = ap.parse_args()
    for prog in ("named", "unbound", "dnsperf", "dig", "taskset"):
        need(prog)
    with tempfile.TemporaryDirectory(prefix="isk-bench-") as tmp:
        work = Path(tmp)
        anchor = make_zone(work, args.names)
        with process(start_named(work), work / "named.log"):
            wait_ready(AUTH, ZONE)
            with process(start_unbound(work, anchor), work / "unbound.log"), \
                    process(start_ours(work, anchor), work / "ours.log"):
                wait_ready(UNBOUND, ZONE)
                wait_ready(OURS, ZONE)
                ours = bench_one("ours", OURS, work, args.names, args.seconds, None)
                half = ours["cached"].qps / 2
                hot = work / "hot-ours.txt"
                ours["paced"] = dnsperf(OURS, hot, f"ours cached @{half:.0f}/s",
                                        seconds=args.seconds, qps=half, clients=1,
                                        outstanding=50)
                unb = bench_one("unbound", UNBOUND, work, args.names, args.seconds, half)
                print((work / "ours.log").read_text()[-3000:], file=sys.stderr)
        print(f"\nzone {ZONE} ({args.names} names, ECDSA P-256, NSEC), validating; DO=1 "
              "queries; servers pinned to CPU 0, dnsperf and named on CPU 1\n")
        for res in (ours, unb):
            for p in res.values():
                print(p.line())
        for kind in ("cold", "cached", "paced"):
            o, u = ours[kind], unb[kind]
            print(f"ratio ours/unbound {kind:<7} qps {o.qps / u.qps:5.2f}   "
                  f"p99 {o.pct(99):.3f} ms vs {u.pct(99):.3f} ms")
        ok = ours["paced"].latencies
        if ok:
            print(f"ours paced: mean {statistics.mean(ok) * 1000:.3f} ms over {len(ok)} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
