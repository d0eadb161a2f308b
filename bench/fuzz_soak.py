"""Fuzz and soak: malformed packets, abusive TCP clients and a flood against a running daemon.

Issue 10 ("Tests"): a script that replays the malformed-packet and flood runs and prints counts.
Everything is on loopback, bounded in count and in time; root is not needed.

  1. Signs `soak.test.` (dnssec-keygen/-signzone) and serves it with `named` on 127.0.0.1:5391;
     starts the daemon (`python -m resolver`, this tree) on 127.0.0.85:5385, forwarding to
     named, trust anchor = the zone's DS. The daemon runs with its default [server] limits.
  2. Hand-built bad packets (no header, QDCOUNT 0/2, compression loops, labels > 63, names >
     255, responses, every opcode, OPT versions, malformed cookies, meta qtypes, TSIG with an
     unknown key, trailing junk, ...), each with the outcome it must get (drop, or an rcode),
     over UDP and over TCP.
  3. Mutations of valid queries (byte flips, cuts, insertions, length fields), seeded, over
     UDP and TCP (TCP also one byte at a time for some).
  4. Abuse, all at once for --seconds: a UDP flood (cached and uncached names), 300
     slow-loris TCP connections (a byte a second, reconnecting when cut), 3 TCP clients that
     pipeline queries and never read; meanwhile a real client asks over TCP every 0.25 s.
     The daemon's RSS is sampled throughout.

Prints, per run: sent, answered by rcode, dropped (no reply), unexpected (a reply or a drop
other than the one required, or a reply whose ID or QR bit is wrong), and at the end the
crash count: the daemon must still be running, and its log must hold no traceback.

Usage: .venv/bin/python bench/fuzz_soak.py [--mutations 3000] [--seconds 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.edns
import dns.message
import dns.rcode
import dns.tsig

sys.path.insert(0, str(Path(__file__).resolve().parent))
# bench_resolver is a sibling script, not a package: import it by path.
from bench_resolver import need, process, run

AUTH = ("127.0.0.1", 5391)
OURS = ("127.0.0.85", 5385)
ZONE = "soak.test."
ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
DROP = -1  # expected outcome: no reply at all
ANY_RCODE = -2  # expected outcome: a reply, rcode not prescribed


# -- set-up: zone, named, the daemon -------------------------------------------------------------


def make_zone(work: Path) -> Path:
    keys = work / "keys"
    keys.mkdir()
    ksk = run([need("dnssec-keygen"), "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", "-f",
               "KSK", ZONE]).strip()
    zsk = run([need("dnssec-keygen"), "-q", "-K", str(keys), "-a", "ECDSAP256SHA256",
               ZONE]).strip()
    lines = [f"$TTL 3600\n@ IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 300\n",
             f"@ IN NS ns.{ZONE}\nns IN A {AUTH[0]}\nwww IN A 192.0.2.1\nwww IN AAAA 2001:db8::1\n",
             'www IN TXT "soak"\n', "*.wild IN A 192.0.2.3\n", "alias IN CNAME www\n"]
    lines += [f"n{i} IN A 192.0.2.{i % 250 + 1}\n" for i in range(200)]
    lines += [f"$INCLUDE {keys / ksk}.key\n$INCLUDE {keys / zsk}.key\n"]
    (work / "soak.zone").write_text("".join(lines))
    run([need("dnssec-signzone"), "-q", "-K", str(keys), "-d", str(work), "-o", ZONE, "-f",
         str(work / "soak.signed"), str(work / "soak.zone"), str(keys / ksk), str(keys / zsk)])
    anchor = work / "anchor.ds"
    anchor.write_text(run([need("dnssec-dsfromkey"), "-2", str(keys / f"{ksk}.key")]))
    return anchor


def named_argv(work: Path) -> list[str]:
    conf = work / "named.conf"
    conf.write_text(f"""
options {{ directory "{work}"; listen-on port {AUTH[1]} {{ {AUTH[0]}; }}; listen-on-v6 {{ none; }};
  recursion no; pid-file "{work}/named.pid"; dnssec-validation no; minimal-responses yes; }};
controls {{ }};
zone "{ZONE}" {{ type primary; file "{work}/soak.signed"; }};
""")
    return [need("named"), "-g", "-n", "1", "-c", str(conf)]


def daemon_argv(work: Path, anchor: Path) -> list[str]:
    conf = work / "resolver.toml"
    conf.write_text(f"""
[server]
listen = ["{OURS[0]}:{OURS[1]}"]
[upstream]
servers = ["{AUTH[0]}:{AUTH[1]}"]
timeout = 0.5
# named here serves soak.test. only: "auto" would probe it for the root's DNSKEY, see it
# refused and iterate from the real root instead (unreachable here).
mode = "forward"
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["{anchor}"]
[log]
level = "warning"
""")
    return [str(PYTHON), "-m", "resolver", "--config", str(conf)]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- one exchange -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts for one run."""

    name: str
    sent: int = 0
    rcodes: Counter[str] = field(default_factory=Counter)
    dropped: int = 0
    unexpected: list[str] = field(default_factory=list)

    def note(self, label: str, query: bytes, reply: bytes | None, expect: int) -> None:
        self.sent += 1
        if reply is None:
            self.dropped += 1
            if expect != DROP and len(self.unexpected) < 20:
                want = "a reply" if expect == ANY_RCODE else dns.rcode.to_text(expect)
                self.unexpected.append(f"{label}: dropped, expected {want}")
            return
        rcode = full_rcode(reply)
        self.rcodes[dns.rcode.to_text(rcode) if rcode >= 0 else "short"] += 1
        bad = len(reply) < 12 or not reply[2] & 0x80 or reply[:2] != query[:2]
        wrong = expect == DROP or (expect >= 0 and rcode != expect)
        if (bad or wrong) and len(self.unexpected) < 20:
            want = "drop" if expect == DROP else dns.rcode.to_text(expect)
            self.unexpected.append(f"{label}: got {dns.rcode.to_text(rcode)} "
                                   f"({len(reply)} bytes), expected {want}")

    def line(self) -> str:
        rc = " ".join(f"{k}={v}" for k, v in sorted(self.rcodes.items()))
        return (f"{self.name:<30} sent={self.sent:<6} answered={sum(self.rcodes.values()):<6} "
                f"dropped={self.dropped:<5} unexpected={len(self.unexpected):<3} [{rc}]")


def full_rcode(reply: bytes) -> int:
    """The reply's rcode, extended ones (BADVERS) included; -1 if it has no header."""
    try:
        return int(dns.message.from_wire(reply).rcode())
    except Exception:  # not parseable (it should be: it is our reply): the header's 4 bits
        return reply[3] & 0x0F if len(reply) >= 4 else -1


async def udp_exchange(wire: bytes, timeout: float) -> bytes | None:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, OURS)
        await loop.sock_sendall(s, wire)
        return await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)
    except (TimeoutError, ConnectionError):
        return None
    finally:
        s.close()


async def tcp_exchange(wire: bytes, timeout: float, bytewise: bool = False,
                       why: list[str] | None = None) -> bytes | None:
    """One query over a new TCP connection; None if no reply (the reason added to `why`)."""
    phase = "connect"
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*OURS)
            phase = "exchange"
            try:
                frame = len(wire).to_bytes(2, "big") + wire
                if bytewise:
                    for i in range(len(frame)):
                        writer.write(frame[i:i + 1])
                        await writer.drain()
                else:
                    writer.write(frame)
                n = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(n)
            finally:
                writer.close()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as e:
        if why is not None:
            why.append(f"{type(e).__name__} in {phase}")
        return None


# -- packets ---------------------------------------------------------------------------------

F, NI, RF, NE = dns.rcode.FORMERR, dns.rcode.NOTIMP, dns.rcode.REFUSED, dns.rcode.NOERROR


def query(name: str = f"www.{ZONE}", rdtype: int | str = "A", **kw: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def with_opt(rdata: bytes, version: int = 0, name: bytes = b"\x00") -> bytes:
    base = bytearray(query())
    struct.pack_into("!H", base, 10, 1)  # ARCOUNT 1
    return bytes(base) + name + struct.pack("!HHBBHH", 41, 1232, 0, version, 0x8000,
                                            len(rdata)) + rdata


def two_opts() -> bytes:
    one = with_opt(b"")
    opt = one[len(query()):]
    return one[:10] + b"\x00\x02" + one[12:] + opt


def cookie(n: int) -> bytes:
    return with_opt(struct.pack("!HH", 10, n) + b"c" * n)


def header(qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, qd, an, ns, ar)


def hand_built() -> list[tuple[str, bytes, int]]:
    """(label, packet, expected outcome) — the malformed-packet corpus."""
    q = query()
    cases: list[tuple[str, bytes, int]] = [
        ("empty", b"", DROP), ("1 byte", b"\x00", DROP), ("11 bytes", q[:11], DROP),
        ("header only, QDCOUNT 1", q[:12], F), ("QDCOUNT 0", header(qd=0), F),
        ("QDCOUNT 2", header(qd=2) + q[12:] + q[12:], F),
        ("QDCOUNT 65535", header(qd=65535) + q[12:], F),
        ("question cut in the name", q[:16], F), ("question without type", q[:-4], F),
        ("question without class", q[:-2], F),
        ("pointer loop", header() + b"\xc0\x0c\x00\x01\x00\x01", F),
        ("pointer forward", header() + b"\xc0\x20\x00\x01\x00\x01" + b"\x00" * 20, F),
        ("label 64", header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01", F),
        ("name 300 bytes", header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01", F),
        ("reserved label type 0x80", header() + b"\x80abc\x00\x00\x01\x00\x01", F),
        ("response (QR=1)", bytes([q[0], q[1], q[2] | 0x80]) + q[3:], DROP),
        ("TC set", bytes([q[0], q[1], q[2] | 0x02]) + q[3:], ANY_RCODE),
        ("ANCOUNT 1, no record", header(an=1) + q[12:], F),
        ("ARCOUNT 1, no record", header(ar=1) + q[12:], F),
        ("trailing junk", q + b"junk", F),
        ("OPT version 1", with_opt(b"", version=1), dns.rcode.BADVERS),
        ("OPT not at root", with_opt(b"", name=b"\x01a\x00"), F),
        ("two OPT", two_opts(), F),
        ("OPT option overflows", with_opt(struct.pack("!HH", 10, 40) + b"c" * 8), F),
        ("OPT rdata 3 bytes", with_opt(b"\x00\x0a\x00"), F),
        ("qtype 0", query(rdtype=0), F), ("qtype NXNAME 128", query(rdtype=128), F),
        ("qtype 200", query(rdtype=200), F), ("qtype OPT", query(rdtype=41), F),
        ("qtype TKEY", query(rdtype=249), F), ("qtype TSIG", query(rdtype=250), F),
        ("qtype MAILB", query(rdtype=253), F), ("qtype MAILA", query(rdtype=254), F),
        ("qtype AXFR", query(rdtype="AXFR"), RF), ("qtype IXFR", query(rdtype="IXFR"), RF),
        ("qtype ANY", query(rdtype="ANY"), NE), ("qtype RRSIG", query(rdtype="RRSIG"), NE),
        ("qclass CH", query(rdclass="CH"), RF), ("qclass 0", q[:-2] + b"\x00\x00", ANY_RCODE),
        ("qclass ANY", q[:-2] + b"\x00\xff", ANY_RCODE),
        ("name outside the zone", query("www.example.invalid."), ANY_RCODE),
        ("EDNS payload 0", query(use_edns=0, payload=0), ANY_RCODE),
        ("qname root", query(".", "NS"), ANY_RCODE),
        ("uppercase", query(f"WWW.{ZONE.upper()}"), NE),
    ]
    for opcode in range(1, 16):
        cases.append((f"opcode {opcode}", bytes([q[0], q[1], (q[2] & 0x87) | opcode << 3])
                      + q[3:], NI))
    for n in (0, 1, 7, 9, 12, 15, 41, 100):
        cases.append((f"cookie {n} bytes", cookie(n), F))
    for n in (8, 16, 40):
        cases.append((f"cookie {n} bytes (valid)", cookie(n), NE))
    tsig = dns.message.make_query(f"www.{ZONE}", "A")
    tsig.use_tsig(dns.tsig.Key("nokey.", b"0" * 32, "hmac-sha256"))
    cases.append(("TSIG, unknown key", tsig.to_wire(), RF))
    return cases


def mutate(rng: random.Random, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        if kind < 0.55 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind < 0.7 and data:
            del data[rng.randrange(len(data)):]
        elif kind < 0.85:
            pos = rng.randrange(len(data) + 1)
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif len(data) >= 12:
            struct.pack_into("!H", data, rng.choice((4, 6, 8, 10)), rng.choice((0, 1, 2, 255)))
    return bytes(data)


def seeds() -> list[bytes]:
    opts = [dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"c" * 8)]
    return [query(), query(rdtype="AAAA", want_dnssec=True), query(f"n7.{ZONE}", "TXT"),
            query(f"x.wild.{ZONE}", want_dnssec=True), query(f"alias.{ZONE}"),
            query(f"nope.{ZONE}", use_edns=0), query(use_edns=0, options=opts),
            query(rdtype="RRSIG", want_dnssec=True), query(ZONE, "DNSKEY", want_dnssec=True)]


# -- runs ------------------------------------------------------------------------------------


async def replay(name: str, cases: list[tuple[str, bytes, int]],
                 exchange: Callable[[bytes], object], concurrency: int = 32) -> Tally:
    tally = Tally(name)
    gate = asyncio.Semaphore(concurrency)

    async def one(label: str, wire: bytes, expect: int) -> None:
        async with gate:
            reply = await exchange(wire)  # type: ignore[misc]
            tally.note(label, wire, reply, expect)

    await asyncio.gather(*(one(*c) for c in cases))
    return tally


@dataclass
class Abuse:
    flood_sent: int = 0
    flood_answered: int = 0
    loris_connections: int = 0
    nonreader_bytes_sent: int = 0
    probes: int = 0
    probes_answered: int = 0
    probe_failures: list[str] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)


async def abuse(pid: int, seconds: float, rng: random.Random) -> Abuse:
    out = Abuse()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    cached = query()

    async def flood() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(OURS)
        while not stop.is_set():
            for _ in range(50):
                wire = cached if rng.random() < 0.8 else query(f"f{rng.randrange(10**6)}.{ZONE}")
                with contextlib.suppress(BlockingIOError, ConnectionError):
                    s.send(wire)
                    out.flood_sent += 1
            while True:
                try:
                    s.recv(65535)
                    out.flood_answered += 1
                except (BlockingIOError, ConnectionError):
                    break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.5)
        with contextlib.suppress(BlockingIOError, ConnectionError):
            while True:
                s.recv(65535)
                out.flood_answered += 1
        s.close()

    async def loris() -> None:
        while not stop.is_set():
            try:
                _r, w = await asyncio.open_connection(*OURS)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            out.loris_connections += 1
            try:
                w.write(b"\x00\xff")  # a 255-byte frame is announced, then trickled
                while not stop.is_set() and not w.is_closing():
                    w.write(b"a")
                    await w.drain()
                    await asyncio.sleep(1.0)
            except ConnectionError:
                pass
            finally:
                w.close()

    async def nonreader() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        await loop.sock_connect(s, OURS)
        frame = len(cached).to_bytes(2, "big") + cached
        chunk = frame * 2000
        with contextlib.suppress(ConnectionError, TimeoutError):
            while not stop.is_set():
                await asyncio.wait_for(loop.sock_sendall(s, chunk), seconds)
                out.nonreader_bytes_sent += len(chunk)
        s.close()

    async def probe() -> None:
        while not stop.is_set():
            out.probes += 1
            reply = await tcp_exchange(query(), 2.0, why=out.probe_failures)
            if reply is not None and reply[3] & 0x0F == 0:
                out.probes_answered += 1
            await asyncio.sleep(0.25)

    async def sample() -> None:
        while not stop.is_set():
            out.rss_kib.append(rss_kib(pid))
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(c) for c in (
        flood(), *(loris() for _ in range(300)), *(nonreader() for _ in range(3)), probe(),
        sample())]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=seconds + 5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return out


async def soak(pid: int, mutations: int, seconds: float, seed: int) -> tuple[list[Tally], Abuse]:
    rng = random.Random(seed)
    cases = hand_built()
    base = seeds()
    mutated = []
    for i in range(mutations):
        wire = mutate(rng, rng.choice(base))
        # The server's promise: no header or QR=1 is dropped, anything else gets a reply.
        expect = DROP if len(wire) < 12 or wire[2] & 0x80 else ANY_RCODE
        mutated.append((f"mutation {i}", wire, expect))
    tcp_mutated = mutated[: max(1, mutations // 4)]
    tallies = [
        await replay("hand-built, UDP", cases, lambda w: udp_exchange(w, 2.0)),
        await replay("hand-built, TCP", [c for c in cases if c[1]],
                     lambda w: tcp_exchange(w, 2.0)),
        await replay("mutated queries, UDP", mutated, lambda w: udp_exchange(w, 2.0)),
        await replay("mutated queries, TCP", tcp_mutated, lambda w: tcp_exchange(w, 2.0)),
        await replay("mutated, TCP byte by byte", tcp_mutated[:100],
                     lambda w: tcp_exchange(w, 5.0, bytewise=True), concurrency=8),
    ]
    # TCP: a frame length (or a query) of zero bytes, and an empty connection, are dropped.
    tallies[1].note("TCP frame of 0 bytes", b"", await tcp_exchange(b"", 2.0), DROP)
    return tallies, await abuse(pid, seconds, rng)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mutations", type=int, default=3000, help="mutated queries over UDP "
                    "(a quarter as many over TCP)")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the abuse run")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="isk-soak-") as tmp:
        work = Path(tmp)
        anchor = make_zone(work)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with process(named_argv(work), work / "named.log"):
            wait_for(lambda: udp_ok(AUTH), "named")
            with open(work / "daemon.log", "wb") as log:
                daemon = subprocess.Popen(daemon_argv(work, anchor), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            try:
                wait_for(lambda: udp_ok(OURS), "the daemon")
                rss0 = rss_kib(daemon.pid)
                tallies, ab = asyncio.run(soak(daemon.pid, args.mutations, args.seconds,
                                               args.seed))
                time.sleep(1.0)
                rss1 = rss_kib(daemon.pid)
                alive = daemon.poll() is None
                still = udp_ok(OURS)
            finally:
                daemon.terminate()
                try:
                    daemon.wait(5)
                except subprocess.TimeoutExpired:
                    daemon.kill()
        text = (work / "daemon.log").read_text(errors="replace")
    tracebacks = text.count("Traceback") + text.count("bug:")
    crashes = int(not alive) + tracebacks
    print(f"\ndaemon on {OURS[0]}:{OURS[1]} (default [server] limits), upstream named "
          f"{AUTH[0]}:{AUTH[1]}, zone {ZONE} signed; seed {args.seed}\n")
    for t in tallies:
        print(t.line())
        for u in t.unexpected:
            print(f"    unexpected: {u}")
    print(f"{'flood, UDP':<30} sent={ab.flood_sent} answered={ab.flood_answered} "
          f"({args.seconds:.0f} s, 80% one cached name, 20% random uncached names)")
    print(f"{'slow-loris, TCP':<30} 300 peers, {ab.loris_connections} connections opened "
          "(a 255-byte frame announced, then a byte a second; reconnecting when cut)")
    print(f"{'non-reading TCP clients':<30} 3 clients, {ab.nonreader_bytes_sent // 1024} KiB "
          "of queries into their sockets before they were cut off")
    print(f"{'real TCP client meanwhile':<30} probes={ab.probes} answered={ab.probes_answered}"
          + (f" (unanswered: {', '.join(ab.probe_failures)})" if ab.probe_failures else ""))
    peak = max(ab.rss_kib, default=0)
    print(f"{'daemon RSS':<30} before={rss0 // 1024} MiB peak={peak // 1024} MiB "
          f"after={rss1 // 1024} MiB")
    print(f"{'daemon':<30} running={alive} answers_after={still} tracebacks_in_log={tracebacks}")
    print(f"crashes={crashes}   (total {time.monotonic() - t0:.0f} s)")
    unexpected = sum(len(t.unexpected) for t in tallies)
    return 0 if crashes == 0 and unexpected == 0 and still else 1


def udp_ok(addr: tuple[str, int]) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        s.sendto(query(ZONE, "SOA"), addr)
        reply = s.recv(65535)
        return len(reply) >= 4 and reply[3] & 0x0F == 0
    except OSError:
        return False
    finally:
        s.close()


def wait_for(ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.2)
    sys.exit(f"fuzz_soak: {what} did not come up")


if __name__ == "__main__":
    sys.exit(main())
