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
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode

from lab.core import Lab
from lab.net import LabError
from resolver.configtable import toml_value

REPO = Path(__file__).resolve().parent.parent


class ResolverDaemon:
    """`ipseckey-resolver` in lab host `host`, listening on 127.0.0.1:`port` there.

    `sections` overrides or adds configuration tables ({"policy": {"default": "private"}}).
    """

    def __init__(self, lab: Lab, host: str = "alice", *, port: int = 53,
                 sections: Mapping[str, Mapping[str, Any]] | None = None,
                 name: str | None = None) -> None:
        self.lab, self.host, self.port = lab, host, port
        self.dir = lab.run_dir / (name or f"{host}-resolver")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config = self.dir / "resolver.toml"
        self.log = self.dir / "resolver.log"
        self.control = self.dir / "control.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        tables: dict[str, dict[str, Any]] = {
            "server": {"listen": [f"127.0.0.1:{port}"]},
            "upstream": {"servers": [lab.unbound_addr]},
            "dnssec": {"builtin_root_anchors": False,
                       "trust_anchor_files": [str(lab.root_anchor_file)]},
            "identity": {"fqdn": f"{host}.example.test",
                         "private_key": str(lab.private_key(host)),
                         "addresses": [lab.addr(host), lab.addr(host, 6)]},
            "provision": {"backend": "vici", "vici_socket": lab.vici_socket(host),
                          "state_file": str(self.dir / "provision.json")},
            "policy": {"default": "private-or-clear"},
            "control": {"socket": str(self.control),
                        "state_file": str(self.dir / "endpoints.json")},
        }
        for table, values in (sections or {}).items():
            tables.setdefault(table, {}).update(values)
        lines: list[str] = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
            lines.append("")
        self.config.write_text("\n".join(lines))

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until it answers (raises LabError with its log if not)."""
        argv = [sys.executable, "-m", "resolver", "--config", str(self.config)]
        env = ["env", f"PYTHONPATH={REPO}"]
        with open(self.log, "ab") as logf:
            self.proc = self.lab.popen(self.host, [*env, *argv], stdout=logf, stderr=logf,
                                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"resolver exited {self.proc.returncode}:\n{self.tail()}")
            if self._answers():
                return
            time.sleep(0.1)
        raise LabError(f"resolver did not answer within {timeout:g} s:\n{self.tail()}")

    def _answers(self) -> bool:
        query = dns.message.make_query("example.test.", "SOA")

        def ask() -> bool:
            try:
                reply = dns.query.udp(query, "127.0.0.1", port=self.port, timeout=0.5)
            except (OSError, dns.exception.Timeout):
                return False
            return reply.rcode() in (dns.rcode.NOERROR, dns.rcode.SERVFAIL)

        return bool(self.lab.call_in(self.host, ask))

    def query(self, qname: str, rdtype: str, *, timeout: float = 10.0,
              want_dnssec: bool = False) -> dns.message.Message:
        """Ask the daemon from inside its host (never from the host namespace)."""
        q = dns.message.make_query(qname, rdtype, want_dnssec=want_dnssec)

        def ask() -> dns.message.Message:
            return dns.query.udp(q, "127.0.0.1", port=self.port, timeout=timeout)

        result: dns.message.Message = self.lab.call_in(self.host, ask)
        return result

    def kill9(self) -> None:
        """SIGKILL, as a crash would (no clean shutdown, state files as they were)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
        self.proc = None

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
