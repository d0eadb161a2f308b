"""A Debian bookworm tree booted by systemd-nspawn: a real systemd as PID 1 for the service tests.

The machine's own PID 1 is not systemd, so `systemctl` has nothing to talk to here. What works
(measured: boot to `running` in about 1 s):

    systemd-nspawn -D TREE --boot --register=no --keep-unit ...

`--keep-unit` and `--register=no` because there is no host systemd or machined to ask for a
scope; without them nspawn fails with "Failed to open system bus". The cgroup hierarchy is
hybrid (v1 controllers + v2 "unified"), which systemd 252 in the container accepts.

The tree is built once from Debian's packages with debootstrap and cached outside the checkout
(`CACHE`, default /var/cache/ipseckey-resolver): `rootfs/` (minbase + systemd, dbus, python3,
iproute2) and `wheels/` (the project's Python dependencies as wheels, for an offline
`make install` into it). Both need the package registries, which are unreachable while any
lab is up (the lab blackholes the prefix they resolve to): lab/setup.sh builds them, and
`ensure()` rebuilds them when missing or when the package list here changed.

Each test boots a fresh copy-on-write view of the tree (an overlay mount: the cached tree is
the lower layer), installs the project into it with `make install DESTDIR=...`, and throws the
upper layer away afterwards. `python -m lab.nspawn build` builds the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from lab.net import LabError

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ISK_NSPAWN_CACHE", "/var/cache/ipseckey-resolver"))
SUITE: Final = "bookworm"
MIRROR = os.environ.get("ISK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES: Final = ("systemd", "systemd-sysv", "dbus", "python3", "iproute2", "procps")
FORMAT: Final = "1"  # bump when the build itself changes


def dependencies() -> list[str]:
    """The project's runtime dependencies, from pyproject.toml."""
    with open(REPO / "pyproject.toml", "rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def _stamp(*parts: str) -> str:
    return hashlib.sha256("\n".join([FORMAT, *parts]).encode()).hexdigest()[:16]


def rootfs() -> Path:
    return CACHE / "rootfs"


def wheels() -> Path:
    return CACHE / "wheels"


def _rootfs_stamp() -> str:
    return _stamp(SUITE, *PACKAGES)


def _wheels_stamp() -> str:
    return _stamp(*dependencies())


def _current(directory: Path, stamp: str) -> bool:
    f = directory / ".isk-stamp"
    return f.exists() and f.read_text().strip() == stamp


def is_built() -> bool:
    return _current(rootfs(), _rootfs_stamp()) and _current(wheels(), _wheels_stamp())


def build_rootfs() -> None:
    """Debootstrap the tree (needs Debian's registry: no lab up).

    Raises:
        LabError: a tool is missing or the download failed (with its output).
    """
    for tool in ("debootstrap", "systemd-nspawn"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            raise LabError(f"{tool} missing: run lab/setup.sh (Debian packages debootstrap, "
                           "systemd-container)")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / "rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
          str(tmp), MIRROR], "debootstrap", timeout=900)
    (tmp / "etc/hostname").write_text("isk-service-test\n")
    # No login prompt on the console: nothing reads it, and it only adds to the boot.
    for unit in (tmp / "etc/systemd/system/getty.target.wants").glob("*"):
        unit.unlink()
    shutil.rmtree(rootfs(), ignore_errors=True)
    tmp.rename(rootfs())
    (rootfs() / ".isk-stamp").write_text(_rootfs_stamp() + "\n")


def build_wheels() -> None:
    """The project's dependencies as wheels (needs PyPI: no lab up), for `make install`
    with PIP_INSTALL_OPTS="--no-index --find-links WHEELS".

    Raises:
        LabError: the download or a build failed.
    """
    tmp = CACHE / "wheels.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
          "--wheel-dir", str(tmp), *dependencies()], "pip wheel", timeout=600)
    shutil.rmtree(wheels(), ignore_errors=True)
    tmp.rename(wheels())
    (wheels() / ".isk-stamp").write_text(_wheels_stamp() + "\n")


def ensure(log: Any = sys.stderr) -> None:
    """Build what is missing or outdated (the tree, the wheels)."""
    t0 = time.monotonic()
    if not _current(rootfs(), _rootfs_stamp()):
        build_rootfs()
        print(f"nspawn: built {rootfs()} ({time.monotonic() - t0:.0f} s)", file=log)
    if not _current(wheels(), _wheels_stamp()):
        build_wheels()
        print(f"nspawn: built {wheels()}", file=log)


def _run(argv: Sequence[str], what: str, timeout: float) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                       check=False)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        raise LabError(f"{what} failed (exit {r.returncode}; the package registries are "
                       f"unreachable while any lab is up):\n{tail}")


class Container:
    """A booted copy-on-write container of the cached tree, in network namespace `netns`.

    Args:
        workdir: where the overlay's upper layer, its mount point and the console log live.
        netns: /run/netns name of a lab host: the container shares its network (lo, its
            addresses, its routes), as a service on that host would.
        binds: (host path, container path) bind mounts, e.g. a VICI socket.
    """

    def __init__(self, workdir: Path, netns: str, binds: Sequence[tuple[Path, str]] = ()
                 ) -> None:
        self.workdir = workdir
        self.netns = netns
        self.binds = list(binds)
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._mounted = False

    def mount(self) -> None:
        """The overlay: cached tree below, a fresh writable layer above."""
        for d in ("upper", "work", "root"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        opts = (f"lowerdir={rootfs()},upperdir={self.workdir / 'upper'},"
                f"workdir={self.workdir / 'work'}")
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)], "overlay mount",
             timeout=30)
        self._mounted = True

    def boot(self, timeout: float = 120.0) -> None:
        """Start systemd in the tree and wait until it reports running (or degraded)."""
        argv = ["systemd-nspawn", "--directory", str(self.root), "--boot", "--register=no",
                "--keep-unit", "--console=passive", "--machine", f"isk-{os.getpid()}",
                f"--network-namespace-path=/run/netns/{self.netns}",
                "--capability=CAP_NET_ADMIN"]
        argv += [f"--bind={host}:{inside}" for host, inside in self.binds]
        with open(self.console, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        state = "(no manager yet)"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.tail()}")
            if self.leader is None:
                kids = _children(self.proc.pid)
                self.leader = kids[0] if kids else None
            if self.leader is not None:
                r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = r.stdout.strip() or r.stderr.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        jobs = ""
        if self.leader is not None:
            jobs = self.run(["systemctl", "list-jobs", "--no-pager"], check=False).stdout
        raise LabError(f"the container did not boot within {timeout:g} s (state {state}):\n"
                       f"{jobs}\n{self.tail()}")

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces, as root)."""
        if self.leader is None:
            raise LabError("the container is not running")
        r = subprocess.run(["nsenter", "-t", str(self.leader), "-a", *argv],
                           capture_output=True, text=True, timeout=timeout, input=input,
                           check=False)
        if check and r.returncode != 0:
            raise LabError(f"in the container: {' '.join(argv)}: exit {r.returncode}\n"
                           f"{r.stdout}{r.stderr}")
        return r

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no console log)"

    def stop(self) -> None:
        """Shut the container down (SIGTERM: systemd halts), then unmount the overlay."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = self.leader = None
        if self._mounted:
            subprocess.run(["umount", str(self.root)], check=False, capture_output=True)
            self._mounted = False


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["build"]:
        build_rootfs()
        build_wheels()
        return 0
    if args == ["ensure"]:
        ensure()
        return 0
    if args == ["status"]:
        print(f"{rootfs()}: {'built' if is_built() else 'missing or outdated'}")
        return 0
    print("usage: python -m lab.nspawn build|ensure|status", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
