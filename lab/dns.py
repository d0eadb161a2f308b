"""The lab's DNS: zone keys, zone files, signing, named and Unbound configuration.

Theory of operation: at `up`, zones are rendered from the templates in zones/ with the records
of lab/topology.py, then signed leaves first, because each parent carries its children's DS:

    broken zones (dnssec-signzone, then broken on purpose)   example.test (named signs it)
                \\                                            /
                 test. (NSEC3, no salt, 0 iterations) --- DS ---
                                 |
                          root "." (NSEC)  --- DS ---> Unbound's trust anchor

Zone keys and the TSIG key are cached under the state directory's keys/ (generated with
dnssec-keygen / tsig-keygen the first time), so the root DS stays the same across runs. The
example.test CSK is generated ahead of time with `dnssec-keygen -k lab`, so its DS is known
before named starts; named copies are made per run because named rewrites key state files.
"""

from __future__ import annotations

import datetime
import re
import shutil
import string
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lab.keys import PublicKey, ipseckey_rdata_text
from lab.net import LabError, run
from lab.topology import (
    DEFAULT_TTL,
    HOSTS,
    NEGATIVE_TTL,
    TSIG_KEY_NAME,
    UNBOUND,
    ZONES,
    AddressRecords,
    IpseckeyRecord,
    Signing,
    TextRecord,
    Zone,
)

ZONES_DIR = Path(__file__).resolve().parent.parent / "zones"
ALGORITHM = "ECDSAP256SHA256"  # DNSSEC algorithm 13: small and fast to sign and validate
POLICY_NAME = "lab"
POLICY = f"""dnssec-policy "{POLICY_NAME}" {{
    keys {{ csk lifetime unlimited algorithm ecdsap256sha256; }};
    dnskey-ttl {DEFAULT_TTL};
    max-zone-ttl 3600;
    zone-propagation-delay 1;
    parent-ds-ttl {DEFAULT_TTL};
    parent-propagation-delay 1;
    publish-safety 1;
    retire-safety 1;
    signatures-refresh 5d;
    signatures-validity 14d;
    signatures-validity-dnskey 14d;
}};
"""


@dataclass(frozen=True, slots=True)
class ZoneKeys:
    """Key file bases (path without .key/.private) of one zone."""

    ksk: Path
    zsk: Path | None  # None for a CSK (example.test)


def _key_flags(keyfile: Path) -> int:
    for line in keyfile.read_text().splitlines():
        if line.startswith(";"):
            continue
        m = re.search(r"\bDNSKEY\s+(\d+)\s", line)
        if m:
            return int(m.group(1))
    raise LabError(f"{keyfile}: no DNSKEY record")


def _keygen(argv: list[str]) -> None:
    run(["dnssec-keygen", "-q", *argv])


def zone_keys(cache: Path, zone: Zone) -> ZoneKeys | None:
    """The zone's keys, generated into `cache` the first time; None for unsigned zones."""
    if zone.signing is Signing.UNSIGNED:
        return None
    kdir = cache / "dnssec" / zone.file_stem
    keys = _find_keys(kdir)
    want_csk = zone.signing is Signing.POLICY
    if keys is None or (keys.zsk is None) != want_csk:
        shutil.rmtree(kdir, ignore_errors=True)
        kdir.mkdir(parents=True)
        if want_csk:
            policy = kdir.parent / "policy.conf"
            policy.write_text(POLICY)
            _keygen(["-k", POLICY_NAME, "-l", str(policy), "-K", str(kdir), zone.name])
        else:
            _keygen(["-a", ALGORITHM, "-f", "KSK", "-K", str(kdir), zone.name])
            _keygen(["-a", ALGORITHM, "-K", str(kdir), zone.name])
        keys = _find_keys(kdir)
        if keys is None:
            raise LabError(f"dnssec-keygen left no usable keys in {kdir}")
    return keys


def _find_keys(kdir: Path) -> ZoneKeys | None:
    files = sorted(kdir.glob("K*.key")) if kdir.is_dir() else []
    ksks = [f for f in files if _key_flags(f) & 1]
    zsks = [f for f in files if not _key_flags(f) & 1]
    if len(ksks) != 1 or len(zsks) > 1:
        return None
    if not all(f.with_suffix(".private").exists() for f in files):
        return None
    base = ksks[0].with_suffix("")
    return ZoneKeys(base, zsks[0].with_suffix("") if zsks else None)


def dummy_key(cache: Path, zone: Zone) -> Path:
    """A key for `zone` that the zone never uses: its DS is the "wrong DS" in the parent."""
    kdir = cache / "dnssec" / (zone.file_stem + "-dummy")
    files = sorted(kdir.glob("K*.key")) if kdir.is_dir() else []
    if len(files) != 1:
        shutil.rmtree(kdir, ignore_errors=True)
        kdir.mkdir(parents=True)
        _keygen(["-a", ALGORITHM, "-f", "KSK", "-K", str(kdir), zone.name])
        files = sorted(kdir.glob("K*.key"))
    return files[0].with_suffix("")


def tsig_key(cache: Path) -> Path:
    """The TSIG key file for example.test updates (tsig-keygen format), created once."""
    path = cache / "ddns.key"
    if not path.exists():
        text = run(["tsig-keygen", "-a", "hmac-sha256", TSIG_KEY_NAME])
        path.write_text(text)
        path.chmod(0o600)
    return path


def ds_of(keybase: Path) -> str:
    """The DS record (SHA-256) of a key, as one zone-file line."""
    return run(["dnssec-dsfromkey", "-2", str(keybase) + ".key"]).strip()


def dnskey_lines(keys: ZoneKeys) -> str:
    """The DNSKEY records of a zone's keys, for inclusion before dnssec-signzone."""
    out = []
    for base in (keys.ksk, keys.zsk):
        if base is None:
            continue
        text = Path(str(base) + ".key").read_text()
        out += [line for line in text.splitlines() if line and not line.startswith(";")]
    return "\n".join(out)


def _abs(owner: str, zone: Zone) -> str:
    if owner.endswith("."):
        return owner
    return f"{owner}.{zone.name}" if zone.name != "." else f"{owner}."


def render_records(zone: Zone, pubkeys: dict[str, PublicKey]) -> str:
    """The zone's own records (addresses, IPSECKEYs, other text) as zone-file lines."""
    lines = []
    for rec in zone.records:
        if isinstance(rec, AddressRecords):
            h = HOSTS[rec.host]
            lines.append(f"{_abs(rec.owner, zone)} IN A {h.v4}")
            lines.append(f"{_abs(rec.owner, zone)} IN AAAA {h.v6}")
        elif isinstance(rec, IpseckeyRecord):
            rdata = ipseckey_rdata_text(pubkeys[rec.key_host], rec.gateway, rec.precedence)
            lines.append(f"{_abs(rec.owner, zone)} IN IPSECKEY {rdata}")
        elif isinstance(rec, TextRecord):
            lines.append(f"{_abs(rec.owner, zone)} {rec.text}")
    for extra in zone.extra_ns:  # the apex NS RRset lists them too, with in-zone addresses
        lines += [f"{zone.name} IN NS {extra.name}", f"{extra.name} IN A {extra.v4}",
                  f"{extra.name} IN AAAA {extra.v6}"]
    return "\n".join(lines)


def render_delegations(zone: Zone, ds: dict[str, str]) -> str:
    """NS, glue and DS records for the zone's children."""
    lines = []
    for child in ZONES.values():
        if child.parent != zone.name:
            continue
        lines.append(f"{child.name} IN NS {child.ns_name}")
        if child.ns_name.endswith("." + child.name):  # in-bailiwick: glue needed
            h = HOSTS[child.server]
            lines += [f"{child.ns_name} IN A {h.v4}", f"{child.ns_name} IN AAAA {h.v6}"]
        for extra in child.extra_ns:
            lines += [f"{child.name} IN NS {extra.name}", f"{extra.name} IN A {extra.v4}",
                      f"{extra.name} IN AAAA {extra.v6}"]
        if child.name in ds:
            lines.append(ds[child.name])
    return "\n".join(lines)


def render_zone(zone: Zone, serial: int, pubkeys: dict[str, PublicKey], ds: dict[str, str],
                dnskeys: str) -> str:
    """Fill the zone's template in zones/."""
    tmpl = string.Template((ZONES_DIR / zone.template).read_text())
    return tmpl.substitute(
        ttl=DEFAULT_TTL,
        negative_ttl=NEGATIVE_TTL,
        serial=serial,
        ns_name=zone.ns_name,
        records=render_records(zone, pubkeys),
        delegations=render_delegations(zone, ds),
        dnskeys=dnskeys,
    )


def _stamp(dt: datetime.datetime) -> str:
    return dt.strftime("%Y%m%d%H%M%S")


def sign_argv(zone: Zone, keys: ZoneKeys, unsigned: Path, signed: Path,
              now: datetime.datetime) -> list[str]:
    """The dnssec-signzone command for a zone signed offline."""
    # -d: dsset- files go beside the zone, not into the current directory.
    argv = ["dnssec-signzone", "-q", "-O", "full", "-d", str(signed.parent), "-o", zone.name,
            "-f", str(signed)]
    if zone.signing is Signing.NSEC3:
        argv += ["-3", "-", "-H", "0"]
    if zone.signing is Signing.EXPIRED:
        start = now - datetime.timedelta(days=30)
        end = now - datetime.timedelta(days=1)
        # -P: the post-sign verification would (rightly) reject expired signatures.
        argv += ["-P", "-s", _stamp(start), "-e", _stamp(end)]
    argv += ["-k", str(keys.ksk), str(unsigned)]
    if keys.zsk is not None:
        argv.append(str(keys.zsk))
    return argv


def corrupt_rrsig(signed: Path, owner: str, covered: str) -> None:
    """Break the signature over (owner, covered) in a `-O full` signed zone file.

    One base64 character in the middle of the signature changes: the RRSIG still parses, its
    key tag and times are right, and it no longer verifies.
    """
    lines = signed.read_text().splitlines()
    hits = 0
    for i, line in enumerate(lines):
        tok = line.split()
        if len(tok) > 5 and tok[0] == owner and tok[3] == "RRSIG" and tok[4] == covered:
            sig = tok[-1]
            mid = len(sig) // 2
            repl = "B" if sig[mid] == "A" else "A"
            tok[-1] = sig[:mid] + repl + sig[mid + 1:]
            lines[i] = " ".join(tok)
            hits += 1
    if hits == 0:
        raise LabError(f"{signed}: no RRSIG {covered} at {owner} to corrupt")
    signed.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True, slots=True)
class DnsBuild:
    """What building the DNS produced: per-server named.conf files and the root anchor."""

    named_confs: dict[str, Path]  # server host -> named.conf
    root_ds: str
    unbound_conf: Path


def build(cache: Path, run_dir: Path, pubkeys: dict[str, PublicKey], serial: int,
          now: datetime.datetime) -> DnsBuild:
    """Render and sign every zone, and write named and Unbound configuration under run_dir."""
    tsig = tsig_key(cache)
    keys = {z.name: zone_keys(cache, z) for z in ZONES.values()}
    zdir = run_dir / "zones"
    zdir.mkdir(parents=True, exist_ok=True)
    ds: dict[str, str] = {}
    zone_files: dict[str, Path] = {}
    # Leaves first: a zone is signed once all its children's DS are known.
    order = sorted(ZONES.values(), key=lambda z: -_depth(z))
    for zone in order:
        zkeys = keys[zone.name]
        if zone.signing is Signing.POLICY:
            assert zkeys is not None
            text = render_zone(zone, serial, pubkeys, ds, "")
            sdir = run_dir / zone.server
            kdir = sdir / "keys"
            kdir.mkdir(parents=True, exist_ok=True)
            for f in zkeys.ksk.parent.iterdir():
                shutil.copy2(f, kdir / f.name)
            path = sdir / f"{zone.file_stem}.zone"
            path.write_text(text)
            zone_files[zone.name] = path
            ds[zone.name] = ds_of(zkeys.ksk)
            continue
        if zkeys is None:
            path = zdir / f"{zone.file_stem}.zone"
            path.write_text(render_zone(zone, serial, pubkeys, ds, ""))
            zone_files[zone.name] = path
            continue
        unsigned = zdir / f"{zone.file_stem}.zone"
        unsigned.write_text(render_zone(zone, serial, pubkeys, ds, dnskey_lines(zkeys)))
        signed = zdir / f"{zone.file_stem}.signed"
        run(sign_argv(zone, zkeys, unsigned, signed, now), timeout=60)
        if zone.signing is Signing.BAD_SIG:
            assert zone.corrupt is not None
            corrupt_rrsig(signed, *zone.corrupt)
        zone_files[zone.name] = signed
        if zone.signing is Signing.WRONG_DS:
            ds[zone.name] = ds_of(dummy_key(cache, zone))
        else:
            ds[zone.name] = ds_of(zkeys.ksk)
    confs = {}
    for server in sorted({z.server for z in ZONES.values()}):
        confs[server] = write_named_conf(run_dir / server, server, zone_files, tsig)
    return DnsBuild(confs, ds["."], write_unbound_conf(run_dir / "unbound", ds["."]))


def _depth(zone: Zone) -> int:
    return 0 if zone.name == "." else zone.name.count(".")


def write_named_conf(sdir: Path, server: str, zone_files: dict[str, Path], tsig: Path) -> Path:
    """named.conf for one authoritative server address.

    Each named has an address of its own (two on one address:53 both start and split the
    queries), no pid, lock or session files (several share a filesystem), and `recursion no;
    dnssec-validation no;` (else an authoritative-only named still tries the real root).
    """
    sdir.mkdir(parents=True, exist_ok=True)
    h = HOSTS[server]
    zones = []
    for z in ZONES.values():
        if z.server != server:
            continue
        name = z.name.rstrip(".") or "."
        if z.signing is Signing.POLICY:
            zones.append(f"""zone "{name}" {{
    type primary;
    file "{zone_files[z.name]}";
    dnssec-policy "{POLICY_NAME}";
    inline-signing yes;
    key-directory "{sdir / 'keys'}";
    allow-update {{ key "{TSIG_KEY_NAME}"; }};
}};""")
        else:
            zones.append(f'zone "{name}" {{ type primary; file "{zone_files[z.name]}"; }};')
    conf = f"""// named for {server} ({h.v4}); written by lab/dns.py at `lab up`.
include "{tsig}";
{POLICY}
options {{
    directory "{sdir}";
    listen-on {{ {h.v4}; }};
    listen-on-v6 {{ {h.v6}; }};
    pid-file none;
    lock-file none;
    session-keyfile none;
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer {{ none; }};
    minimal-responses no;
    querylog yes;  // one line per query in named.log: tests count what resolvers ask
}};
controls {{ }};
{chr(10).join(zones)}
"""
    path = sdir / "named.conf"
    path.write_text(conf)
    return path


def write_unbound_conf(udir: Path, root_ds: str) -> Path:
    """Unbound: validating recursive, hints and trust anchor at the lab root."""
    udir.mkdir(parents=True, exist_ok=True)
    root = HOSTS[ZONES["."].server]
    ns = ZONES["."].ns_name
    (udir / "root.hints").write_text(
        f".  3600000 IN NS {ns}\n{ns} 3600000 IN A {root.v4}\n{ns} 3600000 IN AAAA {root.v6}\n"
    )
    (udir / "root.ds").write_text(root_ds + "\n")
    conf = f"""# Unbound for the lab ({UNBOUND.v4}); written by lab/dns.py at `lab up`.
server:
    verbosity: 1
    use-syslog: no
    logfile: ""
    log-servfail: yes
    username: ""
    chroot: ""
    directory: "{udir}"
    pidfile: ""
    do-daemonize: no
    num-threads: 1
    so-reuseport: no
    interface: {UNBOUND.v4}
    interface: {UNBOUND.v6}
    outgoing-interface: {UNBOUND.v4}
    outgoing-interface: {UNBOUND.v6}
    access-control: 198.51.100.0/24 allow
    access-control: 203.0.113.0/24 allow
    access-control: 2001:db8::/32 allow
    root-hints: "{udir / 'root.hints'}"
    trust-anchor-file: "{udir / 'root.ds'}"
    # Without this, Unbound answers NXDOMAIN for everything under test. (RFC 6761 default).
    local-zone: "test." nodefault
    module-config: "validator iterator"
    cache-max-negative-ttl: 1
    cache-max-ttl: 60
    aggressive-nsec: no
    prefetch: no
    qname-minimisation: no
    val-log-level: 2
    ede: yes
remote-control:
    control-enable: yes
    control-interface: "{udir / 'unbound.ctl'}"
    control-use-cert: no
"""
    path = udir / "unbound.conf"
    path.write_text(conf)
    return path


def named_argv(conf: Path) -> list[str]:
    """named in the foreground, logging to stderr, one worker thread (the machine is small)."""
    return ["/usr/sbin/named", "-g", "-n", "1", "-c", str(conf)]


def unbound_argv(conf: Path) -> list[str]:
    """unbound in the foreground."""
    return ["/usr/sbin/unbound", "-d", "-c", str(conf)]


def check_unbound_conf(conf: Path) -> None:
    """unbound-checkconf, so a config mistake fails with its message instead of a timeout."""
    proc = subprocess.run(["unbound-checkconf", str(conf)], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise LabError(f"unbound-checkconf: {proc.stdout}{proc.stderr}")
