"""Start-up: the checks `--check-config` and the daemon share, and the gate that holds queries.

Theory of operation (DESIGN.md, "Start-up"). The daemon starts in six steps, and a start that
fails stops with one line (exit 2) before the step that could do harm:

  1. parse      the file and the command line (config.py: file, table, key and why);
  2. check      `check(cfg)`, below: everything the daemon would refuse, in the order it
                would meet it; the first problem is the one line. `--check-config` runs this
                very function (and prints `summary`), so the two cannot disagree;
  3. lock       the state directories (resolver/instancelock.py): one daemon owns the
                tunnels; a second one stops here, naming the first;
  4. bind       the DNS listen sockets ("Address already in use" stops here);
  5. reconcile  the provisioner's state with charon and XFRM (resolver/provision.py): the
                first step that touches either, so steps 1-4 failing has touched nothing;
  6. serve      `StartupGate` opens: address queries waited for step 5 (other queries were
                answered from step 4 on). SIGHUP gets its handler only here; one that came
                earlier was held (resolver/service/sighup.py) and is applied now.

What cannot be reached yet is a warning, not a refusal: an IKE daemon that is not running
is waited for (the provisioner's `connect_later`), because a laptop's DNS must not depend on
it (issue 12). Rules: checks only read, except the probe write in each state directory (the
daemon writes there first thing) and a trial bind that is released at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.rdataclass

from resolver.config import Config, HostPort
from resolver.endpoints.config import DEFAULT_STATE_FILE, ControlConfig
from resolver.errors import ConfigError
from resolver.instancelock import LOCK_NAME, InstanceLock
from resolver.keyfile import load_private_key
from resolver.policy import Group, Policy, PolicyConfig
from resolver.provision import IKE_RETRY
from resolver.resolve import QueryHandler
from resolver.responder.core import ResponderConfig
from resolver.rrsets import ADDRESS_TYPES
from resolver.service.config import DebugConfig, MetricsConfig
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.validator.anchors import TrustAnchors

PROBE_BYTES = 4096  # a full disk fails a write of this size; a small state file needs about this
VICI_PROBE_TIMEOUT = 1.0  # seconds


@dataclass(frozen=True)
class Checked:
    """What step 2 found: the parsed tables the daemon goes on with, and the warnings."""

    source: str
    anchors: TrustAnchors
    provision: ProvisionConfig | None  # None: no [identity]/[provision]: a plain resolver
    identity: Identity | None
    policy: PolicyConfig | None
    control: ControlConfig | None  # None: disabled, or nothing to control
    state_dirs: tuple[Path, ...]
    warnings: list[str] = field(default_factory=list)


def check(cfg: Config) -> Checked:
    """Step 2: everything the daemon would refuse, in the order the daemon meets it.

    Raises:
        ConfigError: the first problem, as one line naming the file, table and key (or the
            directory, address or lock) and why.
    """
    source = str(cfg.path) if cfg.path is not None else "config"
    anchors = build_anchors(cfg)
    check_sections(cfg)
    pcfg = ident = policy = control = None
    if capturing(cfg):
        pcfg = ProvisionConfig.from_section(cfg.sections.get("provision", {}), source)
        if "identity" in cfg.sections:
            ident = Identity.from_section(cfg.sections["identity"], source)
        policy = PolicyConfig.from_section(cfg.sections.get("policy", {}), source)
        ccfg = ControlConfig.from_section(cfg.sections.get("control", {}), source)
        control = ccfg if ccfg.enabled else None
        if pcfg.backend == "vici":
            _check_key(ident, source)
    checked = Checked(source, anchors, pcfg, ident, policy, control,
                      state_directories(pcfg, control))
    if policy is not None:
        checked.warnings.extend(Policy(policy).warnings())  # strict = false
    for directory in checked.state_dirs:
        _check_writable(directory)
    InstanceLock(checked.state_dirs).probe()
    if control is not None:
        _check_control_socket(control.socket)
    for address in cfg.server.listen:
        _check_bindable(address)
    metrics = MetricsConfig.from_section(cfg.sections.get("metrics", {}), source).listen
    if metrics is not None:
        _check_bindable(metrics, (socket.SOCK_STREAM,), "[metrics] listen")
    if pcfg is not None and pcfg.backend == "vici":
        unreachable = _vici_unreachable(pcfg.vici_socket)
        if unreachable is not None:
            checked.warnings.append(
                f"IKE daemon not reachable at {pcfg.vici_socket} ({unreachable}): DNS will be "
                f"served, lookups that need a tunnel get SERVFAIL (EDE 14) until it is; "
                f"retried every {IKE_RETRY:g} s")
    return checked


def capturing(cfg: Config) -> bool:
    """Whether A/AAAA lookups capture IPSECKEYs and provision (else: a plain resolver)."""
    return cfg.sections.get("provision") is not None or "identity" in cfg.sections


def state_directories(pcfg: ProvisionConfig | None, control: ControlConfig | None
                      ) -> tuple[Path, ...]:
    """The directories of the state files the daemon writes: the ones it locks (step 3).

    A configuration read from a file always has a [provision] state file (by default in
    /var/lib/ipseckey-resolver); one built in code without any state file still locks the
    default state directory: the lock is what keeps a second daemon off our tunnels.
    """
    if pcfg is None:
        return ()
    files = [f for f in (pcfg.state_file, control.state_file if control else None) if f]
    dirs = {f.parent for f in files} or {DEFAULT_STATE_FILE.parent}
    return tuple(sorted(dirs))


def build_anchors(cfg: Config) -> TrustAnchors:
    """Trust anchors from [dnssec]: builtin root DS, anchor files, negative trust anchors.

    Raises:
        ConfigError: an anchor file is unreadable or broken (the message names file:line).
    """
    anchors: TrustAnchors | None = None
    if cfg.dnssec.builtin_root_anchors:
        anchors = TrustAnchors.builtin()
    for path in cfg.dnssec.trust_anchor_files:
        extra = TrustAnchors.from_file(path)
        anchors = extra if anchors is None else anchors.merged(extra)
    if anchors is None:  # config.py refuses this; keep mypy and a future caller honest
        raise ConfigError("no trust anchors configured")
    return anchors.with_negative(cfg.dnssec.negative_trust_anchors)


def check_sections(cfg: Config) -> None:
    """Parse the tables other modules own, so that their errors come out at step 2.

    Raises:
        ConfigError: the first bad key, named with its table.
    """
    source = str(cfg.path) if cfg.path is not None else "config"
    PolicyConfig.from_section(cfg.sections.get("policy", {}), source)
    ProvisionConfig.from_section(cfg.sections.get("provision", {}), source)
    if "identity" in cfg.sections:
        Identity.from_section(cfg.sections["identity"], source)
    ControlConfig.from_section(cfg.sections.get("control", {}), source)
    ResponderConfig.from_section(cfg.sections.get("responder", {}), source)
    if "responder" in cfg.sections and "identity" not in cfg.sections:
        raise ConfigError(f"{source}: [responder] needs [identity] (and [provision]): the "
                          "responder answers as this host's identity")
    MetricsConfig.from_section(cfg.sections.get("metrics", {}), source)
    DebugConfig.from_section(cfg.sections.get("debug", {}), source)
    if "policy" in cfg.sections and "identity" not in cfg.sections:
        raise ConfigError(f"{source}: [policy] needs [identity] (and [provision]): without a "
                          "provisioning backend no destination can be made private")


def summary(cfg: Config, checked: Checked) -> str:
    """`--check-config`'s report: the configuration, then the effective policy."""
    lines = [cfg.summary()]
    pcfg, policy = checked.provision, checked.policy
    if pcfg is None or policy is None:
        lines.append("capture: off (no [identity] or [provision]): a plain validating resolver")
        return "\n".join(lines)
    if pcfg.backend == "vici":
        lines.append(f"provisioning: strongSwan over VICI at {pcfg.vici_socket}, shunts "
                     f"{pcfg.shunts}, timeout {pcfg.timeout:g} s, lease {pcfg.lease:g} s")
    else:
        lines.append("provisioning: DRY RUN (nothing is protected; tunnels are only logged)")
    if checked.identity is not None:
        lines.append(f"identity: {checked.identity.fqdn}, key {checked.identity.private_key}")
    strict = ("yes (a failed tunnel is SERVFAIL)" if policy.strict
              else "no (private-or-clear answers in clear when a tunnel fails)")
    lines.append(f"policy: default {policy.default.value}, strict {strict}, "
                 f"max_ttl {policy.max_ttl} s")
    rules = [*policy.networks, *policy.suffixes]
    for group in Group:
        members = [str(rule) for rule, g in rules if g is group]
        if members:
            lines.append(f"  {group.value}: {', '.join(members)}")
    if not rules:
        lines.append(f"  (no rules: every destination is {policy.default.value})")
    dirs = ", ".join(str(d) for d in checked.state_dirs)
    lines.append(f"state: {pcfg.state_file or '(tunnels not kept across restarts)'}; "
                 f"lock {LOCK_NAME} in {dirs}")
    lines.append(f"control socket: {checked.control.socket if checked.control else 'off'}")
    return "\n".join(lines)


class StartupGate:
    """The QueryHandler from step 4 on: address queries wait until step 5 is done (`open`).

    A tunnel set up for a query during reconcile would look like a stray to it, and an answer
    must not be given before the state it depends on is restored. Other queries need neither
    and go to the plain handler at once, so a slow reconcile (peers that time out) does not
    take DNS down. After `open` the cost is one flag test per query.
    """

    def __init__(self, handler: QueryHandler, plain: QueryHandler) -> None:
        self.handler, self.plain = handler, plain
        self._open = asyncio.Event()

    def open(self) -> None:
        self._open.set()

    async def handle(self, query: dns.message.Message, now: float) -> dns.message.Message:
        if not self._open.is_set():
            q = query.question[0]
            if q.rdclass != dns.rdataclass.IN or q.rdtype not in ADDRESS_TYPES:
                return await self.plain.handle(query, now)
            await self._open.wait()
        return await self.handler.handle(query, now)


# --- the checks ------------------------------------------------------------------------------


def _check_key(ident: Identity | None, source: str) -> None:
    if ident is None:
        raise ConfigError(f"{source}: [identity] is required with [provision] backend 'vici'")
    try:
        load_private_key(ident.private_key)
    except ConfigError as exc:
        raise ConfigError(f"{source}: [identity] key 'private_key': {exc}") from None


def _check_writable(directory: Path) -> None:
    """The daemon can create files in `directory` (or create it), and the disk is not full."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != directory:  # the daemon will create it (0700) at step 3
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"state directory {directory} cannot be created: {existing} "
                              "is not a writable directory")
        return
    if not directory.is_dir():
        raise ConfigError(f"state directory {directory} is not a directory")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        raise ConfigError(f"state directory {directory} is not writable: "
                          f"{exc.strerror or exc}") from None


def _check_bindable(address: HostPort,
                    kinds: tuple[int, ...] = (socket.SOCK_DGRAM, socket.SOCK_STREAM),
                    what: str = "listen") -> None:
    """Bind as the server will (UDP and TCP), and let go at once."""
    family = socket.AF_INET6 if address.family == 6 else socket.AF_INET
    for kind in kinds:
        with socket.socket(family, kind) as sock:
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address.host, address.port))
            except OSError as exc:
                where = "" if what == "listen" else f" ({what})"
                raise ConfigError(f"cannot listen on {address}{where}: "
                                  f"{exc.strerror or exc}") from None


def _check_control_socket(path: Path) -> None:
    """No other daemon answers on our control socket (endpoints/control.py would refuse to
    take it over at step 5: too late, reconcile has run by then)."""
    try:
        st = os.lstat(path)
    except OSError:
        return  # not there (or its directory is not): bind_socket makes and checks it
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"control socket {path}: exists and is not a socket; not removing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # stale: the daemon removes it
    raise ConfigError(f"control socket {path}: another resolver is running and listening on it")


def _vici_unreachable(uri: str) -> str | None:
    """Why the IKE daemon's socket cannot be connected to now (None: it can)."""
    path = uri.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(VICI_PROBE_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
