"""Issue 14: the daemon installed with `make install` and run by a real systemd as PID 1.

A Debian bookworm container (lab/nspawn.py: systemd-nspawn over a cached debootstrapped tree)
shares alice's network namespace, so the service sees alice's addresses, the lab's Unbound and
alice's charon (its VICI socket is bind-mounted at /run/charon.vici, group ipseckey-vici, as
`charon { group = ipseckey-vici }` would make it). The project is installed into the container
by `make install DESTDIR=...`, then systemd-sysusers/tmpfiles and `systemctl enable --now`
run inside it, as after a package install. One container for the module, the checks in order:
each sandboxing option of the unit is in force and still lets the daemon do its work (bind
port 53 as a non-root user, XFRM over netlink, VICI over the group, state in /var/lib), reload
(a changed policy applied by `systemctl reload`), journald lines, and a hung event loop
restarted by the watchdog with its state back.

Run: `LAB_ID=d .venv/bin/python -m pytest -q tests/integration/test_systemd_service.py`
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from lab import Lab, nspawn
from tests.helpers import children, clean_alice, ede
from tests.integration.test_issue4_daemon import shunted

pytestmark = [pytest.mark.integration, pytest.mark.nspawn]

REPO = Path(__file__).resolve().parents[2]
UNIT = "ipseckey-resolver.service"
LIB = "/usr/local/lib/ipseckey-resolver"
EDE_NO_KEY = 28
EDE_BLOCKED = 15
WATCHDOG_SEC = 3
EXPOSURE = 1.7  # systemd-analyze security exposure score of the unit (0 best, 10 worst)


def config(lab: Lab) -> str:
    return f"""\
[server]
listen = ["127.0.0.1:53"]
[upstream]
servers = ["{lab.unbound_addr}"]
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["/etc/ipseckey-resolver/root.ds"]
[identity]
fqdn = "alice.example.test"
private_key = "/etc/ipseckey-resolver/host.pem"
addresses = ["{lab.addr('alice')}", "{lab.addr('alice', 6)}"]
[provision]
vici_socket = "unix:///run/charon.vici"
[policy]
default = "private"
[metrics]
listen = "127.0.0.1:9153"
[debug]
allow_hang = true
"""


class Service:
    def __init__(self, lab: Lab, box: nspawn.Container) -> None:
        self.lab, self.box = lab, box

    def sh(self, *argv: str, check: bool = True) -> str:
        return self.box.run(list(argv), check=check).stdout

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *extra: str) -> list[str]:
        return self.sh("journalctl", "--no-pager", "-u", UNIT, "-o", "cat", *extra).splitlines()

    def ask(self, name: str, rdtype: str = "A") -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=0)
        reply: dns.message.Message = self.lab.call_in(
            "alice", lambda: dns.query.udp(q, "127.0.0.1", timeout=8), 15)
        return reply

    def control(self, op: str, name: str | None = None) -> dict[str, object]:
        """A request on the control socket, from inside the container (root)."""
        code = (f"import json, sys; sys.path.insert(0, {LIB!r}); from pathlib import Path; "
                "from autosp.control import request; print(json.dumps(request(Path("
                f"'/run/ipseckey-resolver/control.sock'), {op!r}, name={name!r})))")
        result: dict[str, object] = json.loads(self.sh("python3", "-I", "-c", code))
        return result

    def wait_active(self, timeout: float = 30.0, other_than: str | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.show("ActiveState", "MainPID")
            if st.get("ActiveState") == "active" and st.get("MainPID") not in ("0",
                                                                              other_than):
                return st["MainPID"]
            time.sleep(0.2)
        raise AssertionError(f"{UNIT} not active: {self.show('ActiveState', 'Result')}\n"
                             + "\n".join(self.journal()[-30:]))


@pytest.fixture(scope="module")
def service(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not nspawn.is_built():
        pytest.fail(f"the container tree is not built ({nspawn.CACHE}): run "
                    "`.venv/bin/python -m lab.nspawn ensure` while no lab is up "
                    "(lab/setup.sh does)", pytrace=False)
    work = tmp_path_factory.mktemp("nspawn")
    vici = lab.vici_path("alice")
    box = nspawn.Container(work, lab.ns("alice"), binds=[(vici, "/run/charon.vici")])
    clean_alice(lab)
    box.mount()
    try:
        subprocess.run(["make", "-s", "install", f"DESTDIR={box.root}",
                        f"PIP_INSTALL_OPTS=--no-index --find-links {nspawn.wheels()}"],
                       cwd=REPO, check=True, capture_output=True, text=True, timeout=300)
        etc = box.root / "etc/ipseckey-resolver"
        (etc / "ipseckey-resolver.toml").write_text(config(lab))
        shutil.copy(lab.root_anchor_file, etc / "root.ds")
        shutil.copy(lab.private_key("alice"), etc / "host.pem")
        dropin = box.root / "etc/systemd/system" / f"{UNIT}.d"
        dropin.mkdir(parents=True)
        (dropin / "test.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n")
        box.boot()
        svc = Service(lab, box)
        svc.sh("systemd-sysusers")
        svc.sh("systemd-tmpfiles", "--create")
        svc.sh("chown", "ipseckey-resolver:", "/etc/ipseckey-resolver/host.pem")
        svc.sh("chmod", "0600", "/etc/ipseckey-resolver/host.pem")
        gid = int(svc.sh("getent", "group", "ipseckey-vici").split(":")[2])
        os.chown(vici, 0, gid)
        os.chmod(vici, 0o770)
        svc.sh("systemctl", "daemon-reload")
        yield svc
    finally:
        box.stop()
        clean_alice(lab)


def test_enable_start_reaches_active_as_its_own_user_with_two_capabilities(
        service: Service) -> None:
    service.sh("systemctl", "enable", "--now", UNIT)
    pid = service.wait_active()
    status = service.sh("cat", f"/proc/{pid}/status")
    fields = dict(line.split(":", 1) for line in status.splitlines())
    uid = service.sh("id", "-u", "ipseckey-resolver").strip()
    assert fields["Uid"].split()[0] == uid != "0"
    # CAP_NET_ADMIN (12) and CAP_NET_BIND_SERVICE (10), effective, and nothing else.
    assert int(fields["CapEff"], 16) == (1 << 12) | (1 << 10)
    assert int(fields["CapBnd"], 16) == (1 << 12) | (1 << 10)
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"  # SystemCallFilter / RestrictAddressFamilies
    assert service.show("Type")["Type"] == "notify"  # active means READY=1 was received
    assert "enabled" in service.sh("systemctl", "is-enabled", UNIT)
    verify = service.box.run(["systemd-analyze", "verify", "--man=no",  # no man-db here
                              f"/usr/local/lib/systemd/system/{UNIT}"], check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
    security = service.sh("systemd-analyze", "security", "--no-pager", UNIT)
    exposure = float(security.rsplit("exposure level for", 1)[1].split(":")[1].split()[0])
    assert exposure <= EXPOSURE, security  # "OK" is below 5; ours was measured at EXPOSURE


def test_lookup_tunnel_and_drop_shunt_work_inside_the_sandbox(service: Service) -> None:
    lab = service.lab
    reply = service.ask("bob.example.test.")
    assert reply.rcode() == dns.rcode.NOERROR, reply
    assert set(children(lab, "isk-bob-").values()) == {"INSTALLED"}  # VICI by group
    refused = service.ask("plain.example.test.")
    assert refused.rcode() == dns.rcode.SERVFAIL and ede(refused)[0] == EDE_NO_KEY
    assert lab.addr("plain") in shunted(lab)  # XFRM over netlink with CAP_NET_ADMIN
    added = service.control("add", "carol.example.test.")
    assert added["tunnel"] == "up", added
    # ReadWritePaths; both state files by default (the config names neither)
    state = service.sh("ls", "-l", "/var/lib/ipseckey-resolver")
    assert "endpoints.json" in state and "state.json" in state


def test_the_file_system_is_read_only_but_for_the_state(service: Service) -> None:
    """What ProtectSystem=strict etc. mean for the daemon, seen from inside its namespace."""
    pid = service.show("MainPID")["MainPID"]
    paths = ("/etc/ipseckey-resolver/x", "/usr/local/x", "/var/lib/ipseckey-resolver/x")
    probe = ("import os\n"
             f"for p in {paths!r}:\n"
             "    try:\n"
             "        open(p, 'w').close(); os.unlink(p); print(p, 'writable')\n"
             "    except OSError as e:\n"
             "        print(p, e.strerror)\n")
    # As root in the daemon's mount namespace: only a read-only mount stops root.
    out = service.sh("nsenter", "-t", pid, "-m", "python3", "-c", probe)
    assert "/etc/ipseckey-resolver/x Read-only file system" in out, out
    assert "/usr/local/x Read-only file system" in out, out
    assert "/var/lib/ipseckey-resolver/x writable" in out, out


def test_metrics_and_stats_from_the_service(service: Service) -> None:
    lab = service.lab

    def scrape() -> str:
        import urllib.request

        with urllib.request.urlopen("http://127.0.0.1:9153/metrics", timeout=5) as r:
            return str(r.read().decode())

    text = lab.call_in("alice", scrape)
    assert 'ipseckey_resolver_queries_total{type="A",rcode="NOERROR"}' in text
    assert "ipseckey_resolver_tunnels_up" in text
    stats = service.sh("/usr/local/sbin/autosp", "stats")
    assert 'ipseckey_resolver_endpoints{state="up"} 1' in stats


def test_reload_is_logged_and_the_daemon_keeps_running(service: Service) -> None:
    pid = service.show("MainPID")["MainPID"]
    service.sh("systemctl", "reload", UNIT)
    time.sleep(0.5)
    assert service.show("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    # The configuration is read again (resolver/service/reload.py); the file did not change.
    assert any("event=reload file=/etc/ipseckey-resolver/" in ln and
               ln.endswith(" changes=none") for ln in service.journal()), service.journal()


def ike_sas(lab: Lab) -> dict[str, str]:
    """Our IKE_SAs in alice's charon: conn name -> unique id (a re-established one changes)."""
    return {name: str(sa["uniqueid"]) for name, sa in lab.ike_sas("alice")
            if name.startswith("isk-")}


def test_systemctl_reload_applies_a_changed_policy_and_keeps_the_tunnels(
        service: Service) -> None:
    """The issue's "`systemctl reload` applies a changed policy": plain.example.test (no key,
    default private: EDE 28) is added to [policy] block in the installed file; after `systemctl
    reload` it is refused as blocked (EDE 15) by the same process, with bob's and carol's
    tunnels untouched; the file put back and reloaded again, it is EDE 28 again."""
    lab = service.lab
    conf = service.box.root / "etc/ipseckey-resolver/ipseckey-resolver.toml"
    original = conf.read_text()
    pid = service.show("MainPID")["MainPID"]
    assert ede(service.ask("plain.example.test."))[0] == EDE_NO_KEY
    sas = ike_sas(lab)
    assert any(n.startswith("isk-bob-") for n in sas) and \
        any(n.startswith("isk-carol-") for n in sas), sas

    def reload(needle: str) -> None:
        seen = len(service.journal())
        service.sh("systemctl", "reload", UNIT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if any(needle in ln for ln in service.journal()[seen:]):
                return
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not logged:\n" + "\n".join(service.journal()[-20:]))

    try:
        assert '[policy]\ndefault = "private"\n' in original
        conf.write_text(original.replace(
            '[policy]\ndefault = "private"\n',
            '[policy]\ndefault = "private"\nblock = ["plain.example.test."]\n'))
        reload('event=reload file=/etc/ipseckey-resolver/ipseckey-resolver.toml '
               'changes="[policy] block: (unset) -> [plain.example.test.]"')
        blocked = service.ask("plain.example.test.")
        assert blocked.rcode() == dns.rcode.SERVFAIL and ede(blocked)[0] == EDE_BLOCKED, blocked
        assert service.show("ActiveState", "MainPID") == {"ActiveState": "active",
                                                          "MainPID": pid}
        assert ike_sas(lab) == sas  # the same IKE_SAs: nothing torn down or re-established
        assert service.ask("bob.example.test.").rcode() == dns.rcode.NOERROR
        eps = service.control("list").get("endpoints")
        assert isinstance(eps, list) and [(e["name"], e["tunnel"]) for e in eps] == [
            ("carol.example.test.", "up")], eps
    finally:
        conf.write_text(original)
        reload('changes="[policy] block: [plain.example.test.] -> (unset)"')
    assert ede(service.ask("plain.example.test."))[0] == EDE_NO_KEY
    assert service.show("MainPID")["MainPID"] == pid and ike_sas(lab) == sas


def test_journal_lines_have_priorities_and_no_second_timestamp(service: Service) -> None:
    warnings = service.journal("-p", "warning")
    assert any(ln.startswith("resolver.capture: event=refused name=plain.example.test.")
               for ln in warnings), warnings
    every = service.journal()
    ours = [ln for ln in every if ln.startswith("resolver")]
    assert ours and not any(ln[:4].isdigit() for ln in ours)  # no "2026-..." of our own


def test_hung_event_loop_is_restarted_by_the_watchdog_and_state_comes_back(
        service: Service) -> None:
    lab = service.lab
    before = service.show("MainPID", "NRestarts")
    bob_before = {n: s for n, s in children(lab, "isk-bob-").items()}
    assert service.control("debug-hang") == {"hanging": 300}
    t0 = time.monotonic()
    pid = service.wait_active(timeout=WATCHDOG_SEC + 20, other_than=before["MainPID"])
    took = time.monotonic() - t0
    after = service.show("NRestarts", "Result")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert any("atchdog timeout" in ln for ln in service.sh(
        "journalctl", "--no-pager", "-u", UNIT).splitlines())
    assert took < WATCHDOG_SEC + 15
    assert pid != before["MainPID"]
    # State back: the pinned endpoint is restored and its tunnel adopted, bob's tunnel kept.
    deadline = time.monotonic() + 15
    listing: dict[str, object] = {}
    while time.monotonic() < deadline:
        listing = service.control("list")
        eps = listing.get("endpoints")
        if isinstance(eps, list) and eps and eps[0].get("tunnel") == "up":
            break
        time.sleep(0.3)
    eps = listing.get("endpoints")
    assert isinstance(eps, list) and [e["name"] for e in eps] == ["carol.example.test."]
    assert eps[0]["tunnel"] == "up", listing
    assert set(children(lab, "isk-carol-").values()) == {"INSTALLED"}
    assert children(lab, "isk-bob-") == bob_before
    assert service.ask("bob.example.test.").rcode() == dns.rcode.NOERROR
