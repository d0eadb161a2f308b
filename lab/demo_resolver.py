"""`make demo`: a DNS lookup brings up a real IPsec tunnel before the answer comes back.

Steps (each printed as it happens):
 1. lab up: signed DNS hierarchy, validating Unbound, strongSwan peers in network namespaces.
 2. ipseckey-resolver starts inside alice (upstream: the lab Unbound; trust anchor: the lab
    root; identity alice.example.test; tunnels over alice's charon VICI socket) and alice's
    /etc/resolv.conf points at it.
 3. `dig bob.example.test` inside alice: the resolver validates bob's A and IPSECKEY, brings the
    tunnel up, and only then answers; the time the lookup took is shown.
 4. `ping bob.example.test` inside alice, while tcpdump watches bob's port on the lab switch:
    the wire must show ESP (ESP-in-UDP/4500 with userland ESP) and no cleartext ICMP.
 5. alice's SAs as strongSwan lists them, then a name whose IPSECKEY is bogus: SERVFAIL with
    its Extended DNS Error.
 6. The resolver stops and the lab goes down, also on error.
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
    daemon: ResolverDaemon | None = None
    try:
        print(f"== lab up ({lab.up():.2f} s)", flush=True)
        daemon = ResolverDaemon(lab, "alice", sections={
            "policy": {"default": "private-or-clear", "private": ["example.test."]}})
        daemon.start()
        lab.set_resolv_conf("alice", "nameserver 127.0.0.1\n")
        print("== ipseckey-resolver running in alice; alice's resolv.conf: nameserver 127.0.0.1")
        print(f"   config: {daemon.config}")
        t0 = time.monotonic()
        dig = lab.exec("alice", ["dig", "+noall", "+comments", "+answer", "bob.example.test"])
        took = 1000 * (time.monotonic() - t0)
        print(f"== alice: dig bob.example.test ({took:.0f} ms including the tunnel setup)")
        print(dig.stdout.strip())
        w = ping_bob_on_the_wire(lab, "bob.example.test")
        bad = lab.exec("alice", ["dig", "+noall", "+comments", "host.badsig.test"], check=False)
        print("== alice: dig host.badsig.test (its IPSECKEY signature is broken)")
        print("\n".join(ln for ln in bad.stdout.splitlines()
                        if "status" in ln or "EDE" in ln).strip())
        ok = w.esp_only() and "NOERROR" in dig.stdout
        print(f"== {'OK' if ok else 'FAILED'}: lookup {took:.0f} ms, {esp_summary(w)}",
              flush=True)
        if not ok:
            print(f"== resolver log (last lines):\n{daemon.tail()}")
    except LabError as exc:
        print(f"== FAILED: {exc}")
    finally:
        if daemon is not None:
            daemon.stop()
        print(f"== lab down ({lab.down():.2f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(Lab()))
