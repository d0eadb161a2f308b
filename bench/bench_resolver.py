"""Benchmark: ipseckey-resolver against Unbound, both validating, with dnsperf.

What it does (root not needed; loopback only):
  1. Signs a zone `bench.test.` (ECDSA P-256 KSK + ZSK, NSEC) with dnssec-keygen/-signzone and
     serves it with `named` on 127.0.0.1 (authoritative only, minimal responses).
  2. Starts Unbound on 127.0.0.82 (stub-zone to named, trust anchor = the zone's DS, one
     thread) and our resolver on 127.0.0.83 (forwarding to named, same anchor); with
     `--baseline DIR`, a second copy of ours from another tree (e.g. a checkout of main) on
     127.0.0.84, so "before" and "after" are measured in the same run. Every server is pinned
     to CPU 0 with `taskset -c 0`; named and dnsperf run on CPU 1.
  3. Passes, each repeated `--repeat` times (default 3) and interleaved across the servers
     (server A, server B, server A, ...), so that machine noise falls on all of them alike:
       cold    N names never asked before (repetition r asks n{r*N} .. n{r*N+N-1}), each
               asked once with 20 queries outstanding: every query goes upstream and is
               validated (the zone's DNSKEY is already cached: "a new name in a known zone");
       cached  200 of those names again, for `--seconds`, as fast as dnsperf pushes them;
       paced   the same, at half of our median cached peak, to read latency under load.
     dnsperf -v reports each query's latency; we compute percentiles.
  4. Prints every run, then the median and the spread (min-max) of each figure per server,
     and the ratios ours/Unbound of the medians. Machine noise is stated: the load average
     before and after, and for every pass the share of CPU 0 that something other than the
     server under test used (other helpers' processes, interrupts), from /proc/stat.

Usage: .venv/bin/python bench/bench_resolver.py [--names 1000] [--seconds 8] [--repeat 3]
           [--baseline /path/to/other/tree] [--port-base 5381] [--echo]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ZONE = "bench.test."
ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.net import poll, stop_process  # noqa: E402

AUTH = ("127.0.0.1", 5381)  # named listens only on addresses an interface holds
UNBOUND = ("127.0.0.82", 5382)
OURS = ("127.0.0.83", 5383)
BASELINE = ("127.0.0.84", 5384)
ECHO = ("127.0.0.85", 5385)  # --echo: bench/udp_echo.py, the ceiling of a CPython UDP server


def set_ports(base: int) -> None:
    """Move every listener to base..base+4 (two benchmarks on one machine must not collide)."""
    global AUTH, UNBOUND, OURS, BASELINE, ECHO
    AUTH, UNBOUND = ("127.0.0.1", base), ("127.0.0.82", base + 1)
    OURS, BASELINE = ("127.0.0.83", base + 2), ("127.0.0.84", base + 3)
    ECHO = ("127.0.0.85", base + 4)


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
def process(argv: list[str], log: Path, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        yield proc
    finally:
        stop_process(proc, 10)


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


def ours_config(work: Path, anchor: Path, addr: tuple[str, int], label: str) -> Path:
    conf = work / f"resolver-{label}.toml"
    conf.write_text(f"""
[server]
listen = ["{addr[0]}:{addr[1]}"]
[upstream]
servers = ["{AUTH[0]}:{AUTH[1]}"]
# named here is authoritative for bench.test. only: "auto" would probe it for the root's
# DNSKEY, see REFUSED and switch to iterating from the real root.
mode = "forward"
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["{anchor}"]
[cache]
max_entries = 100000
[log]
level = "warning"
""")
    return conf


def start_ours(conf: Path, tree: Path, wrapper: tuple[str, ...] = ()
               ) -> tuple[list[str], dict[str, str]]:
    """argv and environment for our resolver from `tree` (its code, not the venv's install:
    the shared venv's editable install points at another checkout). Run it with cwd=tree:
    `python -m` puts the working directory first on sys.path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return (["taskset", "-c", "0", str(PYTHON), *wrapper, "-m", "resolver", "--config",
             str(conf)], env)


@dataclass
class Pass:
    name: str
    qps: float
    sent: int
    completed: int
    latencies: list[float]
    rcodes: dict[str, int]
    other_cpu: float = float("nan")  # share of CPU 0 used by others during the pass
    server_cpu: float = float("nan")  # CPU seconds the server under test used in the pass

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(p / 100 * len(data)))] * 1000

    def line(self) -> str:
        rc = ",".join(f"{k}:{v}" for k, v in sorted(self.rcodes.items()))
        lost = self.sent - self.completed
        return (f"{self.name:<26} {self.qps:>9.0f} qps  p50 {self.pct(50):6.3f} ms  "
                f"p90 {self.pct(90):6.3f}  p99 {self.pct(99):6.3f}  max {self.pct(100):7.3f}  "
                f"lost {lost}  cpu/query {1e6 * self.server_cpu / max(1, self.completed):5.0f} us"
                f"  others on CPU0 {100 * self.other_cpu:4.1f}%  [{rc}]")


_HZ = os.sysconf("SC_CLK_TCK")
_VERBOSE = re.compile(r"^> (\S+) (\S+) (\S+) ([0-9.]+)$")


def _cpu0_busy() -> tuple[int, int]:
    """(busy, total) jiffies of CPU 0 from /proc/stat: busy is user + nice + system + steal.

    Interrupt and softirq time are left out: the kernel's own packet work for the server
    under test lands there (at 200k queries a second, a third of the CPU), and is not
    other people's load.
    """
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu0 "):
                v = [int(x) for x in line.split()[1:]]
                return v[0] + v[1] + v[2] + v[7], sum(v[:8])
    return 0, 0


def _proc_cpu(pid: int | None) -> int:
    """utime + stime of a process, in jiffies (0 if unknown)."""
    if pid is None:
        return 0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def dnsperf(addr: tuple[str, int], datafile: Path, name: str, *, seconds: float | None,
            once: bool = False, qps: float | None = None, clients: int = 4,
            outstanding: int = 100, pid: int | None = None) -> Pass:
    argv = ["taskset", "-c", "1", need("dnsperf"), "-s", addr[0], "-p", str(addr[1]), "-d",
            str(datafile), "-c", str(clients), "-q", str(outstanding), "-t", "3", "-D", "-v"]
    if once:
        argv += ["-n", "1"]
    if seconds is not None:
        argv += ["-l", str(seconds)]
    if qps is not None:
        argv += ["-Q", str(int(qps))]
    busy0, total0 = _cpu0_busy()
    mine0 = _proc_cpu(pid)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    busy1, total1 = _cpu0_busy()
    mine = _proc_cpu(pid) - mine0
    other = ((busy1 - busy0) - mine) / max(1, total1 - total0)
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
                rcodes, max(0.0, other), mine / _HZ if pid is not None else float("nan"))


@dataclass
class Server:
    label: str
    addr: tuple[str, int]
    pid: int | None = None
    runs: dict[str, list[Pass]] = field(default_factory=dict)
    kinds: tuple[str, ...] = ("cold", "cached", "paced")  # the passes it takes part in

    def add(self, kind: str, p: Pass) -> None:
        self.runs.setdefault(kind, []).append(p)


def names_file(work: Path, first: int, count: int, tag: str) -> Path:
    path = work / f"{tag}-{first}.txt"
    path.write_text("".join(f"n{i}.{ZONE} A\n" for i in range(first, first + count)))
    return path


def run_passes(servers: list[Server], work: Path, names: int, seconds: float, repeat: int,
               ours: Server) -> float:
    """Every pass, interleaved across servers; returns the paced rate used."""
    for r in range(repeat):
        cold = names_file(work, r * names, names, "cold")
        for s in [s for s in servers if "cold" in s.kinds]:
            s.add("cold", dnsperf(s.addr, cold, f"{s.label} cold #{r + 1}", seconds=None,
                                  once=True, clients=4, outstanding=20, pid=s.pid))
    hot = names_file(work, 0, min(names, 200), "hot")
    for r in range(repeat):
        for s in [s for s in servers if "cached" in s.kinds]:
            s.add("cached", dnsperf(s.addr, hot, f"{s.label} cached #{r + 1}",
                                    seconds=seconds, pid=s.pid))
    half = statistics.median(p.qps for p in ours.runs["cached"]) / 2
    for r in range(repeat):
        for s in [s for s in servers if "paced" in s.kinds]:
            s.add("paced", dnsperf(s.addr, hot, f"{s.label} @{half:.0f}/s #{r + 1}",
                                   seconds=seconds, qps=half, clients=1, outstanding=50,
                                   pid=s.pid))
    return half


def _stat(values: list[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


FIGURES = (("cold", "qps", lambda p: p.qps, ".0f"),
           ("cold", "p99 ms", lambda p: p.pct(99), ".2f"),
           ("cached", "peak qps", lambda p: p.qps, ".0f"),
           ("cached", "p99 ms", lambda p: p.pct(99), ".2f"),
           ("paced", "p50 ms", lambda p: p.pct(50), ".3f"),
           ("paced", "p99 ms", lambda p: p.pct(99), ".3f"))


def summary(servers: list[Server], unbound: Server, half: float) -> list[str]:
    head = f"{'figure':<18}" + "".join(f"{s.label + ' median [min-max]':>30}" for s in servers)
    lines = [head + "   ratios to unbound (medians)"]
    for kind, what, get, fmt in FIGURES:
        label = f"{kind} {what}" if kind != "paced" else f"@{half:.0f}/s {what}"
        row = f"{label:<18}"
        meds = {}
        for s in servers:
            values = [get(p) for p in s.runs.get(kind, [])]
            if not values:
                row += f"{'-':>30}"
                continue
            meds[s.label] = statistics.median(values)
            row += f"{_stat(values, fmt):>30}"
        ratios = [f"{s.label} {meds[s.label] / meds[unbound.label]:.2f}"
                  for s in servers if s is not unbound and s.label in meds
                  and meds[unbound.label]]
        lines.append(row + "   " + ", ".join(ratios))
    others = [p.other_cpu for s in servers for runs in s.runs.values() for p in runs]
    lines.append(f"{'others on CPU 0':<18}" + "".join(
        f"{_stat([100 * p.other_cpu for r in s.runs.values() for p in r], '.1f') + ' %':>30}"
        for s in servers) + f"   (all passes: median {100 * statistics.median(others):.1f} %)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--names", type=int, default=1000, help="names asked per cold pass")
    ap.add_argument("--seconds", type=float, default=8, help="length of each cached pass")
    ap.add_argument("--repeat", type=int, default=3, help="runs of every figure (median)")
    ap.add_argument("--baseline", type=Path, help="another tree of ours to run beside (before)")
    ap.add_argument("--port-base", type=int, default=5381, help="ports base..base+4")
    ap.add_argument("--echo", action="store_true",
                    help="also run bench/udp_echo.py in the cached passes: the ceiling of any "
                         "CPython UDP server here (recvfrom + sendto, nothing else)")
    args = ap.parse_args()
    set_ports(args.port_base)
    for prog in ("named", "unbound", "dnsperf", "dig", "taskset"):
        need(prog)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="isk-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        anchor = make_zone(work, args.names * args.repeat)
        stack.enter_context(process(start_named(work), work / "named.log"))
        wait_ready(AUTH, ZONE)
        unbound = Server("unbound", UNBOUND)
        ours = Server("ours", OURS)
        mine = [ours]  # trees of ours, each started from its own checkout
        trees = {"ours": ROOT}
        if args.baseline is not None:
            mine.append(Server("baseline", BASELINE))
            trees["baseline"] = args.baseline.resolve()
        echo = [Server("py-echo", ECHO, kinds=("cached",))] if args.echo else []
        servers = [*mine, *echo, unbound]
        unbound.pid = stack.enter_context(
            process(start_unbound(work, anchor), work / "unbound.log")).pid
        for e in echo:
            e.pid = stack.enter_context(process(
                ["taskset", "-c", "0", str(PYTHON), str(ROOT / "bench" / "udp_echo.py"),
                 *map(str, ECHO)], work / "echo.log")).pid
        for s in mine:
            argv, env = start_ours(ours_config(work, anchor, s.addr, s.label), trees[s.label])
            s.pid = stack.enter_context(process(argv, work / f"{s.label}.log", env,
                                                cwd=trees[s.label])).pid
        for s in [*mine, unbound]:  # the echo answers anything at once
            wait_ready(s.addr, ZONE)
        half = run_passes(servers, work, args.names, args.seconds, args.repeat, ours)
        for s in mine:
            log = (work / f"{s.label}.log").read_text()
            if log.strip():
                print(f"--- {s.label}'s log (tail) ---\n{log[-3000:]}", file=sys.stderr)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nzone {ZONE} ({args.names} names per cold pass, ECDSA P-256, NSEC), validating; "
          "DO=1 queries; servers pinned to CPU 0, dnsperf and named on CPU 1; "
          f"{args.repeat} runs of each figure, interleaved\n")
    for kind in ("cold", "cached", "paced"):
        for s in servers:
            for p in s.runs.get(kind, []):
                print(p.line())
    print()
    for line in summary(servers, unbound, half):
        print(line)
    print(f"\nmachine noise: load average {' '.join(load_before)} before, "
          f"{' '.join(load_after)} after ({os.cpu_count()} CPUs; "
          f"{time.monotonic() - started:.0f} s run)")
    # The figures of the first version of this benchmark (one run each), from the medians.
    for kind in ("cold", "cached", "paced"):
        o = statistics.median(p.qps for p in ours.runs[kind])
        u = statistics.median(p.qps for p in unbound.runs[kind])
        op = statistics.median(p.pct(99) for p in ours.runs[kind])
        up = statistics.median(p.pct(99) for p in unbound.runs[kind])
        print(f"ratio ours/unbound {kind:<7} qps {o / u:5.2f}   p99 {op:.3f} ms vs {up:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
