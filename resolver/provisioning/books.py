"""The Provisioner's books: what it holds, leases, counters, and the state file's records.

Part of the Provisioner (resolver/provision.py has its Rules; DESIGN.md step 7). This module
holds the values every part of it reads and writes, and the small helpers that keep them
consistent: the books themselves (tunnels with their state and lease, shunts, failures held,
pins, adopted conns, setups in flight), the counters, the read-only queries, the shunt helpers
that every path uses, and the link to the state file (Rule 5: `_save` soon, `_persist` and
wait). The setup path is resolver/provisioning/setup.py, start-up
resolver/provisioning/reconcile.py,
what the watch reports resolver/provisioning/repair.py.

Scale. Nothing done per lookup or per change walks every tunnel: the persistent books are
`Marked` containers that tell the state file which entries changed (resolver/statefile.py
writes only those), the gauges are counted when read, and leases end through a heap
(`Deadlines`) rather than a scan. Measured in bench/bench_scale.py at 10 and 10,000 tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import heapq
import ipaddress
import logging
from collections.abc import (
    Callable,
    ItemsView,
    Iterator,
    MutableMapping,
    MutableSet,
    ValuesView,
)
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Generic, TypeVar, overload

from resolver.errors import ProvisioningError, StateWriteFailed
from resolver.statefile import Layout, Record, StateFile
from resolver.tunnels import statedoc
from resolver.tunnels.backend import ProvisioningBackend
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import InstallShunt, Intent, TunnelSpec

log = logging.getLogger("resolver.provision")  # one logger for the Provisioner's parts

Address = IPv4Address | IPv6Address
K = TypeVar("K")
V = TypeVar("V")

ADOPTED_LEASE: Final = 60.0  # seconds (at most [provision] lease) an adopted conn lives unused
IKE_RETRY: Final = 2.0  # seconds between connection attempts to an IKE daemon absent at start-up
LAYOUT: Final = Layout(statedoc.HEADER, statedoc.SECTIONS, statedoc.OPTIONAL)


class TunnelState(enum.Enum):
    PENDING = "pending"
    INSTALLED = "installed"
    DOWN = "down"  # wanted (leased or pinned), but the IKE daemon does not hold it (Rule 6)


@dataclass(slots=True)
class Tunnel:
    spec: TunnelSpec
    state: TunnelState
    expires_at: float  # lease end; teardown at expires_at + grace
    saved_expires_at: float = 0.0  # the lease end in the last record given to the state file
    private: bool = False  # dropped (shunt) whenever it is not up: ensured with shunt=True
    was_down: bool = False  # PENDING: a repair of a DOWN tunnel (still counts as down)
    floored: bool = False  # a floor was put under it (Rule 9): it goes with the tunnel


class Marked(MutableMapping[K, V], Generic[K, V]):
    """A dict that tells the state file which keys it changed (`mark(key)`): every way of
    changing it (set, del, pop, update, ...) goes through `__setitem__`/`__delitem__`, so no
    change can be forgotten in the file. Reads go straight to the dict (these are walked)."""

    __slots__ = ("_d", "_mark")

    def __init__(self, mark: Callable[[K], None]) -> None:
        self._d: dict[K, V] = {}
        self._mark = mark

    def __getitem__(self, key: K) -> V:
        return self._d[key]

    def __setitem__(self, key: K, value: V) -> None:
        self._d[key] = value
        self._mark(key)

    def __delitem__(self, key: K) -> None:
        del self._d[key]
        self._mark(key)

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    @overload  # type: ignore[override]
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: V) -> V: ...

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._d.get(key, default)

    def items(self) -> ItemsView[K, V]:
        return self._d.items()

    def values(self) -> ValuesView[V]:
        return self._d.values()


class MarkedSet(MutableSet[K], Generic[K]):
    """A set that tells the state file which members it added or removed (see `Marked`)."""

    __slots__ = ("_mark", "_s")

    def __init__(self, mark: Callable[[K], None]) -> None:
        self._s: set[K] = set()
        self._mark = mark

    def __contains__(self, key: object) -> bool:
        return key in self._s

    def __iter__(self) -> Iterator[K]:
        return iter(self._s)

    def __len__(self) -> int:
        return len(self._s)

    def add(self, key: K) -> None:
        if key not in self._s:
            self._s.add(key)
            self._mark(key)

    def discard(self, key: K) -> None:
        if key in self._s:
            self._s.discard(key)
            self._mark(key)


class Kind(enum.Enum):
    """What a lease belongs to (Deadlines)."""

    TUNNEL = "tunnels"
    SHUNT = "shunts"
    ADOPTED = "adopted"


class Deadlines:
    """When leases end, without a walk over every tunnel: a heap of (lease end, kind, key),
    pushed whenever an entry is set or its lease shortened. Entries are hints: `expire`
    checks the books for each one that comes due and pushes it again if its lease was
    extended meanwhile (extensions push nothing: they are many, and only ever later)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Kind, Address | str]] = []
        self._seq = 0  # ties: keys of different types do not compare

    def push(self, when: float, kind: Kind, key: Address | str) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, key))

    def due(self, upto: float) -> list[tuple[Kind, Address | str]]:
        """Every (kind, key) whose lease ended at or before `upto` (removed from the heap)."""
        out = []
        while self._heap and self._heap[0][0] <= upto:
            _, _, kind, key = heapq.heappop(self._heap)
            out.append((kind, key))
        return out

    def next(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


@dataclass(slots=True)
class Counters:
    """For `autosp status`, the metrics and the logs. The gauges (`active`, `down`, `shunts`,
    `adopted`) are counted from the books when read: keeping them current on every change
    cost a walk over every tunnel per setup."""

    setups: int = 0
    failures: int = 0
    replacements: int = 0
    teardowns: int = 0
    coalesced: int = 0
    lost: int = 0  # tunnels found gone in the IKE daemon (Rule 6)
    bound: int = 0  # lookups refused: the address is bound to another name's key (Rule 7)
    books: Books | None = None

    @property
    def active(self) -> int:
        """Tunnels up."""
        return self._in(TunnelState.INSTALLED)

    @property
    def down(self) -> int:
        """Tunnels lost and still down (Rule 6), being repaired or not."""
        return self._in(TunnelState.DOWN) + self._in(TunnelState.PENDING, was_down=True)

    def _in(self, state: TunnelState, *, was_down: bool = False) -> int:
        if self.books is None:
            return 0
        return len([t for t in self.books.tunnels.values()
                    if t.state is state and (t.was_down or not was_down)])

    @property
    def shunts(self) -> int:
        return 0 if self.books is None else len(self.books.shunts)

    @property
    def adopted(self) -> int:
        """Conns of ours kept without a trustworthy state file (Rule 8)."""
        return 0 if self.books is None else len(self.books.adopted)


@dataclass(frozen=True, slots=True)
class Failure:
    until: float
    error: ProvisioningError


class Books:
    """What the Provisioner holds. `tunnels`, `shunts`, `adopted` and `pinned` are what the
    state file records: each change marks its entry there (a tunnel's lease is marked by
    `touch`, it being a field of a value)."""

    __slots__ = (
        "_state",
        "adopted",
        "deadlines",
        "failed",
        "inflight",
        "pinned",
        "shunts",
        "tunnels",
    )

    def __init__(self, state: StateFile | None) -> None:
        self._state = state
        self.deadlines = Deadlines()
        self.tunnels: Marked[Address, Tunnel] = Marked(self.touch)
        self.shunts: Marked[Address, float] = Marked(self._shunt_changed)
        self.adopted: Marked[str, float] = Marked(self._adopted_changed)
        self.pinned: MarkedSet[Address] = MarkedSet(self.touch)
        self.failed: dict[Address, Failure] = {}
        self.inflight: dict[Address, tuple[TunnelSpec, asyncio.Task[float]]] = {}

    def touch(self, dest: Address) -> None:
        """The tunnel to `dest` changed (added, gone, lease set, pin): record it, and its
        lease end for `expire`."""
        t = self.tunnels.get(dest)
        if t is not None:
            self.deadlines.push(t.expires_at, Kind.TUNNEL, dest)
        if self._state is not None:
            self._state.mark("tunnels", str(dest))

    def _shunt_changed(self, dest: Address) -> None:
        until = self.shunts.get(dest)
        if until is not None:
            self.deadlines.push(until, Kind.SHUNT, dest)
        if self._state is not None:
            self._state.mark("shunts", str(dest))

    def _adopted_changed(self, name: str) -> None:
        until = self.adopted.get(name)
        if until is not None:
            self.deadlines.push(until, Kind.ADOPTED, name)
        if self._state is not None:
            self._state.mark("adopted", name)

    def holds(self, section: str, key: str) -> bool:
        """Whether the books have the state file's entry `key` of `section`."""
        if section == "adopted":
            return key in self.adopted
        dest = ipaddress.ip_address(key)
        if section == "shunts":
            return dest in self.shunts
        t = self.tunnels.get(dest)
        return t is not None and t.state is not TunnelState.PENDING

    def record(self, section: str, key: str) -> Record:
        """What the state file writes for one entry (on the loop: values only, Rule 5)."""
        if section == "adopted":
            until = self.adopted.get(key)
            return None if until is None else functools.partial(
                statedoc.adopted_entry, key, until)
        dest = ipaddress.ip_address(key)
        if section == "shunts":
            until = self.shunts.get(dest)
            return None if until is None else functools.partial(
                statedoc.shunt_entry, dest, until)
        t = self.tunnels.get(dest)
        if t is None or t.state is TunnelState.PENDING:  # DOWN ones are still wanted
            return None
        t.saved_expires_at = t.expires_at  # what this write (and `_extend`) goes by
        return functools.partial(statedoc.tunnel_entry, t.spec, t.expires_at, dest in self.pinned)


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `reconcile` starts from; `trusted` False: the state file was corrupt (Rule 8)."""

    tunnels: list[tuple[TunnelSpec, float]]
    shunts: dict[Address, float]
    adopted: dict[str, float]
    trusted: bool = True


class ProvisionerBooks:
    """The books and their helpers; resolver/provision.py's Provisioner is built on it."""

    def __init__(self, backend: ProvisioningBackend, config: ProvisionConfig | None = None, *,
                 must_drop: Callable[[TunnelSpec], bool] | None = None) -> None:
        """`must_drop(spec)`: whether the policy makes the destination private, for tunnels
        not (yet) ensured with shunt=True since start-up (restored from the state file)."""
        self.backend = backend
        self.config = config or ProvisionConfig()
        self.counters = Counters()
        self.must_drop = must_drop
        # Called (synchronously, on the loop) when tunnels are lost: the answer caches must not
        # hand out again what was answered for them (Rule 6).
        self.on_lost: list[Callable[[], None]] = []
        self._epoch = 0  # IKE daemon connections lost so far (a setup spanning one fails)
        # Measured: 200 setups at once overran charon (IKE_SAs failing within ~1 s) once our
        # own loop stopped being the bottleneck. A bounded number in flight keeps each within
        # its timeout; the wait for a slot is bounded by queue_timeout (provisioning/setup.py).
        self._slots = asyncio.Semaphore(self.config.max_setups)
        path = self.config.state_file
        self._state = StateFile(path, LAYOUT, self._record) if path is not None else None
        self._b = Books(self._state)
        self.counters.books = self._b
        self.ike_ready = True  # False: the IKE daemon was unreachable at start-up (Rule 8)
        self._pending: Loaded | None = None  # loaded, not reconciled yet
        self._reconciled = False
        self._reconciling = asyncio.Lock()

    def lease_left(self, destination: Address, now: float) -> float | None:
        """Seconds until the lease of the tunnel to `destination` ends (None: no tunnel)."""
        t = self._b.tunnels.get(destination)
        if t is None or t.state is not TunnelState.INSTALLED:
            return None
        return max(0.0, t.expires_at - now)

    def tunnels(self) -> dict[Address, TunnelSpec]:
        """Tunnels charon holds, by destination (for the control socket: `autosp status` and
        `list`). Not just what we set up: the watch takes out what charon lost (Rule 6)."""
        return {d: t.spec for d, t in self._b.tunnels.items() if t.state is TunnelState.INSTALLED}

    def shunted(self) -> frozenset[Address]:
        return frozenset(self._b.shunts)

    async def _install_shunts(self, destinations: tuple[Address, ...] | list[Address],
                              now: float) -> bool:
        """`shunt` without waiting for the state file; True if a shunt was added."""
        changed = False
        for dest in destinations:
            t = self._b.tunnels.get(dest)
            if t is not None and t.state is TunnelState.INSTALLED:
                continue
            if dest not in self._b.shunts:
                await self.backend.apply(InstallShunt(dest))
                changed = True
            self._b.shunts[dest] = max(self._b.shunts.get(dest, 0.0), now + self.config.lease)
        if changed:
            self._save()
        return changed

    async def _shunt_now(self, dests: list[Address], now: float) -> list[Address]:
        """Shunt `dests` at once, all in one batch (the XFRM backend sends concurrent intents
        together), even if their tunnels still count as up; a failure is logged loudly: this
        is the one thing that must work. Returns the destinations newly shunted."""
        new = [d for d in dests if d not in self._b.shunts]
        results = await asyncio.gather(*(self.backend.apply(InstallShunt(d)) for d in new),
                                       return_exceptions=True)
        done = []
        for dest, res in zip(new, results, strict=True):
            if isinstance(res, ProvisioningError):
                log.error("drop shunt for %s failed: %s", dest, res)
            elif isinstance(res, BaseException):
                raise res
            else:
                done.append(dest)
        for dest in dests:
            if dest in done or dest in self._b.shunts:
                self._b.shunts[dest] = max(self._b.shunts.get(dest, 0.0), now + self.config.lease)
        return done

    def _private(self, t: Tunnel) -> bool:
        return t.private or self._must_drop(t.spec)

    def _must_drop(self, spec: TunnelSpec) -> bool:
        return self.must_drop is not None and self.must_drop(spec)

    def _forget(self, dest: Address, _task: asyncio.Task[float]) -> None:
        self._b.inflight.pop(dest, None)

    def _extend(self, t: Tunnel, now: float) -> float:
        t.expires_at = max(t.expires_at, now + self.config.lease)
        if t.expires_at - t.saved_expires_at > self.config.lease / 4:
            self._b.touch(t.spec.destination)
            self._save()  # a lease moved far enough that a restart should know
        return t.expires_at

    async def _quietly(self, intent: Intent) -> None:
        """Apply a cleanup intent; a failure is logged (the next reconcile retries it)."""
        try:
            await self.backend.apply(intent)
        except ProvisioningError as exc:
            log.warning("%s failed: %s", type(intent).__name__, exc)

    def _save(self) -> None:
        """The books changed: have them written soon, without waiting."""
        if self._state is not None:
            self._state.changed()

    async def _persist(self) -> None:
        """Return once a write that includes the books as they are now is on disk.

        Raises:
            StateWriteFailed: the state file cannot be written (the answer becomes SERVFAIL
                rather than an answer a restart would forget).
        """
        if self._state is not None:
            await self._state.persist()

    async def _persist_quietly(self) -> None:
        """`_persist` for changes no answer depends on: a failed write is logged (by the state
        file; it is retried with the next change)."""
        with contextlib.suppress(StateWriteFailed):
            await self._persist()

    def _record(self, section: str, key: str) -> Record:
        return self._b.record(section, key)
