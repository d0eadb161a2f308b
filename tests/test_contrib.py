"""contrib/: the dhclient enter hook, sourced by /bin/sh as dhclient-script sources it, writes
the DHCP name servers where the resolver follows them (and never /etc/resolv.conf)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from resolver.config import HostPort, nameservers_in

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
HOOK = CONTRIB / "dhclient" / "enter-hooks.d" / "ipseckey-resolver"


def dhclient_script(forwarders: Path, **env: str) -> None:
    """What dhclient-script does with an enter hook: source it, call make_resolv_conf."""
    subprocess.run(["/bin/sh", "-c", '. "$1" && make_resolv_conf', "sh", str(HOOK)],
                   env={"PATH": "/usr/bin:/bin", "IPSECKEY_RESOLVER_FORWARDERS": str(forwarders),
                        "interface": "eth0", **env}, check=True, timeout=10)


def test_dhcp_name_servers_reach_the_followed_file_family_by_family(tmp_path: Path) -> None:
    out = tmp_path / "run" / "resolv.conf"
    listen = (HostPort("127.0.0.1"),)
    dhclient_script(out, reason="BOUND", new_domain_name_servers="198.51.100.1 198.51.100.2")
    assert nameservers_in(out.read_text(), listen) == (HostPort("198.51.100.1"),
                                                       HostPort("198.51.100.2"))
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    dhclient_script(out, reason="BOUND6", new_dhcp6_name_servers="2001:db8::53")
    assert nameservers_in(out.read_text(), listen) == (
        HostPort("198.51.100.1"), HostPort("198.51.100.2"), HostPort("2001:db8::53"))
    dhclient_script(out, reason="RENEW", new_domain_name_servers="203.0.113.53")
    assert nameservers_in(out.read_text(), listen) == (HostPort("2001:db8::53"),
                                                       HostPort("203.0.113.53"))
    before = out.read_text()
    dhclient_script(out, reason="PREINIT")  # not a lease: nothing changes
    assert out.read_text() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["resolv.conf"]  # no temp left

