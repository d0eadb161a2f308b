"""What processes cost while a benchmark runs: CPU seconds, resident memory, the noise.

Read from /proc (no dependency): `cpu_seconds(pid)` is user + system time of every thread of
the process; `machine_busy()` is the whole machine's busy CPU seconds (other helpers' work
included: that is the noise); `rss_mb(pid)` is VmRSS. `calibrate()` times a fixed piece of
CPU work several times, so a report can say how steady the machine was while it measured.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads); 0.0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid`; (0, 0) if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of `pid`'s main thread."""
    vol = invol = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                invol = int(line.split()[1])
    except OSError:
        pass
    return vol, invol


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MiB (0.0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """The direct children of `pid`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def steal() -> float:
    """CPU seconds the hypervisor took from this machine since boot (all CPUs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return int(fields[7]) / _TICK if len(fields) > 7 else 0.0


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (all CPUs, not idle or iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK


class CpuMeter:
    """CPU seconds each named process (and the machine) spent between `start` and `stop`."""

    def __init__(self, pids: dict[str, Iterable[int]]) -> None:
        self.pids = {name: list(p) for name, p in pids.items()}
        self._t0: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(p) for p in ps) for name, ps in self.pids.items()}
        now["machine"] = machine_busy()
        now["steal"] = steal()
        now["wall"] = time.monotonic()
        return now

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        self.used = {k: end[k] - self._t0[k] for k in end}
        return self.used


def calibrate(rounds: int = 7, work: int = 20_000) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of a fixed CPU-bound job (`work` SHA-256 of 64 bytes),
    timed `rounds` times: how much the machine's load stretches our own work."""
    data = b"x" * 64
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(work):
            hashlib.sha256(data).digest()
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.02)
    return statistics.median(times), min(times), max(times)


def load_average() -> float:
    return os.getloadavg()[0]
