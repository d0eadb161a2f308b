"""autosp keygen + publish in the lab: run inside bob's namespace against the real BIND primary
of example.test (TSIG, dnssec-policy signing), checked through the lab's validating Unbound.

Each test uses a name of its own (roamer-*, roller-*, ...) so that the lab's hosts keep their
records for the other integration tests.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest

from lab import Lab
from lab.topology import HOSTS, ZONES
from tests.helpers import publish

pytestmark = pytest.mark.integration

PRIMARY = HOSTS[ZONES["example.test."].server].v4


def records(lab: Lab, server: str, name: str, rdtype: str) -> tuple[bool, list[str]]:
    """(AD bit, answer rdatas of that type) from `server`, asked by dig from inside alice."""
    d = lab.dig("alice", name, rdtype, server=server)
    return d.ad, d.rdatas(rdtype)


def key_b64(rdatas: list[str]) -> set[str]:
    """The public keys (base64, unsplit) of IPSECKEY rdatas in dig's text form."""
    return {"".join(r.split()[4:]) for r in rdatas}


def keygen(lab: Lab, tmp_path: Path, stem: str) -> tuple[Path, str]:
    out = tmp_path / f"{stem}.pem"
    r = lab.autosp("bob", "keygen", "--out", str(out), "--name", f"{stem}.example.test")
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    record = r.stdout.strip()
    return out, "".join(record.split()[8:])


def test_keygen_publish_secure_through_unbound(lab: Lab, tmp_path: Path) -> None:
    key, b64 = keygen(lab, tmp_path, "roamer")
    r = publish(lab, "roamer.example.test", "--key", str(key), "--ttl", "30")
    assert r.returncode == 0, r.stderr
    assert "published, secure" in r.stdout, r.stdout
    lab.flush()
    ad, rdatas = records(lab, lab.unbound_addr, "roamer.example.test", "IPSECKEY")
    assert ad and key_b64(rdatas) == {b64}
    ad, addrs = records(lab, lab.unbound_addr, "roamer.example.test", "A")
    assert ad and addrs == [lab.addr("bob")]  # --address auto, from inside bob
    ad, addrs6 = records(lab, lab.unbound_addr, "roamer.example.test", "AAAA")
    assert ad and addrs6 == [lab.addr("bob", 6)]
    again = publish(lab, "roamer.example.test", "--key", str(key), "--ttl", "30")
    assert again.returncode == 0 and "nothing to change" in again.stdout


def _wrong_keyfile(lab: Lab, tmp_path: Path, name: str | None = None) -> Path:
    text = lab.tsig_keyfile.read_text()
    text = re.sub(r'secret "[^"]*"', f'secret "{base64.b64encode(os.urandom(32)).decode()}"',
                  text)
    if name:
        text = re.sub(r'key "[^"]*"', f'key "{name}"', text)
    f = tmp_path / f"wrong-{name or 'secret'}.key"
    f.write_text(text)
    return f


@pytest.mark.parametrize(("keyname", "reason"), [(None, "BADSIG"), ("nobody-key", "BADKEY")])
def test_wrong_tsig_key_is_refused_and_zone_unchanged(lab: Lab, tmp_path: Path,
                                                      keyname: str | None, reason: str) -> None:
    stem = f"victim-{reason.lower()}"  # a name per case: no rollover from an earlier case
    name = f"{stem}.example.test"
    key, _ = keygen(lab, tmp_path, stem)
    first = publish(lab, name, "--key", str(key), "--address", "198.51.100.77")
    assert first.returncode == 0, first.stderr
    before = [records(lab, PRIMARY, name, t)[1] for t in ("A", "IPSECKEY")]
    r = publish(lab, name, "--address", "198.51.100.78",
                keyfile=_wrong_keyfile(lab, tmp_path, keyname))
    assert r.returncode == 1
    assert reason in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    after = [records(lab, PRIMARY, name, t)[1] for t in ("A", "IPSECKEY")]
    assert after == before and before[0] == ["198.51.100.77"]


def test_nsupdate_script_works_with_real_nsupdate(lab: Lab, tmp_path: Path) -> None:
    key, b64 = keygen(lab, tmp_path, "scripted")
    r = publish(lab, "scripted.example.test", "--key", str(key), "--address", "198.51.100.66",
                "2001:db8:100::66", "--nsupdate")
    assert r.returncode == 0, r.stderr
    assert f"server {PRIMARY} 53" in r.stdout and "send" in r.stdout
    assert records(lab, PRIMARY, "scripted.example.test", "A")[1] == []  # printing sent nothing
    ns = lab.exec("bob", ["nsupdate", "-v", "-t", "5", "-k", str(lab.tsig_keyfile)],
                  input=r.stdout, check=False)
    assert ns.returncode == 0, ns.stderr
    lab.flush()
    assert records(lab, lab.unbound_addr, "scripted.example.test", "A") == (True, ["198.51.100.66"])
    ad, rdatas = records(lab, lab.unbound_addr, "scripted.example.test", "IPSECKEY")
    assert ad and key_b64(rdatas) == {b64}
    # --run-nsupdate goes through the same path with the real binary.
    run = publish(lab, "scripted.example.test", "--key", str(key), "--address", "198.51.100.67",
                  "--run-nsupdate", "--no-check")
    assert run.returncode == 0, run.stderr
    assert records(lab, PRIMARY, "scripted.example.test", "A")[1] == ["198.51.100.67"]


def test_key_rollover_leaves_only_the_new_key(lab: Lab, tmp_path: Path) -> None:
    old, old_b64 = keygen(lab, tmp_path, "roller-old")
    new, new_b64 = keygen(lab, tmp_path, "roller-new")
    assert publish(lab, "roller.example.test", "--key", str(old), "--ttl", "2").returncode == 0
    r = publish(lab, "roller.example.test", "--key", str(new), "--ttl", "2")
    assert r.returncode == 0, r.stderr
    assert "rollover phase 1" in r.stderr and "rollover phase 2" in r.stderr
    assert "waiting 4 s" in r.stderr  # old TTL 2 s + 2 s margin
    assert "published, secure" in r.stdout, r.stdout
    lab.flush()
    ad, rdatas = records(lab, lab.unbound_addr, "roller.example.test", "IPSECKEY")
    assert ad and key_b64(rdatas) == {new_b64} and old_b64 != new_b64


def test_rollover_no_wait_publishes_both_then_finish(lab: Lab, tmp_path: Path) -> None:
    old, old_b64 = keygen(lab, tmp_path, "split-old")
    new, new_b64 = keygen(lab, tmp_path, "split-new")
    assert publish(lab, "split.example.test", "--key", str(old)).returncode == 0
    # --no-check: the lab Unbound may still cache the old set; the primary is checked instead.
    r = publish(lab, "split.example.test", "--key", str(new), "--no-wait", "--no-check")
    assert r.returncode == 0 and "--finish-rollover" in r.stdout
    assert key_b64(records(lab, PRIMARY, "split.example.test", "IPSECKEY")[1]) == {old_b64, new_b64}
    done = publish(lab, "split.example.test", "--key", str(new), "--finish-rollover",
                   "--no-check")
    assert done.returncode == 0, done.stderr
    assert key_b64(records(lab, PRIMARY, "split.example.test", "IPSECKEY")[1]) == {new_b64}


def test_require_secure_right_after_a_move_is_not_fooled_by_the_resolvers_cache(
        lab: Lab, tmp_path: Path) -> None:
    """Issue 14: a DHCP hook moving the host runs `publish --require-secure`; Unbound still
    caches the old address (TTL 300) and must not make it fail: the check reads the new
    records from the primary and validates their signatures with the zone's secure keys."""
    key, _ = keygen(lab, tmp_path, "mover")
    first = publish(lab, "mover.example.test", "--key", str(key), "--address", "198.51.100.61",
                    "--ttl", "300", "--require-secure")
    assert first.returncode == 0, first.stdout + first.stderr
    ad, addrs = records(lab, lab.unbound_addr, "mover.example.test", "A")  # primes the cache
    assert ad and addrs == ["198.51.100.61"]
    moved = publish(lab, "mover.example.test", "--key", str(key), "--address", "198.51.100.62",
                    "--ttl", "300", "--require-secure")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "published, secure (signed at the primary" in moved.stdout
    cached = records(lab, lab.unbound_addr, "mover.example.test", "A")[1]
    assert cached == ["198.51.100.61"]  # Unbound still has the old one
    # --ttl alone is a change, applied to every RRset (it used to say "nothing to change").
    ttl = publish(lab, "mover.example.test", "--key", str(key), "--address", "198.51.100.62",
                  "--ttl", "120", "--require-secure")
    assert ttl.returncode == 0 and "nothing to change" not in ttl.stdout, ttl.stdout
    for rdtype in ("A", "IPSECKEY"):
        out = lab.exec("alice", ["dig", "+noall", "+answer", f"@{PRIMARY}",
                                 "mover.example.test", rdtype]).stdout
        assert {line.split()[1] for line in out.splitlines() if line} == {"120"}, out
