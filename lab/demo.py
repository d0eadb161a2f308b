"""`python -m lab demo`: a key from DNSSEC-validated DNS brings up a real IPsec tunnel.

Steps: lab up; alice asks the lab Unbound for bob's IPSECKEY (AD must be set); alice's charon
gets a connection to bob with that key over VICI and initiates; a ping from alice to bob goes
through while tcpdump on bob's switch port shows only ESP (ESP-in-UDP/4500 with libipsec); the
SA list is printed; lab down, also on error. (The resolver issue turns this into the resolver
doing the lookup.)
"""

from __future__ import annotations

import time

import dns.flags
import dns.message
import dns.name
import dns.rdatatype

from lab.core import Lab
from lab.net import LabError
from lab.wire import WirePing
from resolver import ipseckey


def key_from_answer(answer: dns.message.Message, qname: str) -> str:
    """SPKI PEM of the preferred (lowest precedence) IPSECKEY in a validated answer.

    Raises:
        LabError: the answer is not authenticated (no AD) or holds no IPSECKEY.
    """
    if not answer.flags & dns.flags.AD:
        raise LabError(f"{qname} IPSECKEY is not DNSSEC-authenticated (no AD flag)")
    rrs = [rr for rrset in answer.answer if rrset.rdtype == dns.rdatatype.IPSECKEY
           for rr in rrset]
    if not rrs:
        raise LabError(f"no IPSECKEY for {qname}")
    best = min(rrs, key=lambda rr: rr.precedence)
    return ipseckey.IpsecKey.from_rdata(dns.name.from_text(qname), best, 0).spki_pem()


def ping_bob_on_the_wire(lab: Lab, target: str) -> WirePing:
    """Ping bob (`target`: his address or name) from alice while tcpdump watches bob's switch
    port; print the ping, the wire and alice's SAs. Returns the result, so the caller can say
    whether the tunnel carried the traffic (`WirePing.esp_only`)."""
    w = lab.ping_on_wire("alice", target, peer=lab.addr("bob"), port="bob")
    print(f"== alice: ping -c {w.count} {target}\n{w.output.strip()}")
    print("== tcpdump on bob's switch port (the wire):")
    for line in w.capture.lines:
        print("   " + line)
    sas = lab.exec("alice", ["swanctl", "--list-sas", "--uri", lab.vici_socket("alice")])
    print(f"== alice's SAs (swanctl --list-sas)\n{sas.stdout.strip()}")
    return w


def esp_summary(w: WirePing) -> str:
    """One line: did the ping get through, how many ESP and cleartext packets were seen."""
    return (f"ping {'ok' if w.returncode == 0 else 'failed'}, "
            f"{len(w.esp_out) + len(w.esp_back)} ESP packets, "
            f"{len(w.cleartext)} cleartext ICMP packets on the wire")


def run_demo(lab: Lab) -> int:
    """Run the demo; returns 0 if ESP carried the ping and no cleartext ICMP was seen."""
    ok = False
    try:
        print(f"== lab up ({lab.up():.2f} s)")
        qname = "bob.example.test"
        dig = lab.dig("alice", "+multi", qname, "IPSECKEY")
        print(f"== alice: dig {qname} IPSECKEY via the lab Unbound\n{dig.text.strip()}")
        answer = lab.query("alice", qname, "IPSECKEY")
        spki = key_from_answer(answer, qname)
        print("== bob's key from DNS (validated, AD):\n" + spki.strip())
        t0 = time.monotonic()
        with lab.tunnel("alice", "bob", lab.addr("bob"), qname, spki) as states:
            print(f"== tunnel alice -> bob over VICI in {1000 * (time.monotonic() - t0):.1f} "
                  f"ms: {states}")
            w = ping_bob_on_the_wire(lab, lab.addr("bob"))
        ok = w.esp_only()
        print(f"== {'OK' if ok else 'FAILED'}: {esp_summary(w)}")
    except LabError as exc:
        print(f"== FAILED: {exc}")
    finally:
        print(f"== lab down ({lab.down():.2f} s)")
    return 0 if ok else 1
