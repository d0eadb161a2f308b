"""Packet captures on the lab wire (tcpdump inside the switch namespace).

A capture in the switch namespace sees what travels between hosts, exactly as an observer on
the LAN would: the test of "ESP, no cleartext" looks here, never at the hosts' own stacks.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from lab.net import LabError


@dataclass
class Capture:
    """`with Capture(ns, iface) as cap: ...` then `cap.lines` (tcpdump -n text, one per packet).

    tcpdump prints "listening on" once its filter is attached; entering waits for it (bounded),
    so no packet sent inside the block is missed.
    """

    ns: str
    iface: str
    bpf: list[str] = field(default_factory=list)  # e.g. ["host", "198.51.100.11"]
    lines: list[str] = field(default_factory=list)
    _proc: subprocess.Popen[str] | None = None
    _err: list[str] = field(default_factory=list)

    def __enter__(self) -> Capture:
        argv = ["ip", "netns", "exec", self.ns, "tcpdump", "-n", "-l", "--immediate-mode",
                "-i", self.iface, *self.bpf]
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        ready = threading.Event()
        out, err = self._proc.stdout, self._proc.stderr
        assert out is not None and err is not None

        def read_err() -> None:
            for line in err:
                self._err.append(line.rstrip("\n"))
                if "listening on" in line:
                    ready.set()
            ready.set()  # tcpdump ended

        def read_out() -> None:
            for line in out:
                if line.strip():
                    self.lines.append(line.rstrip("\n"))

        threading.Thread(target=read_err, daemon=True).start()
        self._reader = threading.Thread(target=read_out, daemon=True)
        self._reader.start()
        if not ready.wait(10) or self._proc.poll() is not None:
            self._stop()
            raise LabError(f"tcpdump did not start: {' '.join(self._err)}")
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        time.sleep(0.1)  # let the last replies reach the wire and the reader
        self._stop()

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        if hasattr(self, "_reader"):
            self._reader.join(5)

    def matching(self, *needles: str) -> list[str]:
        """Captured lines that contain every needle."""
        return [line for line in self.lines if all(n in line for n in needles)]

    def esp(self, src: str, dst: str) -> list[str]:
        """ESP packets from `src` to `dst` (IPv4 or IPv6), UDP-encapsulated or not.

        libipsec always sends ESP-in-UDP ("A.4500 > B.4500: UDP-encap: ESP(...)"); kernel ESP
        without NAT is plain protocol 50 ("A > B: ESP(...)"). Both count.
        """
        pat = re.compile(rf"(?:^|\s){re.escape(src)}(?:\.\d+)? > {re.escape(dst)}(?:\.\d+)?: "
                         r"(?:UDP-encap: )?ESP\(")
        return [line for line in self.lines if pat.search(line)]

    def cleartext_icmp(self) -> list[str]:
        """ICMP/ICMPv6 packets seen in clear (any of them means traffic escaped the tunnel)."""
        return self.matching("ICMP")


@dataclass(frozen=True)
class WirePing:
    """A ping from one lab host and what the wire carried meanwhile (`Lab.ping_on_wire`)."""

    returncode: int
    output: str  # ping's stdout + stderr
    src: str  # the pinging host's address
    dst: str  # the far end of the path: the target, or the gateway in front of it
    count: int  # echoes sent
    capture: Capture

    @property
    def esp_out(self) -> list[str]:
        """ESP packets src -> dst."""
        return self.capture.esp(self.src, self.dst)

    @property
    def esp_back(self) -> list[str]:
        """ESP packets dst -> src."""
        return self.capture.esp(self.dst, self.src)

    @property
    def cleartext(self) -> list[str]:
        """ICMP seen in clear (any of it means traffic escaped the tunnel)."""
        return self.capture.cleartext_icmp()

    def esp_only(self) -> bool:
        """The ping got through and every echo and reply crossed the wire as ESP, none in clear
        (at least `count` ESP packets each way)."""
        return (self.returncode == 0 and len(self.esp_out) >= self.count
                and len(self.esp_back) >= self.count and not self.cleartext)

    def report(self) -> str:
        """Ping's output and the capture, for failure messages."""
        return f"ping ({self.src} -> {self.dst}):\n{self.output}\nwire:\n" + "\n".join(
            self.capture.lines)
