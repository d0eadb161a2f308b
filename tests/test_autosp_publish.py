"""autosp publish against an in-process primary on 127.0.0.1 (nanonameserver style).

FakePrimary speaks DNS over TCP, serves one zone from a dict, checks TSIG and applies RFC 2136
updates with the two prerequisite forms autosp sends. FakeResolver answers from the same dict
over UDP and sets AD when told to. The real /usr/bin/nsupdate is run against FakePrimary to show
that the printed script and our dnspython message change the zone identically.
"""

from __future__ import annotations

import base64
import shutil
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.tsig
import dns.update
import pytest

from autosp import keygen
from autosp import plan as P
from autosp.cli import main
from autosp.errors import OperationFailed
from autosp.publish import Server, check_secure, send_update

ZONE = dns.name.from_text("example.test.")
NAME = dns.name.from_text("bob.example.test.")
SECRET = base64.b64encode(b"s" * 32).decode()
KEY = dns.tsig.Key("ddns-key", SECRET, "hmac-sha256")
KEYFILE_TEXT = f'key "ddns-key" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'
Records = dict[tuple[dns.name.Name, dns.rdatatype.RdataType], dns.rdataset.Rdataset]


@dataclass
class ZoneState:
    records: Records = field(default_factory=dict)
    updates: list[dns.message.Message] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ad: bool = True
    refuse: bool = False


def _apply(state: ZoneState, msg: dns.message.Message) -> int:
    """RFC 2136 prerequisites (value-dependent exists, does not exist) and updates."""
    wanted: dict[tuple[dns.name.Name, dns.rdatatype.RdataType], set[dns.rdata.Rdata]] = {}
    for rr in msg.sections[1]:
        key = (rr.name, rr.rdtype)
        if rr.deleting == dns.rdataclass.NONE:
            if key in state.records:
                return dns.rcode.YXRRSET
        else:
            wanted.setdefault(key, set()).update(rr)
    for key, rdatas in wanted.items():
        have = state.records.get(key)
        if have is None or set(have) != rdatas:
            return dns.rcode.NXRRSET
    for rr in msg.sections[2]:
        key = (rr.name, rr.rdtype)
        if rr.deleting == dns.rdataclass.ANY:
            state.records.pop(key, None)
        else:
            rds = state.records.setdefault(key, dns.rdataset.Rdataset(rr.rdclass, rr.rdtype))
            for rd in rr:
                rds.add(rd, rr.ttl)
            rds.update_ttl(rr.ttl)
            rds.ttl = rr.ttl
    return dns.rcode.NOERROR


def _answer(state: ZoneState, q: dns.message.Message) -> dns.message.Message:
    r = dns.message.make_response(q)
    qn, qt = q.question[0].name, q.question[0].rdtype
    if not qn.is_subdomain(ZONE):
        r.set_rcode(dns.rcode.REFUSED)
        return r
    r.flags |= dns.flags.AA
    if qt == dns.rdatatype.SOA and qn == ZONE:
        r.answer.append(dns.rrset.from_text(ZONE, 60, "IN", "SOA", "ns. h. 1 2 3 4 5"))
        return r
    rds = state.records.get((qn, qt))
    if rds is not None:
        r.answer.append(dns.rrset.from_rdata_list(qn, rds.ttl, list(rds)))
    else:
        r.authority.append(dns.rrset.from_text(ZONE, 60, "IN", "SOA", "ns. h. 1 2 3 4 5"))
        if not any(n == qn for n, _ in state.records):
            r.set_rcode(dns.rcode.NXDOMAIN)
    return r


class _TCP(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        state = self.server.state
        while True:
            head = self.request.recv(2)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            wire = b""
            while len(wire) < n:
                chunk = self.request.recv(n - len(wire))
                if not chunk:
                    return
                wire += chunk
            reply = self._reply(state, wire)
            if reply is not None:
                out = reply.to_wire()
                self.request.sendall(struct.pack("!H", len(out)) + out)

    def _reply(self, state: ZoneState, wire: bytes) -> dns.message.Message | None:
        try:
            msg = dns.message.from_wire(wire, keyring={KEY.name: KEY})
        except dns.tsig.BadSignature:
            msg = dns.message.from_wire(wire, keyring=False)
            r = dns.message.make_response(msg)
            r.set_rcode(dns.rcode.NOTAUTH)
            r.use_tsig(KEY, tsig_error=dns.rcode.BADSIG)
            return r
        if msg.opcode() != dns.opcode.UPDATE:
            with state.lock:
                return _answer(state, msg)
        r = dns.message.make_response(msg)
        with state.lock:
            state.updates.append(msg)
            if state.refuse or not msg.had_tsig:
                r.set_rcode(dns.rcode.REFUSED)
            else:
                r.set_rcode(dns.rcode.Rcode(_apply(state, msg)))
        return r


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: ZoneState


class _UDP(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        q = dns.message.from_wire(data)
        with self.server.state.lock:
            r = _answer(self.server.state, q)
        r.flags &= ~dns.flags.AA
        r.flags |= dns.flags.RA
        if self.server.state.ad:
            r.flags |= dns.flags.AD
        sock.sendto(r.to_wire(), self.client_address)


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    state: ZoneState


@dataclass
class Lab:
    state: ZoneState
    port: int
    resolver_port: int
    keyfile: Path
    tmp: Path

    def argv(self, *extra: str) -> list[str]:
        return ["publish", "bob.example.test", "--server", "127.0.0.1", "--port", str(self.port),
                "--tsig-key", str(self.keyfile), "--resolver", "127.0.0.1",
                "--resolver-port", str(self.resolver_port), "--check-timeout", "0.5",
                "--timeout", "2", *extra]

    def keys(self) -> set[str]:
        """Base64 of the public keys in the IPSECKEY RRset."""
        rds = self.state.records.get((NAME, dns.rdatatype.IPSECKEY))
        return {base64.b64encode(rd.key).decode() for rd in rds} if rds else set()

    def rdatas(self, rdtype: str) -> set[str]:
        rds = self.state.records.get((NAME, dns.rdatatype.from_text(rdtype)))
        return {rd.to_text() for rd in rds} if rds else set()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Lab]:
    state = ZoneState()
    tcp = _Server(("127.0.0.1", 0), _TCP)
    tcp.state = state
    udp = _UDPServer(("127.0.0.1", 0), _UDP)
    udp.state = state
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
               for s in (tcp, udp)]
    for t in threads:
        t.start()
    keyfile = tmp_path / "ddns.key"
    keyfile.write_text(KEYFILE_TEXT)
    try:
        yield Lab(state, tcp.server_address[1], udp.server_address[1], keyfile, tmp_path)
    finally:
        for s in (tcp, udp):
            s.shutdown()
            s.server_close()


def _newkey(lab: Lab, name: str = "host.pem") -> Path:
    p = lab.tmp / name
    keygen.write_private_key(p, keygen.pkcs8_pem(keygen.generate(keygen.Algorithm.ED25519)))
    return p


def _b64(p: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    pub = keygen.load_private_key(p).public_key()
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def test_first_publish_then_nothing_to_do(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    key = _newkey(fake)
    argv = fake.argv("--key", str(key), "--address", "198.51.100.11", "2001:db8:100::11")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "published, secure" in out
    assert fake.rdatas("A") == {"198.51.100.11"}
    assert fake.rdatas("AAAA") == {"2001:db8:100::11"}
    assert fake.keys() == {_b64(key)}
    (rd,) = fake.state.records[(NAME, dns.rdatatype.IPSECKEY)]
    assert (rd.precedence, rd.gateway_type, rd.algorithm) == (10, 0, 4)
    (update,) = fake.state.updates
    assert update.had_tsig and update.keyname == KEY.name
    assert main(argv) == 0
    assert "nothing to change" in capsys.readouterr().out
    assert len(fake.state.updates) == 1


def test_not_secure_is_reported_and_require_secure_fails(
        fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    fake.state.ad = False
    assert main(fake.argv("--address", "198.51.100.11")) == 0
    assert "published, but not yet DNSSEC-secure" in capsys.readouterr().out
    assert main(fake.argv("--address", "198.51.100.12", "--require-secure")) == 1
    assert "without the AD bit" in capsys.readouterr().out


def test_wrong_tsig_secret_is_badsig_exit_1(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    fake.keyfile.write_text(KEYFILE_TEXT.replace(SECRET, base64.b64encode(b"w" * 32).decode()))
    assert main(fake.argv("--address", "198.51.100.11")) == 1
    err = capsys.readouterr().err
    assert "BADSIG" in err and err.count("\n") == 1
    assert fake.state.records == {}


def test_refused_exit_1(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    fake.state.refuse = True
    assert main(fake.argv("--address", "198.51.100.11")) == 1
    assert "refused the update (REFUSED)" in capsys.readouterr().err


def test_racing_publisher_fails_cleanly(fake: Lab) -> None:
    a = dns.rdata.from_text("IN", "A", "198.51.100.11")
    upd = P.Update(ZONE, NAME, 60, {P.A: frozenset()}, {P.A: frozenset({a})}, "publish")
    send_update(upd, KEY, Server("127.0.0.1", fake.port), 2)
    with pytest.raises(OperationFailed, match=r"prerequisite failed .* changed since"):
        send_update(upd, KEY, Server("127.0.0.1", fake.port), 2)  # someone else was first


def test_unreachable_server_exit_1(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        argv = fake.argv("--address", "198.51.100.11")
        argv[argv.index("--port") + 1] = str(port)
        assert main(argv) == 1
    assert "cannot reach 127.0.0.1" in capsys.readouterr().err


def test_silent_server_times_out_exit_1(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        argv = fake.argv("--address", "198.51.100.11")
        argv[argv.index("--port") + 1] = str(s.getsockname()[1])
        argv[argv.index("--timeout") + 1] = "0.3"
        assert main(argv) == 1
    assert "no answer from 127.0.0.1" in capsys.readouterr().err


def test_bad_inputs_exit_2(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(fake.argv("--address", "not-an-ip")) == 2
    assert main(fake.argv("--address", "127.0.0.1")) == 2
    bad = fake.tmp / "bad.key"
    bad.write_text('key "k" {\n algorithm hmac-sha256;\n};\n')
    argv = fake.argv("--address", "198.51.100.11")
    argv[argv.index("--tsig-key") + 1] = str(bad)
    assert main(argv) == 2
    key = _newkey(fake)
    key.chmod(0o644)
    assert main(fake.argv("--key", str(key))) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("autosp: ") for line in err)
    assert "bad.key:1: key 'k' has no 'secret'" in err[2]
    assert "too open" in err[3]
    assert fake.state.updates == []  # bad input costs no traffic


def test_key_rollover_make_before_break(fake: Lab, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "ROLLOVER_MARGIN", 0.0)
    old, new = _newkey(fake, "old.pem"), _newkey(fake, "new.pem")
    base = ("--address", "198.51.100.11", "--ttl", "0")
    assert main(fake.argv("--key", str(old), *base)) == 0
    assert main(fake.argv("--key", str(new), *base)) == 0
    first, second = fake.state.updates[1:]
    # Phase 1 added the new key beside the old; phase 2 removed the old one.
    added1 = {base64.b64encode(rd.key).decode() for rr in first.sections[2]
              if rr.deleting is None and rr.rdtype == dns.rdatatype.IPSECKEY for rd in rr}
    assert added1 == {_b64(old), _b64(new)}
    assert fake.keys() == {_b64(new)}
    assert second.had_tsig
    assert "key rollover" in capsys.readouterr().out


def test_rollover_no_wait_then_finish(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _newkey(fake, "old.pem"), _newkey(fake, "new.pem")
    assert main(fake.argv("--key", str(old), "--address", "none")) == 0
    assert main(fake.argv("--key", str(new), "--address", "none", "--no-wait")) == 0
    assert fake.keys() == {_b64(old), _b64(new)}
    assert "--finish-rollover" in capsys.readouterr().out
    assert main(fake.argv("--key", str(new), "--address", "none", "--finish-rollover")) == 0
    assert fake.keys() == {_b64(new)}
    assert main(fake.argv("--key", str(old), "--address", "none", "--finish-rollover")) == 1


def test_check_secure_waits_for_stale_data(fake: Lab) -> None:
    a = dns.rdata.from_text("IN", "A", "198.51.100.11")
    result = check_secure(NAME, {P.A: frozenset({a})}, Server("127.0.0.1", fake.resolver_port),
                          0.2)
    assert not result.secure and "does not return" in result.why


def test_nsupdate_script_with_real_nsupdate_matches_ours(
        fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    exe = shutil.which("nsupdate")
    assert exe, "nsupdate missing: apt install bind9-dnsutils"
    key = _newkey(fake)
    argv = fake.argv("--key", str(key), "--address", "198.51.100.11", "2001:db8:100::11")
    assert main([*argv, "--nsupdate"]) == 0
    script = capsys.readouterr().out
    assert fake.state.updates == []  # printing sends nothing
    proc = subprocess.run([exe, "-v", "-t", "5", "-k", str(fake.keyfile)], input=script,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    (theirs,) = fake.state.updates
    assert theirs.had_tsig
    via_nsupdate = dict(fake.state.records)
    fake.state.records.clear()
    assert main(argv) == 0
    ours = fake.state.updates[1]
    assert fake.state.records.keys() == via_nsupdate.keys()
    for k, v in via_nsupdate.items():
        assert set(fake.state.records[k]) == set(v) and fake.state.records[k].ttl == v.ttl
    for i in (1, 2):  # same prerequisites and updates on the wire
        assert sorted(r.to_text() for r in theirs.sections[i]) == \
            sorted(r.to_text() for r in ours.sections[i])


def test_run_nsupdate(fake: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert shutil.which("nsupdate"), "nsupdate missing: apt install bind9-dnsutils"
    # --run-nsupdate uses /usr/bin/nsupdate with our port: the script names it on `server`.
    assert main(fake.argv("--address", "198.51.100.11", "--run-nsupdate")) == 0
    assert fake.rdatas("A") == {"198.51.100.11"}
    assert "done (nsupdate)" in capsys.readouterr().err
    fake.keyfile.write_text(KEYFILE_TEXT.replace(SECRET, base64.b64encode(b"w" * 32).decode()))
    assert main(fake.argv("--address", "198.51.100.12", "--run-nsupdate")) == 1
    assert "nsupdate failed" in capsys.readouterr().err
    assert fake.rdatas("A") == {"198.51.100.11"}
