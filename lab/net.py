"""Network namespaces, links, routes and processes of one lab instance.

Theory of operation: every name the lab creates starts with the instance prefix
(`isk-`, or `isk<LAB_ID>-`), so a crashed run can be cleaned up from the namespace names alone.
Each instance has its own switch namespace holding the bridge, so two instances can use the same
addresses side by side. The host namespace only ever gets blackhole routes for the lab prefixes,
shared by all instances: added by the first `up`, removed by the last `down`.

All commands are argv lists (`ip`, `sysctl`); nothing is built from a string.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from lab.topology import BLACKHOLE_PREFIXES, HOSTS, Host

NETNS_DIR = Path("/run/netns")
# `ip netns exec NS` bind-mounts every file in /etc/netns/NS/ over the same name in /etc/.
NETNS_ETC = Path("/etc/netns")
ESP_PROBE = "espprobe"  # suffix of the scratch namespace `kernel_esp_error` uses
SWITCH = "sw"  # the switch namespace's suffix; no host may use this name
BRIDGE = "br0"
_CLONE_NEWNET = 0x40000000
# Any instance's switch namespace: the lab is "up" somewhere while one of these exists.
_SWITCH_RE = re.compile(r"^isk[A-Za-z0-9]*-" + SWITCH + "$")

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab operation failed; the message says which command and why."""


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a command, returning stdout; raise LabError with stderr if it fails and check."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip_batch(ns: str | None, lines: Iterable[str]) -> None:
    """Run `ip -batch` (inside `ns` when given): one process for many link/addr/route changes.

    The lines are fixed templates filled with names and addresses from lab/topology.py only.
    """
    argv = ["ip", "-n", ns, "-batch", "-"] if ns else ["ip", "-batch", "-"]
    text = "".join(f"{line}\n" for line in lines)
    proc = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise LabError(f"ip -batch in {ns or 'host'}: {proc.stderr.strip()}\n{text}")


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the machine."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def create(prefix: str, hosts: Iterable[Host]) -> None:
    """Create the switch and every host namespace, with links, addresses and routes."""
    hosts = list(hosts)
    sw = prefix + SWITCH
    for name in [sw, *(prefix + h.name for h in hosts)]:
        run(["ip", "netns", "add", name])
        # Before any interface exists, so every interface inherits it: no duplicate address
        # detection (addresses, link-local ones included, are usable at once and do not change
        # flags a second later, which charon would announce with MOBIKE) and no router
        # solicitations (there is no router; they are only noise in captures).
        in_netns(name, lambda: set_sysctls({
            "net/ipv6/conf/all/accept_dad": "0",
            "net/ipv6/conf/default/accept_dad": "0",
            "net/ipv6/conf/default/router_solicitations": "0",
        }))
    sw_lines = [
        "link set lo up",
        f"link add {BRIDGE} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
        f"link set {BRIDGE} up",
    ]
    for h in hosts:
        if h.on_lan:
            port = f"v-{h.name}"[:15]
            sw_lines += [
                f"link add {port} type veth peer name eth0 netns {prefix + h.name}",
                f"link set {port} master {BRIDGE} up",
            ]
    ip_batch(sw, sw_lines)
    done_links: set[frozenset[str]] = set()
    for h in hosts:
        for link in h.links:
            pair = frozenset((h.name, link.peer))
            if pair in done_links:
                continue
            done_links.add(pair)
            other = next(x for x in HOSTS[link.peer].links if x.peer == h.name)
            ip_batch(
                prefix + h.name,
                [f"link add {link.ifname} type veth peer name {other.ifname} "
                 f"netns {prefix + link.peer}"],
            )
    for h in hosts:
        ns = prefix + h.name
        lines = ["link set lo up"]
        if h.on_lan:
            lines += [
                f"addr add {h.v4}/24 dev eth0",
                # nodad: usable at once, no 1-2 s wait for duplicate address detection.
                f"addr add {h.v6}/64 dev eth0 nodad",
                "link set eth0 up",
            ]
        for link in h.links:
            lines += [
                f"addr add {link.v4} dev {link.ifname}",
                f"addr add {link.v6} dev {link.ifname} nodad",
                f"link set {link.ifname} up",
            ]
        for r in h.routes:
            lines.append(f"route add {r.prefix} via {r.via}")
        ip_batch(ns, lines)
        if h.forwarding:
            in_netns(ns, lambda: set_sysctls({"net/ipv4/ip_forward": "1",
                                              "net/ipv6/conf/all/forwarding": "1"}))


def set_sysctls(values: dict[str, str]) -> None:
    """Write /proc/sys entries; network ones apply to the calling thread's namespace."""
    for key, value in values.items():
        Path("/proc/sys", key).write_text(value)


def delete(names: Iterable[str]) -> None:
    """Delete the given namespaces (their veths go with them)."""
    for name in names:
        run(["ip", "netns", "del", name], check=False)


def etc_netns_dirs(prefix: str) -> list[Path]:
    """This instance's /etc/netns/<prefix><host> directories (files `ip netns exec` mounts)."""
    try:
        return sorted(p for p in NETNS_ETC.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def remove_etc_netns(prefix: str) -> None:
    """Delete this instance's /etc/netns/<prefix>* directories (also after a crashed run).

    /etc/netns itself stays (another instance may be creating its directory right now).
    """
    for path in etc_netns_dirs(prefix):
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def kernel_esp_error(prefix: str) -> str | None:
    """None if the kernel can hold an ESP SA; else why not (`ip xfrm state add` stderr).

    Adds one ESP state (AES-CBC + HMAC-SHA256, tunnel mode) in a scratch namespace that is
    deleted at once; nothing is sent. On a kernel without ESP the add fails.
    """
    ns = prefix + ESP_PROBE
    run(["ip", "netns", "del", ns], check=False)
    run(["ip", "netns", "add", ns])
    try:
        proc = subprocess.run(
            ["ip", "-n", ns, "xfrm", "state", "add", "src", "198.51.100.1", "dst", "198.51.100.2",
             "proto", "esp", "spi", "0x1000", "mode", "tunnel",
             "enc", "cbc(aes)", "0x" + "11" * 16, "auth-trunc", "hmac(sha256)", "0x" + "22" * 32,
             "128"],
            capture_output=True, text=True, timeout=10, check=False)
    finally:
        run(["ip", "netns", "del", ns], check=False)
    if proc.returncode == 0:
        return None
    return proc.stderr.strip() or f"exit {proc.returncode}"


def other_instances_up(own_switch: str) -> bool:
    """True when a lab instance other than ours has its switch namespace."""
    return any(_SWITCH_RE.match(n) and n != own_switch for n in list_namespaces())


def add_blackholes() -> None:
    """Blackhole the lab prefixes in the host namespace (an existing route is left alone)."""
    for prefix in BLACKHOLE_PREFIXES:
        fam = "-6" if ":" in prefix else "-4"
        proc = subprocess.run(
            ["ip", fam, "route", "add", "blackhole", prefix],
            capture_output=True, text=True, timeout=10, check=False,
        )
        if proc.returncode != 0 and "File exists" not in proc.stderr:
            raise LabError(f"blackhole {prefix}: {proc.stderr.strip()}")


def remove_blackholes() -> None:
    """Remove the blackhole routes (only routes of type blackhole are deleted)."""
    for prefix in BLACKHOLE_PREFIXES:
        fam = "-6" if ":" in prefix else "-4"
        run(["ip", fam, "route", "del", "blackhole", prefix], check=False)


def blackholes_present() -> list[str]:
    """The lab prefixes that currently have a blackhole route in the host namespace."""
    out = run(["ip", "-4", "route", "show", "type", "blackhole"]) + run(
        ["ip", "-6", "route", "show", "type", "blackhole"]
    )
    present = {line.split()[1] for line in out.splitlines() if len(line.split()) > 1}
    return [p for p in BLACKHOLE_PREFIXES if p in present]


def netns_inodes(names: Iterable[str]) -> set[int]:
    """Inode numbers of the given namespaces (how /proc/PID/ns/net identifies them)."""
    out = set()
    for n in names:
        try:
            out.add(os.stat(NETNS_DIR / n).st_ino)
        except OSError:
            pass
    return out


def pids_in(inodes: set[int]) -> list[int]:
    """PIDs of live (non-zombie) processes whose network namespace is one of `inodes`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes and not is_zombie(int(entry)):
                found.append(int(entry))
        except OSError:
            continue
    return found


def is_zombie(pid: int) -> bool:
    """True if `pid` is a zombie (or gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    """The argv of a process, or [] if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def kill_all(pids: Iterable[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is still alive after `grace` seconds."""
    pids = [p for p in set(pids) if p > 1]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(not is_zombie(p) for p in pids):
        time.sleep(0.02)
    for p in pids:
        if not is_zombie(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """Call `fn` in a worker thread that has joined network namespace `ns`.

    Only the worker thread switches (setns acts per thread for network namespaces), so sockets
    `fn` opens live inside the lab and the caller's thread stays in its own namespace. If the
    switch fails `fn` is never called: a lab packet cannot start from the host namespace.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise LabError(f"call inside {ns} did not finish within {timeout} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
