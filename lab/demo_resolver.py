"""`make demo`: two hosts that run only ipseckey-resolver get an authenticated tunnel from one
DNS lookup.

Steps (each printed as it happens):
 1. lab up with bare charons (`Lab(preload=False)`): each charon holds only its own key and
    settings; no peer is configured anywhere.
 2. ipseckey-resolver starts in bob (identity bob.example.test, [provision] over bob's charon)
    and in alice; bob is never told about alice. alice's /etc/resolv.conf points at hers.
 3. `dig bob.example.test` inside alice: alice's resolver validates bob's A and IPSECKEY and
    initiates; bob's charon does not know alice and answers AUTHENTICATION_FAILED; bob's
    resolver learns alice's identity from charon's log, validates alice's IPSECKEY (and A/AAAA:
    the packet came from one of them), loads a conn for her key; alice tries again and the
    tunnel is up; only then does alice get her answer. The time the lookup took is shown.
 4. `ping bob.example.test` inside alice, while tcpdump watches bob's port on the lab switch:
    the wire must show ESP (ESP-in-UDP/4500 with userland ESP) and no cleartext ICMP.
 5. How bob authenticated alice, from bob's resolver log; then a name whose IPSECKEY is bogus:
    SERVFAIL with its Extended DNS Error.
 6. The resolvers stop and the lab goes down, also on error.
"""

from __future__ import annotations

import sys
import time

from lab.core import Lab
from lab.demo import esp_summary, ping_bob_on_the_wire
from lab.net import LabError
from lab.resolverd import ResolverDaemon


def run(lab: Lab) -> int:
    """Run the demo; returns 0 when the lookup-triggered tunnel carried the ping over ESP."""
    ok = False
    daemons: list[ResolverDaemon] = []
    try:
        print(f"== lab up ({lab.up():.2f} s): charons hold only their own keys, no peers",
              flush=True)
        for host in ("bob", "alice"):
            daemon = ResolverDaemon(lab, host)
            daemon.start()
            daemons.append(daemon)
        bob, alice = daemons
        lab.set_resolv_conf("alice", "nameserver 127.0.0.1\n")
        print("== ipseckey-resolver running in bob and in alice (bob was never told about "
              "alice); alice's resolv.conf: nameserver 127.0.0.1")
        print(f"   configs: {bob.config}, {alice.config}")
        print(f"   bob's charon before: conns {lab.conns('bob')}")
        t0 = time.monotonic()
        dig = lab.exec("alice", ["dig", "+noall", "+comments", "+answer", "bob.example.test"])
        took = 1000 * (time.monotonic() - t0)
        print(f"== alice: dig bob.example.test ({took:.0f} ms including the tunnel setup)")
        print(dig.stdout.strip())
        w = ping_bob_on_the_wire(lab, "bob.example.test")
        print("== how bob authenticated alice (bob's resolver log):")
        for line in bob.log.read_text(errors="replace").splitlines():
            if "responder:" in line and "alice" in line:
                print("   " + line.split(" resolver.responder.manager: ")[-1])
        print(f"   bob's charon after: conns {lab.conns('bob')}")
        bad = lab.exec("alice", ["dig", "+noall", "+comments", "host.badsig.test"], check=False)
        print("== alice: dig host.badsig.test (its IPSECKEY signature is broken)")
        print("\n".join(ln for ln in bad.stdout.splitlines()
                        if "status" in ln or "EDE" in ln).strip())
        ok = w.esp_only() and "NOERROR" in dig.stdout
        print(f"== {'OK' if ok else 'FAILED'}: lookup {took:.0f} ms, {esp_summary(w)}",
              flush=True)
        if not ok:
            for d in daemons:
                print(f"== {d.host}'s resolver log (last lines):\n{d.tail()}")
    except LabError as exc:
        print(f"== FAILED: {exc}")
    finally:
        for d in daemons:
            d.stop()
        print(f"== lab down ({lab.down():.2f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(Lab(preload=False)))
