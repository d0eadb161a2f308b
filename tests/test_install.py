"""`make install-files` / `make uninstall` into a DESTDIR, the unit's contents, and the manual
pages: they build without groff warnings and carry every option --help shows.

(The full `make install`, with the Python dependencies, is exercised under a real systemd in
tests/integration/test_systemd_service.py.)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from autosp.cli import build_parser as autosp_parser
from resolver import manpage
from resolver.cli import build_parser as resolver_parser

REPO = Path(__file__).resolve().parent.parent
INSTALLED = {
    "usr/local/sbin/ipseckey-resolver", "usr/local/sbin/autosp",
    "usr/local/lib/systemd/system/ipseckey-resolver.service",
    "usr/local/lib/tmpfiles.d/ipseckey-resolver.conf",
    "usr/local/lib/sysusers.d/ipseckey-resolver.conf",
    "usr/local/share/man/man8/ipseckey-resolver.8", "usr/local/share/man/man8/autosp.8",
    "usr/local/share/man/man5/ipseckey-resolver.toml.5",
    "etc/ipseckey-resolver/ipseckey-resolver.toml",
}


def make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_install_and_uninstall_in_a_destdir(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    r = make("install-files", f"DESTDIR={dest}")
    assert r.returncode == 0, r.stdout + r.stderr
    got = files(dest)
    assert INSTALLED <= got
    assert {f for f in got - INSTALLED
            if not f.startswith("usr/local/lib/ipseckey-resolver/")} == set()
    lib = dest / "usr/local/lib/ipseckey-resolver"
    assert (lib / "resolver/cli.py").is_file() and (lib / "autosp/cli.py").is_file()
    assert not list(lib.rglob("__pycache__"))
    wrapper = (dest / "usr/local/sbin/ipseckey-resolver").read_text()
    assert wrapper.startswith("#!/usr/bin/python3 -I\n")
    assert '"/usr/local/lib/ipseckey-resolver"' in wrapper  # the final path, not DESTDIR
    assert "from resolver.__main__ import main\n" in wrapper  # holds SIGHUP before imports
    assert os.access(dest / "usr/local/sbin/autosp", os.X_OK)
    unit = (dest / "usr/local/lib/systemd/system/ipseckey-resolver.service").read_text()
    assert "ExecStart=/usr/local/sbin/ipseckey-resolver --config " \
           "/etc/ipseckey-resolver/ipseckey-resolver.toml\n" in unit
    assert "@" not in unit.split("[Service]")[1].split("SupplementaryGroups")[0]
    # A changed configuration survives both a second install and the uninstall.
    conf = dest / "etc/ipseckey-resolver/ipseckey-resolver.toml"
    conf.write_text(conf.read_text() + "\n[log]\nlevel = \"debug\"\n")
    assert make("install-files", f"DESTDIR={dest}").returncode == 0
    assert "level = \"debug\"" in conf.read_text()
    r = make("uninstall", f"DESTDIR={dest}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert files(dest) == {"etc/ipseckey-resolver/ipseckey-resolver.toml"}
    assert "keeping the changed" in r.stdout
    # An unchanged one goes with the rest.
    assert make("install-files", f"DESTDIR={dest}").returncode == 0
    conf.write_text((REPO / "contrib/ipseckey-resolver.toml").read_text())
    assert make("uninstall", f"DESTDIR={dest}").returncode == 0
    assert files(dest) == set()


def test_unit_asks_for_what_the_issue_lists() -> None:
    unit = (REPO / "contrib/systemd/ipseckey-resolver.service.in").read_text()
    options = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            options[key] = value
    assert options["Type"] == "notify" and options["WatchdogSec"]
    assert options["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert options["Before"] == "nss-lookup.target" and options["Wants"] == "nss-lookup.target"
    assert "strongswan.service" in options["After"]
    # Ordering only: the daemon starts without charon and connects when it appears.
    assert not any("strongswan" in options.get(k, "")
                   for k in ("Wants", "Requires", "Requisite", "BindsTo", "PartOf"))
    assert options["User"] == "ipseckey-resolver"
    assert set(options["CapabilityBoundingSet"].split()) == {"CAP_NET_BIND_SERVICE",
                                                             "CAP_NET_ADMIN"}
    assert options["AmbientCapabilities"] == options["CapabilityBoundingSet"]
    assert options["ProtectSystem"] == "strict" and options["NoNewPrivileges"] == "yes"
    assert set(options["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET",
                                                               "AF_INET6", "AF_NETLINK"}
    assert options["PrivateTmp"] == "yes"
    tmpfiles = (REPO / "contrib/tmpfiles.d/ipseckey-resolver.conf").read_text()
    for path in options["ReadWritePaths"].split():  # each exists before the service starts
        assert re.search(rf"^d {re.escape(path)}\s+0700 ipseckey-resolver ", tmpfiles, re.M)
    sysusers = (REPO / "contrib/sysusers.d/ipseckey-resolver.conf").read_text()
    assert re.search(r"^u ipseckey-resolver ", sysusers, re.M)
    assert re.search(rf"^g {options['SupplementaryGroups']} ", sysusers, re.M)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                out += _options(sub)
    return out


@pytest.mark.parametrize("page", ["ipseckey-resolver.8", "autosp.8", "ipseckey-resolver.toml.5"])
def test_man_pages_build_without_warnings(tmp_path: Path, page: str) -> None:
    (path,) = manpage.write(tmp_path, [page])
    groff = shutil.which("groff")
    assert groff, "groff missing (Debian: groff-base)"
    r = subprocess.run([groff, "-man", "-ww", "-z", "-Tutf8", str(path)], capture_output=True,
                       text=True, timeout=30, check=False, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = subprocess.run([groff, "-man", "-Tutf8", "-P-cbou", str(path)], capture_output=True,
                          text=True, timeout=30, check=True, env={**os.environ,
                                                                  "LC_ALL": "C.UTF-8"}).stdout
    flat = " ".join(text.replace("\u2010", "-").replace("\u2212", "-").split())
    if page == "ipseckey-resolver.8":
        parser = resolver_parser()
    elif page == "autosp.8":
        parser = autosp_parser()
    else:
        for table in ("[server]", "[upstream]", "[provision]", "[policy]", "[control]",
                      "[metrics]"):
            assert table in flat, table
        return
    for option in _options(parser):  # generated from the same parser: nothing can drift
        assert option in flat, option
    description = " ".join((parser.description or "").split())
    assert description[:60] in flat
