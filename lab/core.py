"""The Lab object: bring the whole lab up and down, and run things inside it.

Theory of operation: one instance of the lab is identified by LAB_ID (env, default empty):
namespaces `isk<LAB_ID>-<host>`, state directory /work/main/.lab<LAB_ID> (env LAB_DIR
overrides). The state directory holds keys/ (a cache kept across runs: zone keys, TSIG key, host
private keys) and run/ (everything of one run: zone files, configs, logs, pid files, sockets;
removed by `down`).

The ESP data path is LAB_ESP (env) or the `esp` argument: "libipsec" (default; userland ESP in
charon, works on kernels without ESP) or "kernel" (kernel ESP; `up` refuses it with a clear
message when the kernel cannot hold an ESP SA).

Preloaded peers or bare charons. By default every charon gets its host key and one responder
conn per other lab peer (the lab configures every responder by hand, so that tests of the
initiator need no daemon on the far end). With `preload=False` (env LAB_PRELOAD=0) the charons
get only their own key and settings, as on hosts that run nothing but ipseckey-resolver: a peer
that should accept a tunnel runs the daemon (lab/resolverd.py), whose responder learns the
initiator from DNS. `bare(*hosts)` switches a running lab's hosts to that mode for a block (what
the responder tests use); it also drops every credential charon holds (`clear-creds`), because
a key loaded once stays trusted after its conn is unloaded (lab-notes, "Careful 1").

`up` = down if stale, host keys, namespaces + blackholes, sign zones, start every daemon at
once, then wait for each to be ready (bounded). `down` kills the processes it recorded and any
process still living in one of the instance's namespaces, deletes the namespaces and the
instance's /etc/netns/<ns> directories (per-host resolv.conf), removes the blackholes unless
another instance is up, and deletes run/. It only needs names and run/, so it also cleans up
after a crashed run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rdatatype

from lab import dns as labdns
from lab import ike, keys, net
from lab.net import LabError, poll
from lab.probes import Probes
from lab.topology import HOSTS, PEERS, UNBOUND, ZONES, Host, Signing

REPO = Path(__file__).resolve().parent.parent
_LAB_ID_RE = re.compile(r"^[a-z0-9]{0,4}$")
READY_TIMEOUT = 15.0


class CommandFailed(subprocess.CalledProcessError):
    """A command run inside the lab failed; str() includes its output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\nstdout: {(self.stdout or '').strip()}\n"
                f"stderr: {(self.stderr or '').strip()}")


# Machine-wide record of which process owns a lab prefix (namespaces are machine-wide).
OWNERS_DIR = Path("/run/ipseckey-lab")

class Lab(Probes):
    """One lab instance. See the module docstring; all methods need root.

    What tests and demos do inside a running lab (ping, capture, dig, charon's SAs, DNS
    updates) is in the base class, lab/probes.py.
    """

    def __init__(self, lab_id: str | None = None, state_dir: Path | None = None,
                 esp: str | None = None, preload: bool | None = None) -> None:
        self.lab_id = os.environ.get("LAB_ID", "") if lab_id is None else lab_id
        if not _LAB_ID_RE.match(self.lab_id):
            raise LabError(f"LAB_ID must be 0-4 lowercase letters/digits, got {self.lab_id!r}")
        self.esp = esp or os.environ.get("LAB_ESP") or ike.ESP_LIBIPSEC
        if self.esp not in ike.ESP_MODES:
            raise LabError(f"LAB_ESP must be one of {', '.join(ike.ESP_MODES)}, got {self.esp!r}")
        self.prefix = f"isk{self.lab_id}-"
        env_dir = os.environ.get("LAB_DIR")
        self.state_dir = state_dir or (Path(env_dir) if env_dir else REPO / f".lab{self.lab_id}")
        self.keys_dir = self.state_dir / "keys"
        self.run_dir = self.state_dir / "run"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        if preload is None:
            preload = os.environ.get("LAB_PRELOAD", "1") not in ("0", "no", "false")
        # Hosts whose charon gets only its own key (see the module docstring).
        self._bare: set[str] = set() if preload else set(PEERS)

    # --- names and paths ---------------------------------------------------------------

    def ns(self, host: str) -> str:
        """The namespace name of a lab host."""
        if host != net.SWITCH and host not in HOSTS:
            raise LabError(f"unknown lab host {host!r} (hosts: {', '.join(HOSTS)})")
        return self.prefix + host

    @property
    def switch_ns(self) -> str:
        """The namespace holding the bridge (capture here to see the wire)."""
        return self.prefix + net.SWITCH

    def namespaces(self) -> list[str]:
        """This instance's namespaces that exist now."""
        return [n for n in net.list_namespaces() if n.startswith(self.prefix)]

    def addr(self, host: str, family: int = 4) -> str:
        """A host's lab address (after `move`, the new one)."""
        h = HOSTS[host]
        if family == 4:
            return str(self._state().get("moved", {}).get(host, h.v4))
        if family == 6:
            return h.v6
        raise ValueError(f"family must be 4 or 6, got {family}")

    def private_key(self, host: str) -> Path:
        """PKCS#8 PEM of the private key behind the host's IPSECKEY (kept across runs)."""
        if HOSTS[host].key is None:
            raise LabError(f"{host} has no IPSECKEY key")
        return self.keys_dir / f"{host}.pem"

    def public_key(self, host: str) -> keys.PublicKey:
        """The public half of the key behind the host's IPSECKEY."""
        return self._host_key(host).public_key()

    def public_key_pem(self, host: str) -> str:
        """SubjectPublicKeyInfo PEM of the host's key (what charon takes in `pubkeys`)."""
        return keys.spki_pem(self.public_key(host))

    def charon_dir(self, host: str) -> Path:
        """Directory of a host's charon: strongswan.conf, charon.log, charon.vici."""
        return self.run_dir / f"charon-{host}"

    def vici_path(self, host: str) -> Path:
        """Filesystem path of the host's VICI socket."""
        return self.charon_dir(host) / "charon.vici"

    def vici_socket(self, host: str) -> str:
        """URI of the host's VICI socket, e.g. for `swanctl --uri`."""
        return f"unix://{self.vici_path(host)}"

    @property
    def root_anchor_file(self) -> Path:
        """The lab root's DS, one line in BIND/Unbound format."""
        return self.run_dir / "unbound" / "root.ds"

    @property
    def unbound_addr(self) -> str:
        """Address of the lab's validating recursive (the resolver's upstream)."""
        return UNBOUND.v4

    @property
    def unbound_conf(self) -> Path:
        """Unbound's config file (for unbound-control -c)."""
        return self.run_dir / "unbound" / "unbound.conf"

    @property
    def tsig_keyfile(self) -> Path:
        """TSIG key (tsig-keygen format) accepted for example.test updates."""
        return self.keys_dir / "ddns.key"

    # --- running things inside ---------------------------------------------------------

    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 30, check: bool = True,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside a lab host's namespace and capture its output.

        Raises:
            CommandFailed: the command exited non-zero and `check` is set.
        """
        full = ["ip", "netns", "exec", self.ns(host), *argv]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def popen(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside a lab host's namespace (caller waits/kills it)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], **kw)

    def resolv_conf_path(self, host: str) -> Path:
        """The file `ip netns exec` bind-mounts over /etc/resolv.conf for programs in `host`."""
        return net.NETNS_ETC / self.ns(host) / "resolv.conf"

    def set_resolv_conf(self, host: str, text: str) -> None:
        """Make programs started in `host` by `exec`/`popen` see `text` as /etc/resolv.conf.

        `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf in the
        mount namespace it makes for each command, so this takes effect for every command
        started afterwards; running processes (charon, started at `up`) keep the file they saw.
        `call_in`/`query` switch only the network namespace and do not see it. `down` removes
        the file (also after a crash).
        """
        path = self.resolv_conf_path(host)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") else text + "\n")

    def clear_resolv_conf(self, host: str) -> None:
        """Undo `set_resolv_conf`: commands in `host` see the machine's /etc/resolv.conf again."""
        path = self.resolv_conf_path(host)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass  # gone already, or holds another override

    @contextmanager
    def tunnel(self, host: str, name: str, peer_addr: str, peer_id: str, peer_spki: str, *,
               remote_ts: list[str] | None = None,
               local_addr: str | None = None) -> Iterator[dict[str, str]]:
        """Load an initiator conn in `host`'s charon, initiate it, and close it afterwards.

        Yields the CHILD_SA states of `host` once `name` is INSTALLED. On exit the IKE_SA is
        terminated before the conn is unloaded (unload alone keeps an established SA).

        Raises:
            LabError: the initiate failed or the CHILD_SA did not install.
        """
        conn = ike.initiator_conn(name, HOSTS[host], peer_addr, peer_id,
                                  self.public_key_pem(host), peer_spki, remote_ts=remote_ts,
                                  local_addr=local_addr)
        try:
            with self.vici(host) as s:
                s.load_conn(conn)
                ike.initiate(s, name, name)
                states = ike.child_states(s)
            if states.get(name) != "INSTALLED":
                raise LabError(f"{host}: CHILD_SA {name} is {states.get(name)}, not INSTALLED")
            yield states
        finally:
            with self.vici(host) as s:
                ike.close(s, name)

    def call_in(self, host: str, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Call fn in a thread inside the host's network namespace (sockets open there)."""
        return net.in_netns(self.ns(host), fn, timeout)

    def query(self, host: str, qname: str, rdtype: str | dns.rdatatype.RdataType, *,
              server: str | None = None, port: int = 53,
              dnssec: bool = True, cd: bool = False, timeout: float = 3.0,
              tcp: bool = False) -> dns.message.Message:
        """Send one DNS query (EDNS on, so SERVFAILs carry their EDE) from inside `host`
        (default server: the lab Unbound)."""
        q = dns.message.make_query(qname, rdtype, want_dnssec=dnssec, use_edns=0)
        if cd:
            q.flags |= dns.flags.CD
        where = server or self.unbound_addr

        def ask() -> dns.message.Message:
            if tcp:
                return dns.query.tcp(q, where, port=port, timeout=timeout)
            return dns.query.udp_with_fallback(q, where, port=port, timeout=timeout)[0]

        return net.in_netns(self.ns(host), ask, timeout + 5)

    def unbound_control(self, *args: str) -> str:
        """Run unbound-control on the lab Unbound (unix socket; no network from the host)."""
        return net.run(["unbound-control", "-c", str(self.unbound_conf), *args])

    def flush(self, name: str | None = None) -> None:
        """Forget cached answers in the lab Unbound (one zone, or everything)."""
        if name is None:
            self.unbound_control("flush_zone", ".")
        else:
            self.unbound_control("flush_zone", name)
        self.unbound_control("flush_bogus")
        self.unbound_control("flush_negative")

    def move(self, host: str, new_v4: str) -> None:
        """Change a LAN host's IPv4 address (as if it had moved); DNS is not updated.

        The host's charon notices at once and keeps accepting new IKE_SAs on the new address
        (responder conns match by identity). SAs made with the old address stay bound to it
        (MOBIKE is off in the lab, see lab/ike.py) and carry nothing any more: a test that moves
        a responder closes its old conn and initiates a new one to the new address; an initiator
        that moved re-authenticates by itself unless its conn pinned `local_addr`.
        """
        h = HOSTS[host]
        if not h.on_lan:
            raise LabError(f"{host} is not on the LAN")
        old = self.addr(host)
        net.ip_batch(self.ns(host), [f"addr del {old}/24 dev eth0",
                                     f"addr add {new_v4}/24 dev eth0"])
        state = self._state()
        state.setdefault("moved", {})[host] = new_v4
        self._save_state(state)

    # --- up / down -----------------------------------------------------------------------

    def up(self) -> float:
        """Bring the whole lab up; returns the seconds it took. Cleans up after itself on error."""
        _require_root()
        t0 = time.monotonic()
        self._refuse_if_owned()
        if self.run_dir.exists() or self.namespaces() or net.etc_netns_dirs(self.prefix):
            self.down()
        if self.esp == ike.ESP_KERNEL:
            why = net.kernel_esp_error(self.prefix)
            if why is not None:
                raise LabError(
                    f"LAB_ESP=kernel, but this kernel cannot hold an ESP SA "
                    f"(`ip xfrm state add ... proto esp` in a scratch namespace: {why}); "
                    f"use LAB_ESP={ike.ESP_LIBIPSEC} (userland ESP in charon) on this machine")
        try:
            self._up()
        except BaseException as exc:
            detail = self._log_tails()
            self.down()
            if isinstance(exc, LabError) and detail:
                raise LabError(f"{exc}\n--- daemon logs ---\n{detail}") from exc
            raise
        return time.monotonic() - t0

    def _up(self) -> None:
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        # The state dir hides itself from git (.lab<ID> need not be in .gitignore).
        (self.state_dir / ".gitignore").write_text("*\n")
        self.run_dir.mkdir()
        (self.run_dir / "pids").mkdir()
        self._save_state({"lab_id": self.lab_id, "prefix": self.prefix, "esp": self.esp,
                          "started": time.time(),
                          "owner": os.getpid(), "owner_argv": net.cmdline(os.getpid())})
        pubkeys = {h: self._host_key(h).public_key() for h in HOSTS if HOSTS[h].key}
        net.create(self.prefix, HOSTS.values())
        net.add_blackholes()
        now = datetime.datetime.now(datetime.UTC)
        build = labdns.build(self.keys_dir, self.run_dir, pubkeys, int(time.time()), now)
        labdns.check_unbound_conf(build.unbound_conf)
        for server, conf in build.named_confs.items():
            self._spawn(f"named-{server}", server, labdns.named_argv(conf),
                        conf.parent / "named.log")
        self._spawn("unbound", "unbound", labdns.unbound_argv(build.unbound_conf),
                    build.unbound_conf.parent / "unbound.log")
        for host in PEERS:
            self._spawn_charon(host)
        for server, conf in build.named_confs.items():
            self._wait_log(f"named-{server}", conf.parent / "named.log", "running")
        self._wait_log("unbound", build.unbound_conf.parent / "unbound.log", "start of service")
        for host in PEERS:
            self._load_charon(host)
        self._wait_signed()

    def _refuse_if_owned(self) -> None:
        """Refuse to rebuild an instance that a live process (e.g. a pytest session) brought up.

        `python -m lab up` exits right away, so its instance can be rebuilt at will; a test
        session keeps running, and pulling the lab from under it would fail its tests in
        confusing ways. `down` is not guarded: an explicit down is always obeyed.
        """
        # Namespaces are machine-wide, state dirs are per checkout: a second checkout (a git
        # worktree) with the same LAB_ID would otherwise find "our" namespaces and take them
        # down from under the first one's tests. So the owner is also recorded by prefix.
        for state in (self._state(), self._global_owner()):
            owner, argv = state.get("owner"), state.get("owner_argv")
            if (isinstance(owner, int) and owner != os.getpid() and argv
                    and net.cmdline(owner) == argv and not net.is_zombie(owner)):
                where = state.get("state_dir", str(self.state_dir))
                raise LabError(
                    f"lab instance {self.prefix}* is in use by pid {owner} "
                    f"({' '.join(argv)[:80]}; state {where}); "
                    "set LAB_ID to a short tag (e.g. LAB_ID=p) for a private instance, "
                    "or run `python -m lab down` first")

    def down(self) -> float:
        """Remove everything this instance made (except the key cache); returns seconds taken."""
        _require_root()
        t0 = time.monotonic()
        names = self.namespaces()
        pids = set(self._recorded_pids())
        pids.update(net.pids_in(net.netns_inodes(names)))
        net.kill_all(pids, grace=0.5)
        for p in self._procs.values():
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        net.delete(names)
        net.remove_etc_netns(self.prefix)
        if not net.other_instances_up(self.switch_ns):
            net.remove_blackholes()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self._global_owner().get("state_dir") == str(self.state_dir):
            (OWNERS_DIR / f"{self.prefix}owner.json").unlink(missing_ok=True)
        return time.monotonic() - t0

    def status(self) -> str:
        """A human-readable summary: namespaces, daemons, blackholes."""
        esp = self._state().get("esp", self.esp)
        lines = [f"lab {self.lab_id or '(default)'}: state {self.state_dir}, ESP data path {esp}"]
        names = self.namespaces()
        lines.append(f"namespaces ({len(names)}): {' '.join(names) or '-'}")
        for name, pid in sorted(self._recorded().items()):
            alive = "running" if self._is_ours(pid[0], pid[1]) else "DEAD"
            lines.append(f"  {name:<20} pid {pid[0]:<8} {alive}")
        overrides = [p.name for p in net.etc_netns_dirs(self.prefix)]
        if overrides:
            lines.append(f"/etc/netns overrides: {' '.join(overrides)}")
        lines.append(f"blackholes: {' '.join(net.blackholes_present()) or '-'}")
        return "\n".join(lines)

    def is_up(self) -> bool:
        """True if this instance's namespaces and all its daemons exist."""
        rec = self._recorded()
        return bool(self.namespaces()) and bool(rec) and all(
            self._is_ours(p, exe) for p, exe in rec.values())

    def pids(self) -> list[int]:
        """PIDs of processes living in this instance's namespaces."""
        return net.pids_in(net.netns_inodes(self.namespaces()))

    # --- charon ------------------------------------------------------------------------

    def start_charon(self, host: str) -> None:
        """Start the host's charon (if not running) and load its key and responder conns."""
        if HOSTS[host].key is None or not HOSTS[host].charon:
            raise LabError(f"{host} runs no charon")
        rec = self._recorded().get(f"charon-{host}")
        if rec and self._is_ours(*rec):
            return
        self._spawn_charon(host)
        self._load_charon(host)

    def stop_charon(self, host: str) -> None:
        """Stop the host's charon (its SAs and TUN routes go with it)."""
        name = f"charon-{host}"
        rec = self._recorded().get(name)
        if rec and self._is_ours(*rec):
            net.kill_all([rec[0]], grace=2.0)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout=5)
        (self.run_dir / "pids" / f"{name}.pid").unlink(missing_ok=True)
        self.vici_path(host).unlink(missing_ok=True)

    def vici(self, host: str, timeout: float = 10.0) -> Any:
        """A context manager giving a VICI session to the host's charon."""
        return ike.session(self.vici_path(host), timeout)

    def is_bare(self, host: str) -> bool:
        """Whether `host`'s charon holds only its own key (no preloaded peers)."""
        return host in self._bare

    @contextmanager
    def bare(self, *hosts: str) -> Iterator[None]:
        """`hosts`' charons (default: every peer) hold only their own key inside the block: every
        conn and SA gone, every credential dropped (`clear-creds`), the key loaded again. On
        the way out they are wiped the same way and get their preloaded peers back (unless the
        lab was brought up bare)."""
        hosts = hosts or PEERS
        was = {h for h in hosts if h in self._bare}
        for h in hosts:
            self._bare.add(h)
            self._reload_charon(h)
        try:
            yield
        finally:
            for h in hosts:
                if h not in was:
                    self._bare.discard(h)
                self._reload_charon(h)

    def wipe_charon(self, host: str) -> None:
        """Every SA, conn and credential of `host`'s charon gone, then its key (and, unless
        bare, its preloaded peers) loaded again: a clean slate between tests, without a
        restart."""
        self._reload_charon(host)

    def _reload_charon(self, host: str) -> None:
        """Wipe a running charon (SAs, conns, credentials) and load it as `_load_charon` would."""
        with ike.session(self.vici_path(host), READY_TIMEOUT) as s:
            for name in ike.conn_names(s):
                ike.close(s, name)
            for sa in ike.list_sas(s):  # SAs of conns unloaded by someone else
                for ike_sa in sa.values():
                    ike.terminate_id(s, str(ike_sa.get("uniqueid")))
            s.clear_creds()
        self._load_charon(host)

    def _spawn_charon(self, host: str) -> None:
        cdir = self.charon_dir(host)
        (cdir / "run").mkdir(parents=True, exist_ok=True)
        (cdir / "strongswan.conf").write_text(ike.strongswan_conf(cdir, self.esp))
        self.vici_path(host).unlink(missing_ok=True)
        self._spawn(f"charon-{host}", None, ike.charon_argv(self.ns(host), cdir),
                    cdir / "charon.out")

    def _load_charon(self, host: str) -> None:
        spkis = {p: self.public_key_pem(p) for p in PEERS}
        der = keys.pkcs8_der(self._host_key(host))
        log = self.charon_dir(host) / "charon.log"
        if not poll(lambda: self._check_alive(f"charon-{host}", log)
                    or self.vici_path(host).exists(), READY_TIMEOUT, 0.01):
            raise LabError(f"charon-{host}: no VICI socket after {READY_TIMEOUT} s")
        with ike.session(self.vici_path(host), READY_TIMEOUT) as s:
            if host in self._bare:
                s.load_key({"type": "any", "data": der})
            else:
                ike.load_host(s, HOSTS[host], der, spkis)

    # --- internals ---------------------------------------------------------------------

    def _host_key(self, host: str) -> keys.PrivateKey:
        kind = HOSTS[host].key
        if kind is None:
            raise LabError(f"{host} has no IPSECKEY key")
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        return keys.load_or_create(self.keys_dir / f"{host}.pem", kind)

    def _spawn(self, name: str, host: str | None, argv: list[str], log: Path) -> None:
        """Start a daemon (inside `host` unless argv already enters a namespace)."""
        full = argv if host is None else ["ip", "netns", "exec", self.ns(host), *argv]
        with open(log, "ab") as out:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[name] = proc
        # `ip netns exec`, `env` and `sh -c 'exec'` all exec: the pid is the daemon's.
        exe = Path(argv[-1] if name.startswith("charon") else argv[0]).name
        (self.run_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid} {exe}\n")

    def _recorded(self) -> dict[str, tuple[int, str]]:
        out = {}
        piddir = self.run_dir / "pids"
        for f in sorted(piddir.glob("*.pid")) if piddir.is_dir() else []:
            try:
                pid, exe = f.read_text().split()
                out[f.stem] = (int(pid), exe)
            except ValueError:
                continue
        return out

    def _recorded_pids(self) -> list[int]:
        return [pid for pid, exe in self._recorded().values() if self._is_ours(pid, exe)]

    @staticmethod
    def _is_ours(pid: int, exe: str) -> bool:
        """The pid still runs the program we started (not a reused pid)."""
        argv = net.cmdline(pid)
        return bool(argv) and not net.is_zombie(pid) and any(
            Path(a).name == exe for a in argv[:1] + argv[-1:])

    def _check_alive(self, name: str, log: Path) -> None:
        """Raise LabError (with its log) if the daemon we started as `name` has exited."""
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise LabError(f"{name} exited with {proc.returncode}:\n{_tail(log)}")

    def _wait_log(self, name: str, log: Path, needle: str) -> None:
        if not poll(lambda: self._check_alive(name, log) or (
                log.exists() and needle in log.read_text(errors="replace")), READY_TIMEOUT, 0.01):
            raise LabError(f"{name} not ready after {READY_TIMEOUT} s:\n{_tail(log)}")

    def _wait_signed(self) -> None:
        """Wait until named has signed the policy zones (their SOA comes with an RRSIG)."""
        for zone in ZONES.values():
            if zone.signing is Signing.POLICY:
                self.wait_signed(zone.name, "SOA", HOSTS[zone.server].v4, host="unbound",
                                 timeout=READY_TIMEOUT)

    def _state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.run_dir / "state.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        (self.run_dir / "state.json").write_text(json.dumps(state, indent=1) + "\n")
        if "owner" in state:
            owner = {k: state[k] for k in ("owner", "owner_argv")} | {
                "state_dir": str(self.state_dir)}
            OWNERS_DIR.mkdir(parents=True, exist_ok=True)
            (OWNERS_DIR / f"{self.prefix}owner.json").write_text(json.dumps(owner) + "\n")

    def _global_owner(self) -> dict[str, Any]:
        """Who brought this prefix's namespaces up, whatever checkout it ran from."""
        try:
            return dict(json.loads((OWNERS_DIR / f"{self.prefix}owner.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _log_tails(self) -> str:
        out = []
        for log in sorted(self.run_dir.glob("**/*.log")) + sorted(self.run_dir.glob("**/*.out")):
            text = _tail(log, 15)
            if text.strip():
                out.append(f"== {log.relative_to(self.run_dir)}\n{text}")
        return "\n".join(out)


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); run as root")


def host(name: str) -> Host:
    """The topology entry of a host (convenience for callers)."""
    return HOSTS[name]
