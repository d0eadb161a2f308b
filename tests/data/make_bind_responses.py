"""Record real BIND responses for tests/test_wireparse.py (run by hand; needs bind9, bind9-utils).

Signs two zones with dnssec-signzone, one with NSEC (nsec.test.) and one with NSEC3 (salt,
1 iteration: nsec3.test.), both holding the record shapes the resolver meets (wildcards,
CNAME and DNAME chains, MX/TXT/SRV/IPSECKEY, an empty non-terminal, a delegation with DS
and one without), serves them with named on 127.0.0.1:5431 (minimal-responses no, so
additional sections carry glue), asks a list of questions with DO=1 CD=1 as the forwarder
does, and writes `bind_responses.txt`: one response per line, "QNAME QTYPE HEX".

Usage: .venv/bin/python tests/data/make_bind_responses.py
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

PORT = 5431
HERE = Path(__file__).resolve().parent
RECORDS = """$TTL 300
@ SOA ns hostmaster 1 3600 600 86400 300
@ NS ns
ns A 127.0.0.1
ns AAAA ::1
www A 192.0.2.1
www AAAA 2001:db8::1
host A 192.0.2.2
host IPSECKEY 10 1 2 192.0.2.2 AQNRU3mG7TVTO2BkR47usntb102uFJtugbo6BSGvgqt4AQ==
*.wild A 192.0.2.3
*.wild TXT "wild"
alias CNAME www
far CNAME www.example.
dn DNAME @
a.b TXT "empty non-terminal above"
mx MX 10 www
mx MX 20 host
txt TXT "one" "two"
_sip._tcp SRV 0 5 5060 www
sub NS ns.sub
ns.sub A 192.0.2.53
sec NS ns.sec
ns.sec A 192.0.2.54
sec DS 12345 13 2 0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF
MiXeD A 192.0.2.9
"""
QUESTIONS = [
    ("www", "A"), ("www", "AAAA"), ("www", "MX"), ("host", "IPSECKEY"), ("host", "AAAA"),
    ("x.wild", "A"), ("x.wild", "TXT"), ("x.wild", "AAAA"), ("alias", "A"), ("far", "A"),
    ("www.dn", "A"), ("b", "TXT"), ("a.b", "TXT"), ("mx", "MX"), ("txt", "TXT"),
    ("_sip._tcp", "SRV"), ("nx", "A"), ("nx.nx", "AAAA"), ("x.sub", "A"), ("sub", "DS"),
    ("sec", "DS"), ("x.sec", "A"), ("@", "DNSKEY"), ("@", "SOA"), ("@", "NS"),
    ("@", "NSEC3PARAM"), ("mixed", "A"), ("WwW", "A"), ("@", "ANY"), ("www", "RRSIG"),
]


def sh(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True).stdout


def sign(work: Path, zone: str, nsec3: bool) -> Path:
    keys = work / zone
    keys.mkdir()
    ksk = sh("dnssec-keygen", "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", "-f", "KSK",
             zone).strip()
    zsk = sh("dnssec-keygen", "-q", "-K", str(keys), "-a", "ECDSAP256SHA256", zone).strip()
    src = keys / "zone"
    src.write_text(RECORDS + f"$INCLUDE {keys / ksk}.key\n$INCLUDE {keys / zsk}.key\n")
    out = work / f"{zone}signed"
    extra = ["-3", "abcd", "-H", "1"] if nsec3 else []
    sh("dnssec-signzone", "-q", *extra, "-K", str(keys), "-d", str(keys), "-o", zone, "-f",
       str(out), str(src), str(keys / ksk), str(keys / zsk))
    return out


def ask(qname: str, qtype: str) -> bytes:
    import dns.flags
    import dns.message

    q = dns.message.make_query(qname, qtype, use_edns=0, want_dnssec=True, payload=1232)
    q.flags = dns.flags.RD | dns.flags.CD
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(q.to_wire(), ("127.0.0.1", PORT))
        return s.recvfrom(65535)[0]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        zones = {z: sign(work, z, z.startswith("nsec3")) for z in ("nsec.test.", "nsec3.test.")}
        conf = work / "named.conf"
        conf.write_text(
            f'options {{ directory "{work}"; listen-on port {PORT} {{ 127.0.0.1; }}; '
            'listen-on-v6 { none; }; recursion no; dnssec-validation no; '
            f'pid-file none; minimal-responses no; }};\ncontrols {{ }};\n'
            + "".join(f'zone "{z}" {{ type primary; file "{f}"; }};\n' for z, f in zones.items()))
        named = subprocess.Popen(["named", "-g", "-n", "1", "-c", str(conf)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.5)
            lines = []
            for zone in zones:
                for label, qtype in QUESTIONS:
                    qname = zone if label == "@" else f"{label}.{zone}"
                    lines.append(f"{qname} {qtype} {ask(qname, qtype).hex()}\n")
        finally:
            named.terminate()
            named.wait(5)
    (HERE / "bind_responses.txt").write_text("".join(lines))


if __name__ == "__main__":
    main()
