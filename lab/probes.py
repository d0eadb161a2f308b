"""What tests, demos and benchmarks do inside a running lab: ping, watch the wire, dig, look at
charon's conns and SAs, update DNS, run this checkout's autosp.

Theory of operation: `Probes` is a base class of `lab.core.Lab`, kept apart so that core.py
stays about bringing the lab up and down. Every method here is built only on Lab's primitives
(`exec`, `call_in`, `query`, `vici`, `addr`, ...; declared below for type checkers) and starts
its traffic inside a lab namespace, never in the host's. Methods report what they saw (exit
status, capture lines, dig's parts); judging it is the caller's business (tests assert, the
demos print), except where a probe cannot have worked at all (dig got no reply with
`check=True`, an UPDATE was refused, a record was never signed): that raises LabError.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.update

from autosp.tsig import load_tsig_key
from lab import ike
from lab.keys import PublicKey
from lab.net import LabError, wait_until
from lab.topology import HOSTS, ZONES
from lab.wire import Capture, WirePing

REPO = Path(__file__).resolve().parent.parent

# A UDP blaster for `Probes.blast`: argv PORT SECONDS TARGET...; prints "blasting" once the
# first round is out, then one JSON line: per target the datagrams sendto() took ("sent"), the
# refusals by errno name, and the CLOCK_MONOTONIC times of the last datagram taken and the
# first one refused (the clock is the host's, shared by every namespace).
BLASTER = r"""
import errno, json, socket, sys, time
port, seconds, mark = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
targets = sys.argv[4:]
socks = [(t, socket.socket(socket.AF_INET6 if ":" in t else socket.AF_INET, socket.SOCK_DGRAM))
         for t in targets]
for _, s in socks if mark else ():
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
out = {t: {"sent": 0, "last_sent": None, "first_refused": None, "refused": {}} for t in targets}
end, first = time.monotonic() + seconds, True
while time.monotonic() < end:
    for t, s in socks:
        try:
            s.sendto(b"ipseckey-resolver blaster", (t, port))
        except OSError as e:
            r = out[t]
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            r["refused"][name] = r["refused"].get(name, 0) + 1
            if r["first_refused"] is None:
                r["first_refused"] = time.monotonic()
        else:
            out[t]["sent"] += 1
            out[t]["last_sent"] = time.monotonic()
    if first:
        print("blasting", flush=True)
        first = False
print(json.dumps(out), flush=True)
"""

# dig's options for a probe: DO set, answer section and header only, bounded retries.
DIG_OPTIONS = ("+dnssec", "+time=2", "+tries=2", "+nocmd", "+noall", "+comments", "+answer")


def python_argv(*args: str) -> list[str]:
    """argv that runs this checkout's Python code (`python -m resolver`, autosp, ...) inside a
    lab host: `ip netns exec` starts with a clean environment, so PYTHONPATH is passed along
    (this checkout first, then the caller's PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return ["env", f"PYTHONPATH={path}", sys.executable, *args]


@dataclass(frozen=True)
class Dig:
    """What one dig printed, and the parts tests look at."""

    status: str | None  # rcode text from the header; None when no reply came
    flags: frozenset[str]  # header flags ("qr", "aa", "ad", ...)
    records: list[str]  # record lines (with DIG_OPTIONS: the answer section)
    text: str

    @classmethod
    def parse(cls, text: str) -> Dig:
        status = re.search(r"status: (\w+)", text)
        flags = re.search(r";; flags: ([a-z ]+);", text)
        return cls(status.group(1) if status else None,
                   frozenset(flags.group(1).split()) if flags else frozenset(),
                   [ln for ln in text.splitlines() if ln and not ln.startswith(";")], text)

    @property
    def ad(self) -> bool:
        """The AD flag: the server validated the answer."""
        return "ad" in self.flags

    def rdatas(self, rtype: str, covered: str | None = None) -> list[str]:
        """Rdata texts of the records of one type (RRSIGs: those covering `covered`)."""
        out = []
        for ln in self.records:
            tok = ln.split(None, 4)
            if len(tok) == 5 and tok[3] == rtype:
                rdata = " ".join(tok[4].split())
                if covered is None or rdata.split()[0] == covered:
                    out.append(rdata)
        return out


@dataclass
class Blast:
    """A running `Probes.blast`; `wait()` returns what it reported per target."""

    proc: subprocess.Popen[str]

    def wait(self, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        out, err = self.proc.communicate(timeout=timeout)
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            raise LabError(f"blaster exited {self.proc.returncode}: {err.strip()}")
        result: dict[str, dict[str, Any]] = json.loads(lines[-1])
        return result


class Probes:
    """Lab operations for tests, demos and benchmarks (see the module docstring)."""

    if TYPE_CHECKING:  # Lab's primitives (lab/core.py)
        unbound_addr: str
        switch_ns: str
        tsig_keyfile: Path

        def exec(self, host: str, argv: Sequence[str], *, timeout: float = 30,
                 check: bool = True, input: str | None = None
                 ) -> subprocess.CompletedProcess[str]: ...

        def popen(self, host: str, argv: Sequence[str], **kw: Any
                  ) -> subprocess.Popen[Any]: ...

        def call_in(self, host: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any: ...

        def query(self, host: str, qname: str, rdtype: str | dns.rdatatype.RdataType, *,
                  server: str | None = None, port: int = 53, dnssec: bool = True,
                  cd: bool = False, timeout: float = 3.0, tcp: bool = False
                  ) -> dns.message.Message: ...

        def vici(self, host: str, timeout: float = 10.0) -> Any: ...

        def addr(self, host: str, family: int = 4) -> str: ...

        def public_key_pem(self, host: str) -> str: ...

        def public_key(self, host: str) -> PublicKey: ...

        def start_charon(self, host: str) -> None: ...

        def stop_charon(self, host: str) -> None: ...

    # --- ping and the wire ---------------------------------------------------------------

    def ping(self, host: str, target: str, *, family: int = 4, count: int = 1,
             wait: float = 1.0, timeout: float = 15.0) -> tuple[int, str]:
        """`ping` from inside `host`: (exit status, stdout + stderr).

        Numeric (-n: no reverse lookups to stall on), the family explicit (a name may have
        both), 0.2 s between echoes, `wait` seconds for each reply. A failed ping is a result,
        not an error: callers look for EPERM (a shunt said no) or silence themselves.
        """
        r = self.exec(host, ["ping", "-n", f"-{family}", "-c", str(count), "-i", "0.2",
                             "-W", f"{wait:g}", target], check=False, timeout=timeout)
        return r.returncode, r.stdout + r.stderr

    def capture(self, port: str, *hosts: str) -> Capture:
        """tcpdump on lab host `port`'s switch port, for the packets between all of `hosts`
        (one host: every packet to or from it). Use as a context manager."""
        bpf: list[str] = []
        for h in hosts:
            bpf += [*(["and"] if bpf else []), "host", h]
        return Capture(self.switch_ns, f"v-{port}", bpf)

    def ping_on_wire(self, host: str, target: str, *, peer: str | None = None,
                     port: str | None = None, watch: Sequence[str] | None = None,
                     family: int = 4, count: int = 3, wait: float = 1.0) -> WirePing:
        """Ping `target` from `host` while the switch watches; returns what both saw.

        `peer` is the far end of the path the echoes should take (default `target`; give the
        gateway's address when the target is behind one, or an address when it is a name).
        The capture runs on `port`'s switch port (default: `host`'s own) and sees the packets
        between all of `watch` (default: `host`'s address and `peer`).
        """
        src = self.addr(host, family)
        dst = peer or target
        with self.capture(port or host, *(watch or (src, dst))) as cap:
            rc, out = self.ping(host, target, family=family, count=count, wait=wait)
        return WirePing(rc, out, src, dst, count, cap)

    def blast(self, host: str, targets: Sequence[str], *, port: int = 9,
              seconds: float = 1.0, mark: int = 0) -> Blast:
        """Start a UDP blaster inside `host`: datagrams to `port` of each target in turn, as
        fast as one Python loop sends them, for `seconds`. Returns once the first round is
        out; `Blast.wait()` gives the counts (BLASTER says which). With `mark` (SO_MARK: a
        charon's own mark, lab.ike.FWMARK) the host's own tunnel routes are skipped, so the
        datagrams leave it in clear (a spoofer's, seen from the other end).

        Raises:
            LabError: the blaster did not start.
        """
        proc: subprocess.Popen[str] = self.popen(
            host, python_argv("-c", BLASTER, str(port), f"{seconds:g}", str(mark),
                                    *targets),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "blasting":
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise LabError(f"blaster did not start: {err.strip()}")
        return Blast(proc)

    # --- DNS -----------------------------------------------------------------------------

    def dig(self, host: str, *args: str, server: str | None = None,
            options: Sequence[str] = DIG_OPTIONS, check: bool = True,
            timeout: float = 30) -> Dig:
        """Run dig inside `host`, asking `server` (default: the lab Unbound).

        Raises:
            CommandFailed, LabError: with `check`, dig failed or printed no reply header.
        """
        r = self.exec(host, ["dig", f"@{server or self.unbound_addr}", *options, *args],
                      check=check, timeout=timeout)
        d = Dig.parse(r.stdout)
        if check and (d.status is None or not d.flags):
            raise LabError(f"dig {' '.join(args)}: no reply header in\n{r.stdout}")
        return d

    def update(self, build: Callable[[dns.update.UpdateMessage], None], *,
               zone: str = "example.test.", host: str = "alice", timeout: float = 10.0) -> None:
        """Send one TSIG-signed UPDATE of `zone` (built by `build`) from inside `host` to the
        zone's primary, over TCP.

        Raises:
            LabError: the primary did not answer NOERROR.
        """
        msg = dns.update.UpdateMessage(zone, keyring=load_tsig_key(self.tsig_keyfile)
                                       .to_dnspython())
        build(msg)
        primary = HOSTS[ZONES[zone].server].v4
        reply = self.call_in(host, lambda: dns.query.tcp(msg, primary, timeout=timeout),
                             timeout + 10)
        if reply.rcode() != dns.rcode.NOERROR:
            raise LabError(f"UPDATE of {zone} refused: {dns.rcode.to_text(reply.rcode())}")

    def signed(self, name: str, rdtype: str, server: str, *, host: str = "alice",
               timeout: float = 0.5) -> bool:
        """`server` answers name/rdtype (asked from `host`) with an RRSIG over it."""
        try:
            r = self.query(host, name, rdtype, server=server, timeout=timeout)
        except (OSError, dns.exception.DNSException):
            return False
        return any(rr.rdtype == dns.rdatatype.RRSIG for rr in r.answer)

    def wait_signed(self, name: str, rdtype: str, server: str, *, host: str = "alice",
                    timeout: float = 15.0) -> None:
        """Wait until named has signed name/rdtype (inline signing is asynchronous).

        Raises:
            LabError: still unsigned after `timeout` seconds.
        """
        wait_until(lambda: self.signed(name, rdtype, server, host=host), timeout,
                   f"{name} {rdtype} not signed by {server}", interval=0.02)

    # --- charon ----------------------------------------------------------------------------

    def conns(self, host: str) -> list[str]:
        """Names of the connections loaded in `host`'s charon."""
        with self.vici(host) as s:
            return ike.conn_names(s)

    def close_conns(self, host: str, names: Iterable[str]) -> None:
        """Terminate and unload these connections in `host`'s charon (see `ike.close`)."""
        with self.vici(host) as s:
            for name in names:
                ike.close(s, name)

    def ike_sas(self, host: str) -> list[tuple[str, dict[str, Any]]]:
        """(conn name, IKE_SA) for every IKE_SA of `host`'s charon."""
        with self.vici(host) as s:
            return [(name, sa) for entry in ike.list_sas(s) for name, sa in entry.items()]

    def child_sas(self, host: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(IKE_SA, CHILD_SA) for every CHILD_SA of `host`'s charon."""
        with self.vici(host) as s:
            return ike.child_sas(s)

    def child_states(self, host: str, prefix: str = "") -> dict[str, str]:
        """CHILD_SA name -> state in `host`'s charon, for the names starting with `prefix`."""
        with self.vici(host) as s:
            return {n: st for n, st in ike.child_states(s).items() if n.startswith(prefix)}

    @contextmanager
    def charon_stopped(self, host: str) -> Iterator[None]:
        """`host`'s charon is down (a dead IKE peer) inside the block, up again after it."""
        self.stop_charon(host)
        try:
            yield
        finally:
            self.start_charon(host)

    def restart_charon(self, host: str) -> None:
        """Stop and start `host`'s charon: every SA gone, its lab key and responder conns
        loaded afresh."""
        self.stop_charon(host)
        self.start_charon(host)

    def respond_as(self, host: str, *identities: str, peer: str = "alice",
                   spki: str | None = None) -> list[str]:
        """Make `host`'s charon accept IKE from `peer` under more identities (default: its
        FQDN), signing with the key `spki` (default: its lab key; give the new one after a key
        change). Returns the conn names, for `close_conns`."""
        conns = [ike.responder_conn(HOSTS[host], HOSTS[peer], spki or self.public_key_pem(host),
                                    self.public_key_pem(peer), local_id=ident)
                 for ident in identities or (None,)]
        with self.vici(host) as s:
            for conn in conns:
                s.load_conn(conn)
        return [name for conn in conns for name in conn]

    # --- the project's programs ------------------------------------------------------------

    def autosp(self, host: str, *args: str, control: Path | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `python -m autosp [--control PATH] ARGS` inside `host` (never from the host
        namespace); its exit status is the caller's to check."""
        pre = ["--control", str(control)] if control is not None else []
        return self.exec(host, python_argv("-m", "autosp", *pre, *args), timeout=timeout,
                         check=False)

