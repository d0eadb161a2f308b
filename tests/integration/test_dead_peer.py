"""Dead peer detection end to end: a peer's charon dies without a DELETE and comes back.

The real daemon runs in alice ([policy] default = "private", `[provision] dpd_delay = 2`) over
alice's real charon and holds a tunnel to bob. bob's charon is killed with SIGKILL (no DELETE,
as after a power loss or a laptop that changed network) and started again at once, holding
nothing. Without DPD alice's IKE_SA to bob stays ESTABLISHED and the daemon answers as if the
tunnel were fine while every packet goes into an SA nobody holds, until a rekey hours later.
With it, alice's charon asks bob after `dpd_delay` quiet seconds, gets no answer, retransmits
per the lab's strongswan.conf (2 tries, 1 s, base 1.4: about 4.4 s) and closes the IKE_SA; the
watch hears ike-updown, shunts bob, marks the tunnel DOWN and repairs it against bob's new
charon. Checked where it shows: the daemon's log (noticed within DETECT seconds of the kill,
measured and printed), charon's own list of the conn (`dpd_delay` as the daemon sent it), the
wire on bob's switch port (pings sent all along are never seen in clear), and the tunnel back
(a new IKE_SA, ping over ESP), with the same daemon process throughout.

Run: `LAB_ID=d .venv/bin/python -m pytest -q -s tests/integration/test_dead_peer.py`
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import dns.rcode
import pytest

from lab import Lab
from lab.net import wait_until
from lab.resolverd import ResolverDaemon
from lab.wire import Capture
from tests.helpers import addresses, clean_alice, esp_ping
from tests.integration.test_charon_watch import Log, ike_ids, installed, waited

pytestmark = pytest.mark.integration

DPD_DELAY = 2  # seconds ([provision] dpd_delay for this daemon)
# Seconds from the kill until the daemon must have noticed: dpd_delay (plus up to a second of
# charon's timer granularity) + the lab's retransmissions (1 + 1.4 + 1.96 s), with room for
# a loaded machine. The default retransmission settings (5 tries, 4 s, base 1.8) would take
# about 165 s after the DPD request.
DETECT = 15.0
RECOVERY = 10.0  # seconds from the daemon noticing until the tunnel is back


@pytest.fixture
def daemon(lab: Lab) -> Iterator[ResolverDaemon]:
    """A private-policy daemon in alice with a short dpd_delay; bob's charon put back after."""
    clean_alice(lab)
    shutil.rmtree(lab.run_dir / "dpd-resolver", ignore_errors=True)
    d = ResolverDaemon(lab, "alice", name="dpd-resolver",
                       sections={"policy": {"default": "private", "max_ttl": 5},
                                 "provision": {"dpd_delay": DPD_DELAY}})
    d.start()
    try:
        yield d
    finally:
        d.stop()
        lab.start_charon("bob")  # a no-op unless the test left it stopped
        clean_alice(lab)


def conn_option(lab: Lab, prefix: str, key: str) -> set[str]:
    """The value of `key` that alice's charon lists for its conns starting with `prefix`."""
    with lab.vici("alice") as s:
        found = [c for entry in s.list_conns() for n, c in entry.items()
                 if n.startswith(prefix)]
    return {bytes(c.get(key, b"")).decode() for c in found}


def kill_charon(lab: Lab, host: str) -> None:
    """SIGKILL: charon sends nothing (no DELETE), its SAs just vanish; then reap it."""
    pid = int((lab.run_dir / "pids" / f"charon-{host}.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    lab.stop_charon(host)


def test_dead_peer_is_noticed_shunted_and_repaired(lab: Lab, daemon: ResolverDaemon) -> None:
    bob = lab.addr("bob")
    assert daemon.query("bob.example.test.").rcode() == dns.rcode.NOERROR, daemon.tail()
    assert installed(lab, "bob"), lab.child_states("alice")
    # what the daemon sent reached charon: the conn carries the configured DPD delay
    assert conn_option(lab, "isk-bob-", "dpd_delay") == {str(DPD_DELAY)}
    esp_ping(lab, bob, port="bob", count=2)
    before = ike_ids(lab, "bob")
    pid = daemon.proc.pid if daemon.proc is not None else None
    log = Log(daemon)

    # Every echo or echo reply between alice and bob in clear on bob's switch port is a leak
    # (the tunnel's are ESP-in-UDP); alice pings bob all along. (While bob's charon is away,
    # his kernel answers alice's ESP-in-UDP with "port 4500 unreachable": ICMP, no leak.)
    echoes = ["host", bob, "and", "(", "icmp[icmptype]", "==", "icmp-echo", "or",
              "icmp[icmptype]", "==", "icmp-echoreply", ")"]
    with Capture(lab.switch_ns, "v-bob", echoes) as cap:
        pinger = lab.popen("alice", ["ping", "-n", "-i", "0.2", "-W", "1", bob],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(0.6)  # some echoes through the tunnel first
            t0 = time.monotonic()
            kill_charon(lab, "bob")
            lab.start_charon("bob")  # back at once, holding none of the old SAs
            restarted = time.monotonic() - t0
            gone = f"tunnel to bob.example.test ({bob}) went down"
            wait_until(lambda: gone in log.since(), DETECT,
                       f"alice's daemon did not notice bob's charon restart within {DETECT:g} s",
                       0.05)
            noticed = time.monotonic() - t0
            back = waited(lambda: installed(lab, "bob") and bool(ike_ids(lab, "bob") - before),
                          RECOVERY, "bob's tunnel not back after DPD found the peer dead", 0.05)
            time.sleep(0.6)  # some echoes through the new tunnel
        finally:
            pinger.terminate()
            pinged, _ = pinger.communicate(timeout=5)
    said = log.since()
    print(f"\nbob's charon killed and started again in {restarted:.2f} s; alice's daemon "
          f"noticed {noticed:.2f} s after the kill (dpd_delay {DPD_DELAY} s + the lab's "
          f"retransmissions); tunnel back {back:.2f} s later")
    print(f"  the daemon said: {[ln for ln in said.splitlines() if 'bob' in ln][:3]}")
    print(f"  pings in clear on bob's port: {len(cap.lines)}")
    assert cap.lines == [], "\n".join(cap.lines[:20]) + "\n" + pinged[-2000:]
    # charon's event (ike-updown or child-updown, whichever the watch gets first), not an
    # audit's finding
    assert re.search(r"went down: charon reported its (IKE|CHILD)_SA", said), said
    # the same daemon throughout, answering over the new tunnel
    assert daemon.proc is not None and daemon.proc.pid == pid and daemon.proc.poll() is None
    reply = daemon.query("bob.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == [bob], reply
    assert conn_option(lab, "isk-bob-", "dpd_delay") == {str(DPD_DELAY)}
    esp_ping(lab, bob, port="bob", count=2)
