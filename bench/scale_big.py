"""Issue 13, "10,000 peers": the daemon holding N tunnels, and the cost of recording a change.

`daemon_with(lab, n)`: the real daemon in alice with a state file that holds N tunnels from a
previous run (destinations 2001:db8:100::2:<i>, names s<i>.example.test, the private group),
IKE through the dry run (one charon on two cores cannot hold 10,000 real SAs) and XFRM real,
in the tunnel worker. Measured: the start (process start to serving: reconcile restores all N),
RSS of the daemon and of its worker, cached answers' latency, and lookups of names not held
yet, each a new tunnel: a drop shunt in the kernel, the dry run's setup, the shunt out again,
and the state write that must be on disk before the answer.

`store_costs(n)`: resolver/statefile.py on its own, in this process: one change to a store of
n entries, persisted (`persist`: on disk before it returns), timed and its bytes counted.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from ipaddress import IPv6Address, ip_address
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode

import resolver.statefile as statefile_module
from bench import procstat
from lab import Lab
from lab.resolverd import ResolverDaemon
from resolver.ipseckey import IpsecKey
from resolver.provisioning.books import LAYOUT
from resolver.statefile import StateFile
from resolver.tunnels import statedoc
from resolver.tunnels.intents import tunnel_spec

SEED_PREFIX = "2001:db8:100::2:"
CACHED = [("plain.example.test.", "A"), ("plain.example.test.", "AAAA"),
          ("example.test.", "SOA"), ("example.test.", "NS"), ("test.", "SOA"), (".", "NS")]


def seed_state(path: Path, lab: Lab, n: int, now: float) -> None:
    """A state file as a daemon holding `n` tunnels would have written it."""
    key = lab.public_key("bob")
    entries = []
    for i in range(n):
        owner = dns.name.from_text(f"s{i}.example.test.")
        spec = tunnel_spec(IpsecKey.from_public_key(owner, key),
                           IPv6Address(f"{SEED_PREFIX}0") + i, None)
        entries.append(statedoc.tunnel_entry(spec, now + 3600, False))
    doc = {"version": 1, "tunnels": entries, "shunts": []}
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, sort_keys=True))
    path.chmod(0o600)


def latency(lab: Lab, seconds: float) -> list[float]:
    """Milliseconds of cached answers asked one after another from alice for `seconds`."""
    def run() -> list[float]:
        qs = [dns.message.make_query(n, t) for n, t in CACHED]
        for q in qs:
            dns.query.udp(q, "127.0.0.1", timeout=5)
        out: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for q in qs:
                t0 = time.perf_counter()
                dns.query.udp(q, "127.0.0.1", timeout=2)
                out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.001)
        return out
    result: list[float] = lab.call_in("alice", run, seconds + 30)
    return result


def new_tunnels(lab: Lab, names: list[str]) -> list[float]:
    """Milliseconds of each first lookup of `names` (one after another), each a new tunnel."""
    def run() -> list[float]:
        out = []
        for name in names:
            q = dns.message.make_query(name, "AAAA")
            t0 = time.perf_counter()
            r = dns.query.udp(q, "127.0.0.1", timeout=10)
            out.append((time.perf_counter() - t0) * 1000)
            if r.rcode() != dns.rcode.NOERROR:
                raise RuntimeError(f"{name}: {dns.rcode.to_text(r.rcode())}")
        return out
    result: list[float] = lab.call_in("alice", run, 120)
    return result


def daemon_with(lab: Lab, n: int, peers: list[str], private: str, tag: str) -> dict[str, Any]:
    """Start a dry-run daemon holding `n` tunnels; measure; stop. `peers`: names in DNS with
    a secure IPSECKEY, not held yet, looked up to make new tunnels."""
    shutil.rmtree(lab.run_dir / f"scale-{tag}-{n}", ignore_errors=True)
    d = ResolverDaemon(lab, "alice", name=f"scale-{tag}-{n}", sections={
        "provision": {"backend": "dryrun", "max_setups": 64},
        "policy": {"default": "private-or-clear", "private": [private, f"{SEED_PREFIX}0/112"]},
        "log": {"level": "error"}}, own_session=True)
    seed_state(d.dir / "provision.json", lab, n, time.time())
    t0 = time.monotonic()
    d.start(timeout=300)
    started = time.monotonic() - t0
    try:
        main = d.proc.pid if d.proc is not None else 0
        worker = procstat.children(main)
        cached = latency(lab, 3.0)
        changes = new_tunnels(lab, peers)
        rss_main = procstat.rss_mb(main)
        rss_worker = sum(procstat.rss_mb(p) for p in worker)
    finally:
        d.stop()
    return {"start_s": started, "rss_main": rss_main, "rss_worker": rss_worker,
            "cached_p50": statistics.median(cached), "cached_p99": _pct(cached, 99),
            "change_ms": statistics.median(changes)}


def _pct(v: list[float], p: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))]


# --- the store on its own ---------------------------------------------------------------------


def store_costs(n: int, changes: int = 100) -> dict[str, float]:
    """One change (a lease moved) at a time in a store of `n` tunnel entries: ms until on disk
    (median), bytes written per change, and ms of the event loop's own time per change."""
    return asyncio.run(_store_costs(n, changes))


async def _store_costs(n: int, changes: int) -> dict[str, float]:
    key = IpsecKey.from_public_key(dns.name.from_text("x.example.test."),
                                   _any_public_key())
    specs = [tunnel_spec(key, ip_address(f"2001:db8::{i:x}"), None) for i in range(n)]
    leases = dict.fromkeys(range(n), 1.8e9)

    def record(section: str, k: str) -> Any:
        i = int(k)
        return lambda: statedoc.tunnel_entry(specs[i], leases[i], False)

    written = 0
    real_write, real_append = statefile_module.write_atomically, statefile_module._write_all

    def count_write(p: Path, data: bytes) -> None:
        nonlocal written
        written += len(data)
        real_write(p, data)

    def count_append(fd: int, data: bytes) -> None:
        nonlocal written
        written += len(data)
        real_append(fd, data)

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        f = StateFile(Path(tmp) / "state.json", LAYOUT, record)
        for i in range(n):  # the store as n tunnels left it
            f.mark("tunnels", str(i))
        await f.persist()
        statefile_module.write_atomically = count_write  # type: ignore[assignment]
        statefile_module._write_all = count_append  # type: ignore[assignment]
        times, loop_ms = [], []
        try:
            for c in range(changes):
                i = (c * 7919) % n
                leases[i] += 60
                t0, c0 = time.perf_counter(), time.thread_time()
                f.mark("tunnels", str(i))
                await f.persist()
                times.append((time.perf_counter() - t0) * 1000)
                loop_ms.append((time.thread_time() - c0) * 1000)
        finally:
            statefile_module.write_atomically = real_write
            statefile_module._write_all = real_append
            await f.close()
    return {"ms": statistics.median(times), "bytes": written / changes,
            "loop_ms": statistics.median(loop_ms)}


def _any_public_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.generate().public_key()
