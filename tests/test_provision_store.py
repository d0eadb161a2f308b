"""The Provisioner's books and its state file agree, whatever happens
(resolver/provisioning/books.py
marks entries, resolver/statefile.py writes only those).

Writing only what changed is only as good as the marks: a change that is not marked is a
tunnel a restart forgets. So random sequences of lookups, refusals, failures, pins, releases,
lease ends and restarts run against a FakeBackend with the journal's thresholds set low (every
path of the store is taken), and after each step that waits for the disk, what a fresh load of
the file reads is exactly what the books hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import dns.name
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resolver.statefile as statefile_module
from resolver.errors import ProvisioningError, TunnelRejected
from resolver.ipseckey import IpsecKey
from resolver.provision import Provisioner
from resolver.provisioning.books import LAYOUT, TunnelState
from resolver.statefile import StateFile
from resolver.tunnels.config import ProvisionConfig
from resolver.tunnels.intents import tunnel_spec
from resolver.tunnels.statedoc import parse
from tests.fakes import FakeBackend

WHEN = 1_800_000_000.0
DESTS = [IPv4Address(f"198.51.100.{i}") for i in range(10, 18)]
KEYS = [IpsecKey.from_public_key(dns.name.from_text(f"h{i}.example.test."),
                                 ed25519.Ed25519PrivateKey.generate().public_key())
        for i in range(len(DESTS))]
SPECS = [tunnel_spec(k, d, None) for k, d in zip(KEYS, DESTS, strict=True)]

OP = st.one_of(
    st.tuples(st.just("ensure"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("fail"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("shunt"), st.integers(0, 7), st.just(False)),
    st.tuples(st.just("pin"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 7), st.just(False)),
    st.tuples(st.just("time"), st.integers(1, 400), st.just(False)),
    st.tuples(st.just("restart"), st.just(0), st.just(False)),
)


def on_disk(path: Path) -> dict[str, Any]:
    """The file as a restart reads it (journal applied)."""
    saved = StateFile(path, LAYOUT, lambda s, k: None).load(parse)
    if saved is None:
        return {"tunnels": {}, "shunts": {}, "adopted": {}}
    return {"tunnels": {s.destination: (s, until, s.destination in saved.pinned)
                        for s, until in saved.tunnels},
            "shunts": saved.shunts, "adopted": saved.adopted}


def in_books(p: Provisioner) -> dict[str, Any]:
    b = p._b
    return {"tunnels": {d: (t.spec, t.saved_expires_at, d in b.pinned)
                        for d, t in b.tunnels.items() if t.state is not TunnelState.PENDING},
            "shunts": dict(b.shunts.items()), "adopted": dict(b.adopted.items())}


async def run(path: Path, ops: list[tuple[str, int, bool]]) -> None:
    now = WHEN
    cfg = ProvisionConfig(state_file=path, lease=300, grace=30, failure_hold=0)
    fb = FakeBackend()
    p = Provisioner(fb, cfg)
    await p.reconcile(now)
    for op, i, flag in ops:
        if op == "ensure":
            fb.fail = None
            await p.ensure(SPECS[i], now, shunt=flag)
        elif op == "fail":
            fb.fail = TunnelRejected("no")  # (an installed tunnel is not asked again)
            with contextlib.suppress(ProvisioningError):
                await p.ensure(SPECS[i], now, shunt=flag)
            fb.fail = None
        elif op == "shunt":
            await p.shunt([DESTS[i]], now)
        elif op == "pin":
            p.pin(DESTS[i], flag)
        elif op == "release":
            await p.release(DESTS[i], now)
        elif op == "time":
            now += i
            await p.expire(now)
        else:  # a restart: what the backend holds stays, the books come from the file
            await p.close()
            held = set(fb.items)
            fb = FakeBackend()
            fb.items = held
            p = Provisioner(fb, cfg)
            await p.reconcile(now)
        await p._persist()
        assert on_disk(path) == in_books(p), (op, i, flag)
    await p.close()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OP, max_size=40))
def test_the_file_always_holds_what_the_books_hold(
        tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, bool]]) -> None:
    path = tmp_path_factory.mktemp("store") / "state.json"
    saved = (statefile_module.SMALL, statefile_module.JOURNAL_FLOOR)
    statefile_module.SMALL, statefile_module.JOURNAL_FLOOR = 2, 0
    try:
        asyncio.run(run(path, ops))
    finally:
        statefile_module.SMALL, statefile_module.JOURNAL_FLOOR = saved


def test_ten_thousand_tunnels_restore_from_a_journal(tmp_path: Path) -> None:
    """At scale: 10,000 tunnels recorded through the journal, a restart restores them all,
    and a change after that appends a line instead of rewriting the document."""
    path = tmp_path / "state.json"
    key = KEYS[0]
    specs = [tunnel_spec(key, IPv4Address(0x0A000000 + i), None) for i in range(10_000)]

    async def build() -> None:
        p = Provisioner(FakeBackend(), ProvisionConfig(state_file=path, max_setups=256))
        await p.reconcile(WHEN)
        await asyncio.gather(*(p.ensure(s, WHEN) for s in specs))
        await p.close()

    async def restart() -> None:
        fb = FakeBackend()
        fb.items = {*(await _installed(specs))}
        p = Provisioner(fb, ProvisionConfig(state_file=path, max_setups=256))
        await p.reconcile(WHEN + 1)
        assert len(p.tunnels()) == 10_000
        journal = p._state.journal if p._state is not None else None
        assert journal is not None
        size, logged = path.stat().st_size, journal.stat().st_size
        await p.release(specs[0].destination, WHEN + 2)
        assert path.stat().st_size == size  # not rewritten: one line appended
        assert 0 < journal.stat().st_size - logged < 200
        await p.close()

    asyncio.run(build())
    doc = json.loads(path.read_bytes())
    assert "journal" in doc
    asyncio.run(restart())


async def _installed(specs: list[Any]) -> list[Any]:
    from resolver.tunnels.intents import PolicyKey
    return [PolicyKey.tunnel(s.name) for s in specs]
