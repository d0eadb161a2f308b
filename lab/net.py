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
import ipaddress
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from lab.topology import BLACKHOLE_PREFIXES, CHARON_TABLE, HOSTS, Host

NETNS_DIR = Path("/run/netns")
# `ip netns exec NS` bind-mounts every file in /etc/netns/NS/ over the same name in /etc/.
NETNS_ETC = Path("/etc/netns")
ESP_PROBE = "espprobe"  # suffix of the scratch namespace `kernel_esp_error` uses
SWITCH = "sw"  # the switch namespace's suffix; no host may use this name
BRIDGE = "br0"
# The interface (one end of a veth pair, both ends down) holding a host's traffic-selector
# anchors (Host.ts_anchors), and the priority of the rules that keep the protected nets
# routed by the main table, ahead of charon's rule (CHARON_TABLE).
ANCHOR_IF = "tsa0"
ANCHOR_RULE_PREF = CHARON_TABLE - 20
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
        lines += anchor_lines(h)
        ip_batch(ns, lines)
        unlocal_anchors(ns, h)
        for rule in anchor_rules(h):
            run(["ip", "-n", ns, *rule])
        if h.forwarding:
            in_netns(ns, lambda: set_sysctls({"net/ipv4/ip_forward": "1",
                                              "net/ipv6/conf/all/forwarding": "1"}))


def anchor_lines(h: Host) -> list[str]:
    """`ip -batch` lines giving `h` its traffic-selector anchors (none if it has none).

    Why: a gateway that protects single hosts is asked for CHILD_SAs whose local TS is just
    the host (srv's /32). kernel-libipsec in strongSwan 5.9.8 installs the TUN route for such
    an SA with a *local* source address inside the local TS and fails the CHILD_SA when there
    is none ("error installing route with policy 203.0.113.21/32 === ... out"; fixed upstream
    in 5.9.12, commit 190d8cbe, which installs the route without a source). So the anchor
    addresses go on a dedicated interface that stays down, where charon's address list finds
    them (it lists down and ignored interfaces too), while the kernel must not treat them as
    its own:
      * their `local` routes leave the local table (`unlocal_anchors`): gw forwards srv's
        traffic instead of delivering it, answers no ARP/ND for srv, and accepts srv's
        packets as not martian;
      * IPv4 needs a route source to be local in the route's table or the local table, so
        the `local` route moves to charon's table; a rule ahead of charon's sends everything
        for the protected nets (local_ts) to the main table, so that entry is never used
        for forwarding (IPv6 only wants the address assigned);
      * IPv4 anchors get scope site (never picked as a source by the kernel, still listed by
        charon); an IPv6 anchor would win source selection for its own address ("same
        address" rule), so the main table gets a host route with the link's own source.
    The protected traffic itself is unchanged: srv's replies to a peer leave gw only through
    the TUN route charon installs (table 220), i.e. ESP-encapsulated.
    """
    if not h.ts_anchors:
        return []
    lines = [f"link add {ANCHOR_IF} type veth peer name {ANCHOR_IF}p"]
    for anchor in h.ts_anchors:
        iface = ipaddress.ip_interface(anchor)
        ip = iface.ip
        if ip.version == 4:
            lines += [f"addr add {anchor} dev {ANCHOR_IF} scope site",
                      f"route add local {ip} dev {ANCHOR_IF} table {CHARON_TABLE}"]
        else:
            link = next(lk for lk in h.links
                        if ip in ipaddress.ip_interface(lk.v6).network)
            lines += [f"addr add {anchor} dev {ANCHOR_IF} nodad noprefixroute",
                      f"route add {ip}/128 dev {link.ifname} "
                      f"src {ipaddress.ip_interface(link.v6).ip}"]
    return lines


def unlocal_anchors(ns: str, h: Host, timeout: float = 3.0) -> None:
    """Delete the local-table routes of `h`'s anchors (see `anchor_lines`).

    The kernel adds an IPv4 address's local route at once, an IPv6 one from addrconf's work
    queue a moment later (measured: the delete right after `addr add` failed in about half
    of the runs with "No such process"), so wait for each route (bounded) before deleting it.
    """
    for anchor in h.ts_anchors:
        ip = str(ipaddress.ip_interface(anchor).ip)
        fam = "-6" if ":" in ip else "-4"
        show = ["ip", "-n", ns, fam, "route", "show", "table", "local", "exact", ip]
        deadline = time.monotonic() + timeout
        while not run(show).strip():
            if time.monotonic() > deadline:
                raise LabError(f"{ns}: no local route for anchor {ip} after {timeout} s")
            time.sleep(0.005)
        run(["ip", "-n", ns, fam, "route", "del", "local", ip, "dev", ANCHOR_IF,
             "table", "local"])


def anchor_rules(h: Host) -> list[list[str]]:
    """`ip rule` argv tails for `h`'s anchors (`ip -batch` cannot set the family per line)."""
    if not h.ts_anchors:
        return []
    return [["-6" if ":" in prefix else "-4", "rule", "add", "to", prefix, "lookup", "main",
             "pref", str(ANCHOR_RULE_PREF)] for prefix in h.local_ts]


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
    _signal(pids, signal.SIGTERM)
    poll(lambda: all(is_zombie(p) for p in pids), grace, 0.02)
    _signal([p for p in pids if not is_zombie(p)], signal.SIGKILL)


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass  # gone already


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> int | None:
    """SIGTERM a child we started and reap it; SIGKILL it if it is still there after `grace`
    seconds. Returns its exit status, or None when it had to be killed (it ignored SIGTERM)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
        return None


def poll(check: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Call `check` until it returns something truthy or `timeout` seconds have passed; returns
    its last result (falsy on a timeout, for callers that assert on what is left)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """`poll`, and LabError("<what> after <timeout> s") when `check` never came true."""
    result = poll(check, timeout, interval)
    if not result:
        raise LabError(f"{what} after {timeout:g} s")
    return result


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
