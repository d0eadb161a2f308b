"""Profile our resolver on the benchmark's workload: the cold path or the cached path.

Usage: .venv/bin/python bench/profile_resolver.py cold|cached [--names 3000] [--seconds 8]
           [--cprofile] [--top 25] [--port-base 5401] [--keep FILE] [--tree DIR]

Sets up what bench_resolver.py sets up (named serving the signed zone on CPU 1), runs only our
resolver, on CPU 0, under bench/sampler.py (or cProfile with --cprofile), drives it with
dnsperf (cold: every name once, 20 outstanding; cached: 200 names for --seconds at full rate),
stops it with SIGTERM and prints the top of the profile: self time (where the CPU was) and
inclusive time (a function and everything it called).
"""

from __future__ import annotations

import argparse
import pstats
import signal
import sys
import tempfile
from pathlib import Path

import bench_resolver as b
import sampler


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("cold", "cached"))
    ap.add_argument("--names", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--cprofile", action="store_true", help="deterministic profile instead")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--port-base", type=int, default=5401)
    ap.add_argument("--keep", type=Path, help="copy the raw profile here")
    ap.add_argument("--tree", type=Path, default=b.ROOT,
                    help="profile the resolver of another tree (e.g. a checkout of main)")
    args = ap.parse_args()
    b.set_ports(args.port_base)
    with tempfile.TemporaryDirectory(prefix="isk-prof-") as tmp:
        work = Path(tmp)
        out = work / ("profile.pstats" if args.cprofile else "profile.json")
        wrapper = (("-m", "cProfile", "-o", str(out)) if args.cprofile
                   else (str(Path(sampler.__file__)), str(out), "--on-signal", "--"))
        anchor = b.make_zone(work, args.names + 50)
        with b.process(b.start_named(work), work / "named.log"):
            b.wait_ready(b.AUTH, b.ZONE)
            tree = args.tree.resolve()
            argv, env = b.start_ours(b.ours_config(work, anchor, b.OURS, "ours"), tree,
                                     wrapper)
            with b.process(argv, work / "ours.log", env, cwd=tree) as proc:
                b.wait_ready(b.OURS, b.ZONE)
                # Warm-up with other names: the first queries import dnspython's rdata modules.
                warm = b.names_file(work, args.names, 50, "warm")
                b.dnsperf(b.OURS, warm, "warm-up", seconds=None, once=True)
                if not args.cprofile:
                    proc.send_signal(signal.SIGUSR2)  # start sampling now
                if args.mode == "cold":
                    data = b.names_file(work, 0, args.names, "cold")
                    p = b.dnsperf(b.OURS, data, "ours cold", seconds=None, once=True,
                                  clients=4, outstanding=20, pid=proc.pid)
                else:
                    data = b.names_file(work, 0, 200, "hot")
                    b.dnsperf(b.OURS, data, "warm-up", seconds=None, once=True)
                    p = b.dnsperf(b.OURS, data, "ours cached", seconds=args.seconds,
                                  pid=proc.pid)
                print(p.line())
        if args.keep is not None:
            args.keep.write_bytes(out.read_bytes())
        if args.cprofile:
            stats = pstats.Stats(str(out))
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
        else:
            print(sampler.report(str(out), args.top, strip=("sampler.py", "runpy", "<module>")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
