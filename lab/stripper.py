"""A forwarder that strips DNSSEC, as hotel and home routers do, run in a lab host.

`python -m lab.stripper --listen ADDR --upstream ADDR --mode-file FILE` listens on ADDR:53
(UDP and TCP) and forwards every query, flags untouched, to the upstream (the lab Unbound).
What it hands back depends on the first word of FILE, read for every query so a test changes
the router's behaviour without restarting it:

  pass    the upstream's reply as it is (a repaired router);
  strip   the reply without RRSIG, NSEC and NSEC3 records, in every section (a DNSSEC-unaware
          proxy: the answer is right, the proof is gone);
  drop    nothing at all (a router whose resolver died);
  refuse  REFUSED.

`Stripper(lab, host)` runs it in a lab host for tests and benches (`mode` writes the file).
Why Python and not a second Unbound or BIND: both pass RRSIGs on to a DO=1 client even with
validation off, so neither strips; this is what a stripping middlebox does, in 80 lines.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

from lab.net import LabError, poll, stop_process
from lab.probes import python_argv

if TYPE_CHECKING:
    from lab.core import Lab

_DNSSEC = (dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3)
MODES = ("pass", "strip", "drop", "refuse")


def rewrite(query: dns.message.Message, reply: dns.message.Message, mode: str
            ) -> dns.message.Message | None:
    """What the router hands back in `mode` (None: nothing)."""
    if mode == "drop":
        return None
    if mode == "refuse":
        refused = dns.message.make_response(query)
        refused.set_rcode(dns.rcode.REFUSED)
        return refused
    if mode == "strip":
        for section in ("answer", "authority", "additional"):
            setattr(reply, section, [r for r in getattr(reply, section)
                                     if r.rdtype not in _DNSSEC])
    return reply


class Proxy:
    def __init__(self, upstream: str, mode_file: Path) -> None:
        self.upstream, self.mode_file = upstream, mode_file

    def mode(self) -> str:
        try:
            words = self.mode_file.read_text().split()
        except OSError:
            return "pass"
        return words[0] if words and words[0] in MODES else "pass"

    async def answer(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        mode = self.mode()
        if query.question:  # the log shows which queries came this way (tests read it)
            q = query.question[0]
            print(f"{mode} {q.name.to_text().lower()} {dns.rdatatype.to_text(q.rdtype)}",
                  flush=True)
        try:
            ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
            reply = await ask(query, self.upstream, timeout=3)
        except (dns.exception.DNSException, OSError):
            return None
        out = rewrite(query, reply, mode)
        return None if out is None else out.to_wire(max_size=65535 if tcp else 1232)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        async def reply() -> None:
            out = await self.proxy.answer(data, tcp=False)
            if out is not None:
                self.transport.sendto(out, addr)

        asyncio.get_running_loop().create_task(reply())


async def serve(listen: str, upstream: str, mode_file: Path) -> None:
    proxy = Proxy(upstream, mode_file)

    async def tcp_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(2), "big")
                out = await proxy.answer(await reader.readexactly(n), tcp=True)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Udp(proxy), local_addr=(listen, 53))
    server = await asyncio.start_server(tcp_client, listen, 53)
    async with server:
        await server.serve_forever()


class Stripper:
    """The proxy running in lab host `host`, on its lab address, in front of the lab Unbound."""

    def __init__(self, lab: Lab, host: str = "dave", mode: str = "strip") -> None:
        self.lab, self.host = lab, host
        self.address = lab.addr(host)
        self.dir = lab.run_dir / f"{host}-stripper"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode_file = self.dir / "mode"
        self.log = self.dir / "stripper.log"
        self.log.unlink(missing_ok=True)  # queries() reads this run's only
        self.mode = mode
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def mode(self) -> str:
        """What the router does now (see the module docstring)."""
        return self.mode_file.read_text().strip()

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode {value!r}: one of {', '.join(MODES)}")
        tmp = self.mode_file.with_suffix(".tmp")
        tmp.write_text(value + "\n")
        tmp.replace(self.mode_file)

    def start(self) -> Stripper:
        argv = python_argv("-m", "lab.stripper", "--listen", self.address, "--upstream",
                           self.lab.unbound_addr, "--mode-file", str(self.mode_file))
        with open(self.log, "ab") as out:
            self.proc = self.lab.popen(self.host, argv, stdout=out, stderr=out,
                                       stdin=subprocess.DEVNULL)
        proc = self.proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise LabError(f"stripper exited {proc.returncode}: {self.log.read_text()}")
            ss = self.lab.exec(self.host, ["ss", "-lnu", "sport", "= :53"], check=False)
            return self.address in ss.stdout

        if not poll(listening, 10, 0.05):
            raise LabError(f"stripper did not listen: {self.log.read_text()}")
        return self

    def queries(self) -> list[tuple[str, str, str]]:
        """(mode, name, type) of every query received so far, in order."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [(w[0], w[1], w[2]) for w in (line.split() for line in text.splitlines())
                if len(w) == 3 and w[0] in MODES]

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, 5)

    def __enter__(self) -> Stripper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description="A DNSSEC-stripping forwarder for the lab.")
    p.add_argument("--listen", required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--mode-file", type=Path, required=True)
    args = p.parse_args()
    asyncio.run(serve(args.listen, args.upstream, args.mode_file))


if __name__ == "__main__":
    main()
