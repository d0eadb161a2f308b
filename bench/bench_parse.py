"""Per-response parse cost: dnspython's from_wire, resolver.wire.parse, and dnslib, side by side.

Usage: .venv/bin/python bench/bench_parse.py [--rounds 2000]

Reads the real BIND responses of tests/data/bind_responses.txt (ECDSA P-256 zones, NSEC and
NSEC3) and times, for a few shapes, best of 5 runs of `--rounds` parses each:

  from_wire   dns.message.from_wire(wire, ignore_trailing=True): what the resolver used;
  wire/parse   resolver.wire.parse.parse_response(wire): the same dnspython message;
  dnslib      dnslib.DNSRecord.parse(wire): dnslib's own objects, which the validator cannot
              use (it works on dnspython RRsets); converting them would come on top.

This is the measurement behind DESIGN.md's choice of wire/parse over dnslib.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dns.message  # noqa: E402

from resolver.wire.parse import parse_response  # noqa: E402

SHAPES = (("www.nsec.test. A", "A + RRSIG, 4 additional"),
          ("far.nsec.test. A", "CNAME + RRSIG only"),
          ("nsec.test. DNSKEY", "DNSKEY set + RRSIG"),
          ("host.nsec.test. AAAA", "NODATA: SOA, NSEC + RRSIGs"),
          ("nx.nsec.test. A", "NXDOMAIN: SOA, 2 NSEC + RRSIGs"),
          ("nx.nsec3.test. A", "NXDOMAIN: SOA, 3 NSEC3 + RRSIGs"))


def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        times.append((time.perf_counter() - t0) / rounds)
    return min(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    try:
        import dnslib
    except ImportError:
        dnslib = None
    data = {" ".join(line.split()[:2]): bytes.fromhex(line.split()[2])
            for line in (ROOT / "tests" / "data" / "bind_responses.txt").read_text().splitlines()}
    print(f"{'response':<34} {'bytes':>5} {'from_wire':>10} {'wire/parse':>10} {'dnslib':>10}"
          "   (microseconds per parse, best of 5)")
    for key, what in SHAPES:
        wire = data[key]
        fw = best(lambda w=wire: dns.message.from_wire(w, ignore_trailing=True), args.rounds)
        wp = best(lambda w=wire: parse_response(w), args.rounds)
        dl = (best(lambda w=wire: dnslib.DNSRecord.parse(w), args.rounds)
              if dnslib is not None else float("nan"))
        print(f"{what:<34} {len(wire):>5} {fw:>10.1f} {wp:>10.1f} {dl:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
