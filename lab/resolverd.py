"""The real `ipseckey-resolver` daemon running inside a lab host, for the demo and the tests.

Writes a configuration for the host (upstream = the lab Unbound, trust anchor = the lab root,
identity = the host's FQDN and the private key behind its IPSECKEY, provisioning over the host's
charon VICI socket), starts `python -m resolver` inside the host's namespace with `ip netns exec`,
and waits until it answers a query. Everything it writes lives under the lab's run directory, so
`lab down` removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.rcode

from lab.core import Lab
from lab.net import LabError, poll, stop_process
from lab.probes import python_argv
from resolver.configtable import toml_value


class ResolverDaemon:
    """`ipseckey-resolver` in lab host `host`, listening on 127.0.0.1:`port` there.

    `sections` overrides or adds configuration tables ({"policy": {"default": "private"}}); a
    key set to None is left out (`{"upstream": {"servers": None}}`: follow resolv_conf).
    With `tunnels=False` it is a plain validating resolver: only [server], [upstream],
    [dnssec] and [control] (its socket answers `autosp upstream` only: no identity, no
    provisioning, no policy). `[upstream] mode` is the daemon's default (auto), its probe
    asks for the lab's `test.` DS.
    """

    def __init__(self, lab: Lab, host: str = "alice", *, port: int = 53,
                 sections: Mapping[str, Mapping[str, Any]] | None = None,
                 name: str | None = None, tunnels: bool = True,
                 own_session: bool = False) -> None:
        self.lab, self.host, self.port = lab, host, port
        # A session of its own is a scheduling group of its own (the kernel's autogroups),
        # as a systemd service has its own cgroup: benchmarks ask for it, so that the daemon
        # does not share its CPU with the benchmark's own clients.
        self.own_session = own_session
        self.dir = lab.run_dir / (name or f"{host}-resolver")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config = self.dir / "resolver.toml"
        self.log = self.dir / "resolver.log"
        self.control = self.dir / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        tables: dict[str, dict[str, Any]] = {
            "server": {"listen": [f"127.0.0.1:{port}"]},
            "upstream": {"servers": [lab.unbound_addr], "probe_ds": "test."},
            "dnssec": {"builtin_root_anchors": False,
                       "trust_anchor_files": [str(lab.root_anchor_file)]},
            "control": {"socket": str(self.control)},
        }
        if tunnels:
            tables.update({
                "identity": {"fqdn": f"{host}.example.test",
                             "private_key": str(lab.private_key(host)),
                             "addresses": [lab.addr(host), lab.addr(host, 6)]},
                "provision": {"backend": "vici", "vici_socket": lab.vici_socket(host),
                              "state_file": str(self.dir / "provision.json")},
                "policy": {"default": "private-or-clear"},
                "control": {"socket": str(self.control),
                            "state_file": str(self.dir / "endpoints.json")},
            })
        for table, values in (sections or {}).items():
            tables.setdefault(table, {}).update(values)
        self.tables = tables
        self.write_config()

    def write_config(self, tables: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """(Re)write the configuration file from `tables` (default: this daemon's)."""
        lines: list[str] = []
        for table, values in (tables or self.tables).items():
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None)
            lines.append("")
        self.config.write_text("\n".join(lines))

    def hup(self) -> None:
        """SIGHUP: the daemon reloads its configuration file."""
        if self.proc is None or self.proc.poll() is not None:
            raise LabError("resolver not running")
        os.kill(self.proc.pid, signal.SIGHUP)

    def upstream(self) -> dict[str, Any]:
        """`autosp upstream`'s data: the daemon's upstream mode, path and reason."""
        from autosp.control import request

        result: dict[str, Any] = request(self.control, "upstream", 5.0)
        return result

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until it answers (raises LabError with its log if not)."""
        argv = python_argv("-m", "resolver", "--config", str(self.config))
        with open(self.log, "ab") as logf:
            self.proc = self.lab.popen(self.host, argv, stdout=logf, stderr=logf,
                                       stdin=subprocess.DEVNULL,
                                       start_new_session=self.own_session)
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise LabError(f"resolver exited {proc.returncode}:\n{self.tail()}")
            try:
                reply = self.query("example.test.", "SOA", timeout=0.5)
            except (OSError, dns.exception.Timeout):
                return False
            return reply.rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)

        if not poll(answers, timeout, 0.1):
            raise LabError(f"resolver did not answer within {timeout:g} s:\n{self.tail()}")
        control = self.tables.get("control")
        if control is not None and control.get("enabled", True) and "socket" in control:
            self._wait_started(proc, timeout)

    def _wait_started(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Wait for the end of start-up step 5: other than A/AAAA queries are answered from
        step 4 on, but reconcile (the tunnel worker's start, charon, XFRM) comes after, and
        the control socket only then (a stale socket file of a killed run refuses)."""
        from autosp.control import request
        from autosp.errors import ResolverUnreachable

        def started() -> bool:
            if proc.poll() is not None:
                raise LabError(f"resolver exited {proc.returncode}:\n{self.tail()}")
            try:
                request(Path(self.tables["control"]["socket"]), "list", 1.0)
            except ResolverUnreachable:
                return False
            except Exception:  # it answered (a refusal is an answer): started
                return True
            return True

        if not poll(started, timeout, 0.05):
            raise LabError(f"resolver did not finish starting within {timeout:g} s:\n"
                           f"{self.tail()}")

    def query(self, qname: str, rdtype: str = "A", *, timeout: float = 8.0,
              dnssec: bool = False) -> dns.message.Message:
        """Ask the daemon from inside its host (never from the host namespace); EDNS on, so a
        SERVFAIL carries its Extended DNS Error."""
        return self.lab.query(self.host, qname, rdtype, server="127.0.0.1", port=self.port,
                              dnssec=dnssec, timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown, state files as they were)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit within 10 s. Returns its exit status
        (None: it had to be killed, or was not running)."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, 10)

    def tail(self, n: int = 40) -> str:
        """The last lines of the daemon's log (for failure messages)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> ResolverDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
