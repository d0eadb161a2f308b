"""`ipseckey-resolver`: command line, wiring of the parts, signal handling.

Theory of operation: the start-up steps of resolver/startup.py (DESIGN.md, "Start-up"), each
a named function here: parse (`load_config`), check (`startup.check`, also `--check-config`),
lock (`InstanceLock`), bind (`Server.start`), reconcile (`reconcile`), serve
(`run_until_stopped`). A step that fails prints one line and exits 2, having touched nothing
that a later step would. SIGTERM or SIGINT close the listeners and cancel queries in progress
(`shut_down`) before the process exits 0. The upstream (forwarders or iteration) is chosen by
resolver/upstream/select.py and kept current by resolver/upstream/network.py from the bind on;
SIGHUP
reloads the configuration (resolver/service/reload.py): what can change is swapped in place, a bad
file changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from resolver import config as configuration
from resolver import startup
from resolver.cache import WireCache
from resolver.capture import CaptureHandler
from resolver.config import Config
from resolver.confighelp import config_help
from resolver.endpoints.control import (
    ControlServer,
    ControlService,
    start_control,
    start_status_socket,
)
from resolver.errors import ConfigError
from resolver.hostaddr import read_interface_addresses
from resolver.instancelock import InstanceLock
from resolver.logs.setup import setup_logging
from resolver.metrics.metered import (
    DaemonMetrics,
    MeteredBackend,
    MeteredForwarder,
    MeteredResolution,
    MeteredServer,
)
from resolver.policy import Group, Policy
from resolver.provision import Provisioner
from resolver.provisioning.watch import TunnelWatch
from resolver.resolve import Fetch, PlainHandler, QueryHandler, Validating
from resolver.responder.manager import Responder, start_responder
from resolver.server import Server
from resolver.service.reload import Reloader, Running
from resolver.service.runtime import ServiceRuntime
from resolver.startup import StartupGate, build_anchors, check_sections
from resolver.tunnels.backend import make_daemon_backend
from resolver.upstream.forward import Forwarder
from resolver.upstream.network import Network, start_network
from resolver.upstream.probe import MakeValidator
from resolver.upstream.select import UpstreamSelector

__all__ = ["build_anchors", "check_sections", "main", "serve"]  # the first two: moved, kept

log = logging.getLogger("resolver")

EXIT_STATUS = """
exit status: 0 clean shutdown or valid config, 2 configuration error or refused start (another
instance running, address in use, state directory not writable), 1 other failure.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help in the docs)."""
    p = argparse.ArgumentParser(
        prog="ipseckey-resolver",
        description="A DNSSEC-validating local resolver: forwards with DO+CD, validates "
                    "every answer itself from its trust anchors, and answers SERVFAIL with an "
                    "Extended DNS Error when validation fails.",
        epilog=config_help() + "\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", type=Path, metavar="FILE",
                   help="TOML configuration file (default: built-in defaults only)")
    p.add_argument("--check-config", action="store_true",
                   help="run every check the daemon runs at start-up (key file, identity, policy, "
                        "state directory, lock, listen addresses), warn about what cannot be "
                        "reached yet (the IKE daemon), print a summary with the effective "
                        "policy and exit (0 valid, 2 invalid)")
    p.add_argument("--debug", action="store_true",
                   help="log at debug level and trace every query through cache, upstream "
                        "and validator")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR[:PORT]",
                   help="listen on this address instead of [server] listen; repeat for more "
                        "(IPv6 with a port as [ADDR]:PORT)")
    p.add_argument("--upstream", action="append", default=[], metavar="ADDR[:PORT]",
                   help="forward to this resolver instead of [upstream] servers; repeatable "
                        "(tls://ADDR[:PORT]#NAME: DNS over TLS)")
    return p


def _override(args: argparse.Namespace, flag: str, values: list[str]
              ) -> tuple[configuration.HostPort, ...]:
    parse = (configuration.parse_upstream_server if flag == "--upstream"
             else configuration.parse_hostport)
    out = []
    for v in values:
        try:
            out.append(parse(v))
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return tuple(out)


def load_config(args: argparse.Namespace) -> Config:
    """The configuration with command-line overrides applied.

    Raises:
        ConfigError: bad file or bad override.
    """
    listen = _override(args, "--listen", args.listen)
    upstream = _override(args, "--upstream", args.upstream)
    cfg = configuration.load(args.config, listen_override=listen,
                             upstream_override=upstream)
    return cfg


def build_upstream(cfg: Config, make_validator: MakeValidator,
                   metrics: DaemonMetrics | None = None) -> UpstreamSelector:
    """The upstream of `[upstream] mode` (auto, forward, iterate; resolver/upstream/select.py),
    its forwarders metered per server when `metrics` is given, the iterator in all (one label
    per authoritative server would have no bound).

    Raises:
        ConfigError: `tls_ca_file` is unusable.
    """
    selector: UpstreamSelector

    def metered(servers: Sequence[configuration.HostPort], attempts: int) -> Forwarder:
        # The selector's current settings (a reload changes them), counted per server.
        forwarder = MeteredForwarder(servers, **selector.forwarder_options(attempts))
        return forwarder if metrics is None else forwarder.meter(metrics)

    selector = UpstreamSelector(cfg.upstream, make_validator, limits=cfg.limits,
                                payload=cfg.server.edns_payload, make_forwarder=metered)
    if metrics is not None:
        metrics.watch_iteration(selector.iteration_counts)
    return selector


def host_addresses() -> tuple[IPv4Address | IPv6Address, ...]:
    """The addresses of this host (its network namespace), read over netlink.

    Policy never tunnels or blocks these (DESIGN.md, step 6: "the host's own addresses and
    loopback are never tunnelled"), so they are read at start-up rather than trusted to the
    configuration alone.
    """
    return tuple(e.address for e in read_interface_addresses())


async def _expire_loop(provisioner: Provisioner) -> None:
    """Tear down tunnels whose lease ended; wakes at the next deadline (at most every 5 s)."""
    while True:
        now = time.time()
        try:
            nxt = await provisioner.expire(now)
        except Exception:  # one failed teardown must not stop the timer for the rest
            log.exception("lease expiry failed; retrying")
            nxt = None
        delay = 5.0 if nxt is None else min(5.0, max(0.05, nxt - time.time()))
        await asyncio.sleep(delay)


@dataclass
class Daemon:
    """The parts `serve` starts and stops, built by `build` (nothing is touched yet then)."""

    server: Server
    gate: StartupGate
    metrics: DaemonMetrics
    runtime: ServiceRuntime
    resolution: MeteredResolution
    selector: UpstreamSelector
    plain: PlainHandler
    wire_cache: WireCache
    provisioner: Provisioner | None = None
    policy: Policy | None = None
    watch: TunnelWatch | None = None
    control: ControlService | None = None
    network: Network | None = None
    status_socket: ControlServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    tunnels: object = None  # the tunnel backend (ViciBackend, or the dry run): the responder's
    responder: Responder | None = None


async def serve(cfg: Config, load: Callable[[], Config] | None = None) -> int:
    """Run the resolver until SIGTERM/SIGINT. Returns the exit status.

    The start-up steps of resolver/startup.py, in order; 1 (parse) was `load_config`. A step
    that fails raises ConfigError: one line, exit 2, and nothing after it was touched.
    `load` reads the configuration again for SIGHUP (default: cfg's file, no overrides).
    """
    checked = startup.check(cfg)  # 2: the same function as --check-config
    for warning in checked.warnings:
        log.warning("%s", warning)
    lock = InstanceLock(checked.state_dirs)  # 3: one owner of the tunnels
    lock.acquire()
    try:
        daemon = await build(cfg, checked)
        await daemon.server.start(cfg.server.listen)  # 4: bind
        # The upstream's first probe (auto) runs while step 5 does.
        daemon.network = start_network(cfg, daemon.selector, daemon.resolution)
        daemon.runtime.reload = reloader(cfg, daemon, load).request
        try:
            await reconcile(cfg, daemon)  # 5: the first step that touches charon or XFRM
            daemon.gate.open()  # 6: serve
            return await run_until_stopped(cfg, daemon)
        finally:
            await shut_down(daemon)
    finally:
        lock.release()


async def build(cfg: Config, checked: startup.Checked) -> Daemon:
    """The resolution core, the handlers, the provisioner and the server: built, not started.

    Raises:
        ConfigError: the backend cannot be built (an unreadable private key).
    """
    from resolver.validator.response import Validator  # late: the validator's part

    anchors = checked.anchors

    def make_validator(fetch: Fetch) -> Validating:
        return Validator(anchors, fetch, cfg.limits)

    metrics = DaemonMetrics()
    selector = build_upstream(cfg, make_validator, metrics)
    resolution = MeteredResolution(selector, make_validator, cache=cfg.cache,
                                   max_upstream_queries=cfg.limits.max_fetches).meter(metrics)
    plain = PlainHandler(resolution, max_ttl=cfg.cache.max_ttl,
                         payload=cfg.server.edns_payload)
    handler: QueryHandler = plain
    provisioner: Provisioner | None = None
    policy: Policy | None = None
    tunnels: object = None
    wire_cache = WireCache(cfg.cache.max_entries)
    pcfg, ident = checked.provision, checked.identity
    if pcfg is not None and checked.policy is not None:
        # pyroute2 0.9 runs its own event loop: its sync API must be called off ours.
        own = (*await asyncio.to_thread(host_addresses), *(ident.addresses if ident else ()))
        policy = the_policy = Policy(checked.policy, own_addresses=own)
        # VICI and XFRM in the tunnel worker process; `tunnels`: the responder's VICI access
        backend, tunnels = make_daemon_backend(pcfg, ident, source=checked.source)
        provisioner = Provisioner(
            MeteredBackend(backend, metrics), pcfg,
            must_drop=lambda s: the_policy.group_for(s.key.owner, (s.destination,))
            is Group.PRIVATE)
        provisioner.on_lost.append(wire_cache.clear)  # answers given for a lost tunnel
        metrics.watch_provisioner(provisioner)
        capture = CaptureHandler(plain, resolution, policy, provisioner,
                                 payload=cfg.server.edns_payload)
        metrics.watch_capture(capture)
        handler = capture
    gate = StartupGate(handler, plain)
    server = MeteredServer(gate, cfg.server, cache=wire_cache).meter(metrics)
    return Daemon(server, gate, metrics, ServiceRuntime(metrics, cfg.sections, checked.source),
                  resolution, selector, plain, wire_cache, provisioner, policy,
                  tunnels=tunnels)


def reloader(cfg: Config, daemon: Daemon, load: Callable[[], Config] | None) -> Reloader:
    """SIGHUP's reloader over the daemon's swappable parts (resolver/service/reload.py)."""
    from resolver.validator.response import Validator  # late: the validator's part

    network = daemon.network
    return Reloader(cfg, load or (lambda: configuration.load(cfg.path)),
                    Running(daemon.resolution, daemon.selector, daemon.wire_cache,
                            network.watch if network else None, daemon.policy, daemon.plain),
                    build_anchors=build_anchors, check=check_sections,
                    new_validator=lambda anchors, limits, fetch: Validator(anchors, fetch,
                                                                           limits),
                    make_watch=network.make_watch if network else lambda _c: None)


async def reconcile(cfg: Config, daemon: Daemon) -> None:
    """Step 5: the provisioner's state with charon and XFRM (an IKE daemon that is not there
    yet is retried in the background), then the pinned endpoints and the lease timer."""
    provisioner, policy = daemon.provisioner, daemon.policy
    extra = daemon.runtime.control_ops() | (daemon.network.ops if daemon.network else {})
    if provisioner is None or policy is None:
        try:  # `autosp upstream`/`stats` of a plain resolver: not worth refusing DNS over
            daemon.status_socket = await start_status_socket(cfg, extra)
        except ConfigError as e:
            log.warning("no control socket: %s", e)
        return
    await provisioner.reconcile(time.time())
    if not provisioner.ike_ready:
        daemon.tasks.append(asyncio.create_task(provisioner.connect_later(time.time)))
    pcfg = provisioner.config
    daemon.watch = TunnelWatch(provisioner, time.time, interval=pcfg.watch_interval)
    daemon.watch.start()  # charon's events; the dry run has none
    daemon.tasks.append(asyncio.create_task(_expire_loop(provisioner)))
    # Unknown initiators in, through DNS (issue 11): after reconcile, before serving.
    source = str(cfg.path) if cfg.path is not None else "config"
    daemon.responder = await start_responder(cfg.sections, source, daemon.tunnels,
                                             daemon.resolution)
    if daemon.responder is not None:
        daemon.tasks.append(asyncio.create_task(daemon.responder.run()))
        daemon.metrics.watch_responder(daemon.responder)
    daemon.control = await start_control(cfg, daemon.resolution, provisioner, clock=time.time,
                                         policy=policy, extra=extra)
    if daemon.control is not None:
        daemon.metrics.watch_endpoints(daemon.control.manager.list)
    log.info("capture on: policy default %s, backend %s, shunts %s",
             policy.config.default.value, pcfg.backend, pcfg.shunts)


async def run_until_stopped(cfg: Config, daemon: Daemon) -> int:
    """Serve until SIGTERM or SIGINT; returns 0."""
    # Cyclic GC pauses are part of the tail of cached-answer latency: move everything built at
    # start-up out of the collector's view, and collect the young generation less often.
    # Measured (bench/bench_resolver.py, paced at half our peak): p90 0.57 -> 0.18 ms,
    # p99 2.7 -> 1.8 ms, and peak 67k -> 77k qps.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    upstreams = (f"mode {cfg.upstream.mode}, forwarders "
                 f"{', '.join(map(str, cfg.upstream.servers)) or 'none'}")
    # the metrics listener, SIGHUP, READY=1 (now: READY means serving), the watchdog
    await daemon.runtime.start(f"serving on {', '.join(map(str, cfg.server.listen))}; "
                               f"upstream {upstreams}")
    log.info("ipseckey-resolver ready; upstream %s", upstreams)
    await stop.wait()
    return 0


async def shut_down(daemon: Daemon) -> None:
    """Close the listeners, cancel queries in progress; tunnels stay up (a restart keeps them)."""
    log.info("shutting down")
    await daemon.runtime.close()
    for task in daemon.tasks:
        task.cancel()
    if daemon.responder is not None:
        await daemon.responder.close()
    if daemon.control is not None:
        await daemon.control.close()
    if daemon.status_socket is not None:
        await daemon.status_socket.close()
    if daemon.network is not None:
        await daemon.network.close()
    if daemon.watch is not None:
        await daemon.watch.close()
    await daemon.server.stop()
    if daemon.provisioner is not None:
        await daemon.provisioner.close()
        aclose = getattr(daemon.provisioner.backend, "aclose", None)
        if aclose is not None:  # the tunnel worker (resolver/tunnels/process.py)
            await aclose()


def check_config(cfg: Config) -> int:
    """`--check-config`: step 2 of the start, its warnings and the summary. 0 or 2."""
    try:
        checked = startup.check(cfg)
    except ConfigError as e:
        print(f"ipseckey-resolver: {e}", file=sys.stderr)
        return 2
    for warning in checked.warnings:
        print(f"ipseckey-resolver: warning: {warning}", file=sys.stderr)
    print(startup.summary(cfg, checked))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point. Returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)  # 1: parse
    except ConfigError as e:
        print(f"ipseckey-resolver: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        return check_config(cfg)
    debug = args.debug or cfg.log.debug_queries
    level = logging.DEBUG if debug else getattr(logging, cfg.log.level.upper())
    setup_logging(level)
    try:
        return asyncio.run(serve(cfg, lambda: load_config(args)))
    except ConfigError as e:
        print(f"ipseckey-resolver: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
