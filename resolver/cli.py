"""`ipseckey-resolver`: command line, wiring of the parts, signal handling.

Theory of operation: parse arguments, load the configuration (errors exit 2 with the message
naming the key), build the trust anchors, the forwarder, the validator, the resolution core
and the server, then run until SIGTERM or SIGINT, which close the listeners and cancel queries
in progress before the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from resolver import config as configuration
from resolver.cache import WireCache
from resolver.capture import CaptureHandler
from resolver.config import Config
from resolver.confighelp import config_help
from resolver.endpoints.config import ControlConfig
from resolver.endpoints.control import ControlService, start_control
from resolver.errors import ConfigError
from resolver.hostaddr import read_interface_addresses
from resolver.iterate import Iterator
from resolver.logsetup import setup_logging
from resolver.metered import (
    DaemonMetrics,
    MeteredBackend,
    MeteredForwarder,
    MeteredResolution,
    MeteredServer,
)
from resolver.policy import Group, Policy, PolicyConfig
from resolver.provision import Provisioner
from resolver.resolve import Fetch, PlainHandler, QueryHandler, Upstream, Validating
from resolver.responder.core import ResponderConfig
from resolver.responder.manager import Responder, start_responder
from resolver.service import ServiceRuntime
from resolver.serviceconfig import DebugConfig, MetricsConfig
from resolver.tunnels.backend import make_backend
from resolver.tunnels.config import Identity, ProvisionConfig
from resolver.validator.anchors import TrustAnchors
from resolver.watch import TunnelWatch

log = logging.getLogger("resolver")

EXIT_STATUS = """
exit status: 0 clean shutdown or valid config, 2 configuration error, 1 other failure.
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
                   help="parse the configuration, print a summary and exit (0 valid, 2 invalid)")
    p.add_argument("--debug", action="store_true",
                   help="log at debug level and trace every query through cache, upstream "
                        "and validator")
    p.add_argument("--listen", action="append", default=[], metavar="ADDR[:PORT]",
                   help="listen on this address instead of [server] listen; repeat for more "
                        "(IPv6 with a port as [ADDR]:PORT)")
    p.add_argument("--upstream", action="append", default=[], metavar="ADDR[:PORT]",
                   help="forward to this resolver instead of [upstream] servers; repeatable")
    return p


def _override(args: argparse.Namespace, flag: str, values: list[str]
              ) -> tuple[configuration.HostPort, ...]:
    out = []
    for v in values:
        try:
            out.append(configuration.parse_hostport(v))
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
    """Parse the tables other modules own, so `--check-config` catches their errors too.

    Nothing is connected to or loaded: the private key is not read here (the daemon reads it at
    start-up, refusing one that others can read).

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


def build_upstream(cfg: Config, metrics: DaemonMetrics | None = None) -> Upstream:
    """The forwarder (metered per server when `metrics` is given), or the iterator for
    `[upstream] mode = "iterate"` (not metered per server yet)."""
    up = cfg.upstream
    if up.mode == "iterate":
        return Iterator(up.root_hints, limits=cfg.limits, timeout=up.timeout,
                        attempts=up.attempts, tcp_timeout=up.tcp_timeout,
                        payload=cfg.server.edns_payload)
    forwarder = MeteredForwarder(up.servers, timeout=up.timeout, attempts=up.attempts,
                                 tcp_timeout=up.tcp_timeout, payload=cfg.server.edns_payload)
    return forwarder if metrics is None else forwarder.meter(metrics)


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


async def serve(cfg: Config) -> int:
    """Run the resolver until SIGTERM/SIGINT. Returns the exit status.

    Start-up order matters: the provisioner reconciles its state file with the IKE daemon
    (restoring tunnels that should exist, removing our strays) before the control socket
    restores pinned endpoints and before the first query is accepted.
    """
    from resolver.validator.response import Validator  # late: the validator's part

    anchors = build_anchors(cfg)
    source = str(cfg.path) if cfg.path is not None else "config"

    def make_validator(fetch: Fetch) -> Validating:
        return Validator(anchors, fetch, cfg.limits)

    metrics = DaemonMetrics()
    forwarder = build_upstream(cfg, metrics)
    resolution = MeteredResolution(forwarder, make_validator, cache=cfg.cache,
                                   max_upstream_queries=cfg.limits.max_fetches).meter(metrics)
    plain = PlainHandler(resolution, max_ttl=cfg.cache.max_ttl,
                         payload=cfg.server.edns_payload)

    handler: QueryHandler = plain
    provisioner: Provisioner | None = None
    watch: TunnelWatch | None = None
    wire_cache = WireCache(cfg.cache.max_entries)
    control: ControlService | None = None
    responder: Responder | None = None
    tasks: list[asyncio.Task[None]] = []
    check_sections(cfg)
    runtime = ServiceRuntime(metrics, cfg.sections, source)
    if cfg.sections.get("provision") is not None or "identity" in cfg.sections:
        pcfg = ProvisionConfig.from_section(cfg.sections.get("provision", {}), source)
        ident = (Identity.from_section(cfg.sections["identity"], source)
                 if "identity" in cfg.sections else None)
        # pyroute2 0.9 runs its own event loop: its sync API must be called off ours.
        own = (*await asyncio.to_thread(host_addresses), *(ident.addresses if ident else ()))
        policy = Policy(PolicyConfig.from_section(cfg.sections.get("policy", {}), source),
                        own_addresses=own)
        for warning in policy.warnings():
            log.warning("%s", warning)
        backend = make_backend(pcfg, ident, source=source)
        provisioner = Provisioner(
            MeteredBackend(backend, metrics), pcfg,
            must_drop=lambda s: policy.group_for(s.key.owner, (s.destination,)) is Group.PRIVATE)
        provisioner.on_lost.append(wire_cache.clear)  # answers given for a lost tunnel
        metrics.watch_provisioner(provisioner)
        await provisioner.reconcile(time.time())
        watch = TunnelWatch(provisioner, time.time, interval=pcfg.watch_interval)
        watch.start()  # charon's events; the dry run has none
        handler = CaptureHandler(plain, resolution, policy, provisioner,
                                 payload=cfg.server.edns_payload)
        metrics.watch_capture(handler)
        tasks.append(asyncio.create_task(_expire_loop(provisioner)))
        # Unknown initiators in, through DNS (issue 11): after reconcile, before queries.
        responder = await start_responder(cfg.sections, source, ident, backend.tunnels,
                                          resolution)
        if responder is not None:
            tasks.append(asyncio.create_task(responder.run()))
            metrics.watch_responder(responder)
        control = await start_control(cfg, resolution, provisioner, clock=time.time,
                                      policy=policy, extra=runtime.control_ops())
        if control is not None:
            metrics.watch_endpoints(control.manager.list)
        log.info("capture on: policy default %s, backend %s, shunts %s",
                 policy.config.default.value, pcfg.backend, pcfg.shunts)

    server = MeteredServer(handler, cfg.server, cache=wire_cache).meter(metrics)
    await server.start(cfg.server.listen)
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
    upstreams = ("iterative from the root" if cfg.upstream.mode == "iterate"
                 else ", ".join(map(str, cfg.upstream.servers)))
    try:
        await runtime.start(f"serving on {', '.join(map(str, cfg.server.listen))}; "
                            f"upstream {upstreams}")
    except ConfigError:
        await server.stop()
        raise
    log.info("ipseckey-resolver ready; upstream %s", upstreams)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await runtime.close()
        for task in tasks:
            task.cancel()
        if responder is not None:
            await responder.close()
        if control is not None:
            await control.close()
        if watch is not None:
            await watch.close()
        await server.stop()
        if provisioner is not None:
            await provisioner.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console script entry point. Returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"ipseckey-resolver: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        try:
            build_anchors(cfg)
            check_sections(cfg)
        except ConfigError as e:
            print(f"ipseckey-resolver: {e}", file=sys.stderr)
            return 2
        print(cfg.summary())
        return 0
    debug = args.debug or cfg.log.debug_queries
    level = logging.DEBUG if debug else getattr(logging, cfg.log.level.upper())
    setup_logging(level)
    try:
        return asyncio.run(serve(cfg))
    except ConfigError as e:
        print(f"ipseckey-resolver: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
