"""Benchmark: issue 13's provisioning figures side by side, each measured in several rounds.

One command prints, per figure, the median and the range over `--rounds` (default 3) rounds of
one run on one lab (LAB_ID from the environment, default "bnch"; needs root; the lab is taken
down at the end, also on error or Ctrl-C):

  (bob's one charon answers for every peer: its per-initiator DoS limits are raised to
  what 200 distinct responders would allow alice, RESPONDER_LIMITS.)
  noise      the machine while it ran: a fixed CPU job's time (median, min-max), the load
             average, and the share of the machine's busy CPU that was not ours or charon's;
  charon     200 CHILD_SAs driven directly over VICI (bench/charon_direct.py; the daemon's
             own conns, at most max_setups in flight): seconds to the last, how many came up;
             and with 16, 64 and 200 in flight (the choice of max_setups);
  (a)        bench_provision.py's first lookup of a fresh peer: daemon vs upstream + IKE;
  (b)        200 distinct peers at once through the daemon: time to the 200th answer, its
             ratio to charon's, NOERROR answers;
  (c)        meanwhile, cached answers for unrelated names: p50 / p99 / max, and the same in the
             second before the burst (bench_provision.py's client, here at nice -10: it
             measures, its own scheduling is not the daemon's latency);
  cpu        CPU seconds during (b): the daemon, its tunnel worker, each charon;
  threads    (b) and (c) again with `worker_process = false` (VICI and XFRM in threads of the
             daemon, as before issue 13): the comparison behind the worker process;
  10,000     the daemon holding 10 and 10,000 tunnels (dry-run IKE, real XFRM): start-up
             including reconcile, RSS, cached p50, a new tunnel's lookup (bench/scale_big.py);
  store      one change recorded in a state store of 10, 1,000 and 10,000 tunnels.

Usage: LAB_ID=x .venv/bin/python bench/bench_scale.py [--rounds 3] [--peers 200] [--runs 10]
                                                       [--big 10000] [--skip threads,big]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import dns.name

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_provision as bp  # noqa: E402
from bench import charon_direct, procstat, scale_big  # noqa: E402
from lab import Lab  # noqa: E402
from lab.net import LabError  # noqa: E402
from lab.resolverd import ResolverDaemon  # noqa: E402
from resolver.ipseckey import IpsecKey  # noqa: E402
from resolver.tunnels.config import Identity, ProvisionConfig  # noqa: E402
from resolver.tunnels.intents import tunnel_spec  # noqa: E402
from resolver.tunnels.vici import ViciBackend  # noqa: E402
from resolver.tunnels.xfrm import XfrmPolicies  # noqa: E402

MAX_SETUPS = ProvisionConfig().max_setups
WINDOWS = (16, 64, 200)  # charon alone with other numbers in flight than max_setups
RESPONDER_LIMITS = {"block_threshold": "1000", "cookie_threshold": "1000",
                    "cookie_threshold_ip": "1000"}
# The client measuring cached answers runs at a higher priority: on two shared cores a client
# at the default one was itself descheduled for 0.1-0.3 s during a burst (its stalls did not
# line up with any turn of the daemon's loop), and that is not the daemon's latency.
CLIENT_NICE = -10
MIN_DIRECT = 0.95  # a round where charon alone made fewer of the SAs is repeated (see main)
Rows = dict[str, list[float]]


def record(rows: Rows, key: str, value: float) -> None:
    rows.setdefault(key, []).append(value)


def pid_of(lab: Lab, name: str) -> int:
    return int((lab.run_dir / "pids" / f"{name}.pid").read_text().split()[0])


def settle(lab: Lab, timeout: float = 15.0) -> None:
    """Wait until bob's charon holds no IKE_SA with alice any more (the deletes of a burst's
    teardown take it a while; a new IKE_SA_INIT sent meanwhile went unanswered)."""
    end = time.monotonic() + timeout
    while lab.ike_sas("bob") and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(0.5)


def clean_alice(lab: Lab) -> None:
    """Our conns and SAs out of alice's charon, our XFRM policies out of her kernel."""
    names = [n for n in lab.conns("alice") if n.startswith("isk-")]
    charon_direct.remove(lab.vici_path("alice"), names)
    settle(lab)

    def flush() -> None:
        x = XfrmPolicies()
        try:
            x.flush_ours()
        finally:
            x.close()
    lab.call_in("alice", flush, 30)
    time.sleep(0.5)


def direct_conns(lab: Lab, peers: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The load-conn payloads the daemon would send for `peers` (and alice's key loaded)."""
    ident = Identity("alice.example.test", lab.private_key("alice"),
                     (ip_address(lab.addr("alice")), ip_address(lab.addr("alice", 6))))
    vb = ViciBackend(lab.vici_socket("alice"), ident)
    try:
        with lab.vici("alice") as s:
            s.load_key({"type": "any", "data": vb._private_der})
        return [vb.connection(tunnel_spec(
            IpsecKey.from_public_key(dns.name.from_text(n), lab.public_key("bob")),
            ip_address(a), None)) for n, a in peers]
    finally:
        vb.close()


def part_a(lab: Lab, runs: list[tuple[str, str]]) -> list[tuple[float, float, float]]:
    """bench_provision.py's (a), a peer whose direct IKE measurement failed (no answer from
    bob's charon: lab noise, not ours) left out rather than the round."""
    out = []
    for name, addr in runs:
        try:
            ike = bp.ike_ms(lab, name, addr)
        except LabError as exc:
            print(f"  (a) {name}: direct IKE failed, left out: {str(exc).splitlines()[0]}")
            continue
        out.append((bp.upstream_ms(lab, name), ike, bp.daemon_ms(lab, name, addr)))
    return out or [(float("nan"),) * 3]


def burst_through(lab: Lab, peers: list[tuple[str, str]], rows: Rows, tag: str,
                  worker: bool, runs: list[tuple[str, str]]) -> None:
    """(a) on `runs` (if any), then (b)+(c) on `peers`, through a fresh daemon."""
    shutil.rmtree(lab.run_dir / f"scale-{tag}", ignore_errors=True)  # no state of a last run
    d = ResolverDaemon(lab, "alice", name=f"scale-{tag}", sections={
        "policy": {"default": "private-or-clear", "private": [f"{bp.PREFIX}0/112"]},
        "provision": {"worker_process": worker}, "log": {"level": "warning"}}, own_session=True)
    d.start()
    try:
        main = d.proc.pid if d.proc is not None else 0
        if runs:
            a = part_a(lab, runs)
            record(rows, "a.upstream", statistics.median(r[0] for r in a))
            record(rows, "a.ike", statistics.median(r[1] for r in a))
            record(rows, "a.daemon", statistics.median(r[2] for r in a))
            record(rows, "a.overhead", statistics.median(r[2] - r[0] - r[1] for r in a))
        meter = procstat.CpuMeter({
            "main": [main], "worker": procstat.children(main),
            "charon-alice": [pid_of(lab, "charon-alice")],
            "charon-bob": [pid_of(lab, "charon-bob")]})
        meter.start()
        bc = bp.part_bc(lab, peers, client_nice=CLIENT_NICE)
        used = meter.stop()
    finally:
        d.stop()
    dur, bef = bc["during"], bc["before"]
    record(rows, f"{tag}.total_s", bc["total"] / 1000)
    record(rows, f"{tag}.noerror", sum(1 for rc in bc["rcodes"] if rc == 0))
    record(rows, f"{tag}.each_p50_s", statistics.median(bc["each"]) / 1000)
    record(rows, f"{tag}.c_p50", bp.pct(dur, 50))
    record(rows, f"{tag}.c_p99", bp.pct(dur, 99))
    record(rows, f"{tag}.c_max", max(dur))
    record(rows, f"{tag}.before_p99", bp.pct(bef, 99))
    record(rows, f"{tag}.before_max", max(bef))
    for name, sec in used.items():
        if name not in ("wall",):
            record(rows, f"{tag}.cpu.{name}", sec)
    record(rows, f"{tag}.c_over50", sum(1 for ms in dur if ms > 50))
    record(rows, f"{tag}.c_worst_at", bc["worst_at"])
    record(rows, f"{tag}.c_n", len(dur))
    ours = used["main"] + used["worker"] + used["charon-alice"] + used["charon-bob"]
    record(rows, f"{tag}.cpu.others_share", max(0.0, used["machine"] - ours) / used["machine"])
    clean_alice(lab)


def one_round(lab: Lab, args: argparse.Namespace, peers: list[tuple[str, str]],
              runs: list[tuple[str, str]], rows: Rows) -> bool:
    """One round into `rows`; False (nothing recorded) if charon alone failed too often."""
    conns = direct_conns(lab, peers)
    names = [next(iter(c)) for c in conns]
    o = charon_direct.establish(lab.vici_path("alice"), conns, window=MAX_SETUPS)
    charon_direct.remove(lab.vici_path("alice"), names)
    settle(lab)
    if o.installed < MIN_DIRECT * len(conns):
        print(f"  charon alone made {o.installed} of {len(conns)} CHILD_SAs: round repeated")
        return False
    med, lo, hi = procstat.calibrate()
    record(rows, "noise.cpu_job_ms", med)
    record(rows, "noise.cpu_job_spread", (hi - lo) / med)
    record(rows, "noise.load", procstat.load_average())

    record(rows, "charon.seconds", o.seconds)
    record(rows, "charon.installed", o.installed)
    for window in WINDOWS if "windows" not in args.skip else ():
        w = charon_direct.establish(lab.vici_path("alice"), conns, window=window)
        record(rows, f"charon.w{window}", w.seconds)
        record(rows, f"charon.w{window}.installed", w.installed)
        charon_direct.remove(lab.vici_path("alice"), names)
        settle(lab)

    burst_through(lab, peers, rows, "process", True, runs)
    record(rows, "process.ratio", rows["process.total_s"][-1] / o.seconds)
    if "threads" not in args.skip:
        burst_through(lab, peers, rows, "threads", False, [])
        record(rows, "threads.ratio", rows["threads.total_s"][-1] / o.seconds)

    if "big" not in args.skip:
        fresh = [n for n, _ in peers[:20]]
        for n in (10, args.big):
            big = scale_big.daemon_with(lab, n, fresh, f"{bp.PREFIX}0/112", "big")
            for k, v in big.items():
                record(rows, f"big{n}.{k}", v)
            clean_alice(lab)
    if "store" not in args.skip:
        for n in (10, 1000, args.big):
            for k, v in scale_big.store_costs(n).items():
                record(rows, f"store{n}.{k}", v)
    return True


# --- the report -------------------------------------------------------------------------------


def cell(v: list[float] | None, fmt: str = "{:.2f}") -> str:
    if not v:
        return "-"
    m = statistics.median(v)
    return f"{fmt.format(m)} [{fmt.format(min(v))}-{fmt.format(max(v))}]"


def report(rows: Rows, args: argparse.Namespace) -> None:
    g: Callable[[str], list[float] | None] = rows.get
    print(f"\nissue 13, provisioning: median [min-max] of {args.rounds} rounds, "
          f"{args.peers} peers, max_setups {MAX_SETUPS}; bob's charon (all the peers): "
          + ", ".join(f"{k} = {v}" for k, v in RESPONDER_LIMITS.items()))
    print("\nnoise")
    print(f"  fixed CPU job ms                 {cell(g('noise.cpu_job_ms'))}"
          f"  (spread within a round {cell(g('noise.cpu_job_spread'), '{:.0%}')})")
    print(f"  load average                     {cell(g('noise.load'))}")
    print(f"  others' share of busy CPU in (b) {cell(g('process.cpu.others_share'), '{:.0%}')}")
    print(f"  CPU s stolen by the hypervisor   {cell(g('process.cpu.steal'))} during (b)")
    print("\n(a) first lookup of a fresh peer (ms, medians of each round)")
    for k, label in (("a.upstream", "upstream AAAA+IPSECKEY"), ("a.ike", "IKE over VICI direct"),
                     ("a.daemon", "daemon query -> answer"), ("a.overhead", "overhead")):
        print(f"  {label:32} {cell(g(k))}")
    print(f"\n(b) {args.peers} peers at once: time to the last answer (s)")
    print(f"  charon alone, over VICI          {cell(g('charon.seconds'))}"
          f"   CHILD_SAs {cell(g('charon.installed'), '{:.0f}')}")
    for window in WINDOWS:
        if g(f"charon.w{window}"):
            print(f"  charon alone, {window:3} in flight      {cell(g(f'charon.w{window}'))}"
                  f"   CHILD_SAs {cell(g(f'charon.w{window}.installed'), '{:.0f}')}")
    for tag in ("process", "threads"):
        if g(f"{tag}.total_s"):
            print(f"  daemon ({tag:7})                {cell(g(f'{tag}.total_s'))}"
                  f"   NOERROR {cell(g(f'{tag}.noerror'), '{:.0f}')}"
                  f"   ratio {cell(g(f'{tag}.ratio'))} (target <= 1.2)")
    print("\n(c) cached answers for unrelated names during (b), ms")
    print(f"  {'':30} {'p50':>22} {'p99':>22} {'max':>24}")
    for tag in ("process", "threads"):
        if g(f"{tag}.c_p50"):
            print(f"  during, {tag:21} {cell(g(f'{tag}.c_p50')):>22} {cell(g(f'{tag}.c_p99')):>22}"
                  f" {cell(g(f'{tag}.c_max'), '{:.1f}'):>24}")
            print(f"  1 s before, {tag:17} {'':>22} {cell(g(f'{tag}.before_p99')):>22}"
                  f" {cell(g(f'{tag}.before_max'), '{:.1f}'):>24}")
    for tag in ("process", "threads"):
        if g(f"{tag}.c_over50"):
            print(f"  answers over 50 ms, {tag:8}    {cell(g(f'{tag}.c_over50'), '{:.0f}')} of "
                  f"{cell(g(f'{tag}.c_n'), '{:.0f}')}; the slowest sent "
                  f"{cell(g(f'{tag}.c_worst_at'))} s into the burst")
    print("  target: p99 < 5 ms, max < 50 ms")
    print("\nCPU seconds during (b)")
    for tag in ("process", "threads"):
        if g(f"{tag}.cpu.main"):
            parts = "  ".join(f"{n} {cell(g(f'{tag}.cpu.{n}'))}" for n in
                              ("main", "worker", "charon-alice", "charon-bob"))
            print(f"  {tag:8} {parts}")
    if g(f"big{args.big}.start_s"):
        print("\nthe daemon holding N tunnels (dry-run IKE, real XFRM)")
        print(f"  {'N':>6} {'start s':>20} {'RSS MiB: daemon + worker = total':>40} "
              f"{'cached p50 ms':>22} "
              f"{'new tunnel ms':>22}")
        for n in (10, args.big):
            rss = [a + b for a, b in zip(g(f"big{n}.rss_main") or [],
                                         g(f"big{n}.rss_worker") or [], strict=True)]
            print(f"  {n:>6} {cell(g(f'big{n}.start_s')):>20} "
                  f"{cell(g(f'big{n}.rss_main'), '{:.0f}')} + "
                  f"{cell(g(f'big{n}.rss_worker'), '{:.0f}')} = {cell(rss, '{:.0f}')}"
                  f" {cell(g(f'big{n}.cached_p50')):>22} {cell(g(f'big{n}.change_ms')):>22}")
        a, b = g(f"big{args.big}.cached_p50"), g("big10.cached_p50")
        if a and b:
            ratio = [x / y for x, y in zip(a, b, strict=True)]
            print(f"  cached p50 at {args.big} / at 10: {cell(ratio)} (target <= 1.2); "
                  f"targets: RSS < 300 MiB, start < 30 s")
    if g(f"store{args.big}.ms"):
        print("\none change recorded (state store on its own; median of 100 changes)")
        for n in (10, 1000, args.big):
            print(f"  {n:>6} entries: {cell(g(f'store{n}.ms'))} ms until on disk, "
                  f"{cell(g(f'store{n}.bytes'), '{:.0f}')} bytes written, "
                  f"{cell(g(f'store{n}.loop_ms'), '{:.3f}')} ms of the loop's CPU")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", type=int, default=200)
    ap.add_argument("--runs", type=int, default=10, help="fresh peers per round for (a)")
    ap.add_argument("--big", type=int, default=10_000)
    ap.add_argument("--skip", default="",
                    help="comma-separated: windows, threads, big, store")
    args = ap.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    lab = Lab(lab_id=os.environ.get("LAB_ID", "bnch"))
    # bob's one charon plays all the peers, each at an address of its own. 200 real peers
    # would each see one half-open IKE_SA from alice; one charon sees them all and, with
    # strongSwan's defaults (5 half-open per initiator address, cookies above 10), ignored
    # most of a burst, for charon alone as for the daemon (measured: 94 of 200 up).
    lab.charon_settings["bob"] = dict(RESPONDER_LIMITS)
    rows: Rows = {}
    try:
        t0 = time.monotonic()
        lab.up()
        published = bp.publish_peers(lab, args.peers + args.runs * args.rounds)
        # bob's charon learns its new addresses from a burst of netlink events, more than its
        # socket holds ("unable to receive from RT event socket: No buffer space available"):
        # the peers at the addresses it missed never answered (measured: 94-153 of 200 came up,
        # the same ones for charon alone and for the daemon). Started again, it reads them all.
        lab.stop_charon("bob")
        lab.start_charon("bob")
        lab.respond_as("bob", *(n for n, _ in published))
        bp.warm_unbound(lab, [n for n, _ in published])
        print(f"set-up: lab up, {len(published)} peers in {time.monotonic() - t0:.1f} s",
              flush=True)
        peers = published[:args.peers]
        done = repeated = 0
        while done < args.rounds and repeated <= args.rounds:
            runs = published[args.peers + done * args.runs:args.peers + (done + 1) * args.runs]
            if one_round(lab, args, peers, runs, rows):
                done += 1
                print(f"round {done} of {args.rounds} done", flush=True)
            else:
                repeated += 1
        report(rows, args)
        print(f"\nrounds repeated because charon alone made fewer than {MIN_DIRECT:.0%} of the "
              f"CHILD_SAs (the machine starved both charons): {repeated}")
        return 0
    finally:
        lab.down()


if __name__ == "__main__":
    sys.exit(main())
