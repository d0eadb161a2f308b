"""The resolver's configuration: one TOML file, every setting with a default.

Theory of operation: `load(path)` reads the file with tomllib and turns each table this module
owns ([server] [upstream] [dnssec] [cache] [limits] [log]) into a frozen dataclass, checking
types and ranges key by key. Tables owned by other modules ([policy] [provision] [control]
[identity]) are passed through raw in `Config.sections`; their owners parse them. Anything else
(an unknown table, an unknown key, a wrong type) is a `ConfigError` whose message names the
file, the table, the key and the problem, so an operator never has to guess.

Nothing here opens sockets. The one piece of the environment we read is /etc/resolv.conf, for
the default upstream list (the system's nameservers minus this resolver's own addresses).
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from resolver.configtable import Table, at_least, between, positive, type_name
from resolver.errors import ConfigError
from resolver.validator.types import Limits

DNS_PORT: Final = 53
RESOLV_CONF: Final = Path("/etc/resolv.conf")
PASSTHROUGH_TABLES: Final = ("policy", "provision", "control", "identity", "metrics", "debug")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and port (listen address or upstream server)."""

    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.host).version


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where we listen and how we treat clients."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1"), Endpoint("::1"))
    edns_payload: int = 1232  # RFC 9715 / DNS flag day 2020: no fragmentation
    tcp_idle_timeout: float = 10.0  # seconds a TCP connection may sit without a query
    tcp_max_connections: int = 256
    tcp_max_pipelined: int = 64  # queries in progress on one TCP connection
    query_timeout: float = 10.0  # a client query that takes longer gets SERVFAIL


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """[upstream]: the resolvers we forward to (with DO=1, CD=1)."""

    servers: tuple[Endpoint, ...] = ()
    timeout: float = 1.5  # per attempt on one server
    attempts: int = 2  # rounds over the whole server list
    tcp_timeout: float = 3.0
    # Filled in from /etc/resolv.conf when `servers` is not set in the file.
    from_resolv_conf: bool = False


@dataclass(frozen=True, slots=True)
class DnssecConfig:
    """[dnssec]: trust anchors."""

    builtin_root_anchors: bool = True  # the IANA root KSK-2017 and KSK-2024 DS records
    trust_anchor_files: tuple[Path, ...] = ()  # DS or DNSKEY lines, BIND/Unbound format
    negative_trust_anchors: tuple[str, ...] = ()  # names treated as insecure (RFC 7646)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """[cache]: sizes and TTL bounds."""

    max_entries: int = 10000  # validated answers (and again as many final wire answers)
    max_ttl: int = 86400  # no answer is served or kept longer than this
    bogus_ttl: int = 60  # bogus results are remembered this long (Unbound's val-bogus-ttl)
    failure_ttl: int = 5  # upstream failures (indeterminate), RFC 9520: >= 1 s, <= 5 min
    negative_max_ttl: int = 3600  # RFC 2308 section 5: cap on negative caching


_LIMITS: Final = Limits()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: per-query work limits (design.md, "Limits that keep the resolver alive").

    Names match resolver.validator.types.Limits, except max_upstream_queries (its max_fetches),
    which the resolution core also enforces for the client query's own lookups.
    """

    # Defaults are the validator's own (one source of truth: validate_types.Limits).
    max_upstream_queries: int = _LIMITS.max_fetches  # per client query, validation included
    max_keys_per_tag: int = _LIMITS.max_keys_per_tag
    max_sig_checks_per_rrset: int = _LIMITS.max_sig_checks_per_rrset
    max_sig_checks_per_query: int = _LIMITS.max_sig_checks_per_query
    max_sig_failures_per_query: int = _LIMITS.max_sig_failures_per_query
    max_ds: int = _LIMITS.max_ds
    max_ds_mismatches: int = _LIMITS.max_ds_mismatches
    max_nsec3_records: int = _LIMITS.max_nsec3_records
    max_nsec3_iterations: int = _LIMITS.max_nsec3_iterations
    max_nsec3_salt: int = _LIMITS.max_nsec3_salt
    max_nsec3_hashes: int = _LIMITS.max_nsec3_hashes
    max_cname_chain: int = _LIMITS.max_cname_chain


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]: how much to say."""

    level: str = "info"
    debug_queries: bool = False  # trace every query through the resolver (same as --debug)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. `sections` holds the raw tables other modules parse."""

    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    dnssec: DnssecConfig = field(default_factory=DnssecConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines for --check-config."""
        up = ", ".join(map(str, self.upstream.servers)) or "(none)"
        if self.upstream.from_resolv_conf:
            up += " (from /etc/resolv.conf)"
        anchors = ["builtin root"] if self.dnssec.builtin_root_anchors else []
        anchors += [str(p) for p in self.dnssec.trust_anchor_files]
        lines = [
            f"config: {self.path or '(defaults)'}",
            f"listen: {', '.join(map(str, self.server.listen))} (UDP+TCP)",
            f"upstream: {up}",
            f"trust anchors: {', '.join(anchors) or '(none)'}",
            f"negative trust anchors: {', '.join(self.dnssec.negative_trust_anchors) or '(none)'}",
            f"cache: {self.cache.max_entries} entries, max_ttl {self.cache.max_ttl} s",
            f"log level: {self.log.level}",
        ]
        if self.sections:
            lines.append(f"other tables: {', '.join(sorted(self.sections))}")
        return "\n".join(lines)


def parse_endpoint(text: str, default_port: int = DNS_PORT) -> Endpoint:
    """Parse "ADDR", "ADDR:PORT", "[V6]:PORT" or a bare IPv6 address.

    Raises:
        ValueError: with a short sentence saying what is wrong.
    """
    host, port = text.strip(), default_port
    if host.startswith("["):
        close = host.find("]")
        if close < 0:
            raise ValueError(f"{text!r}: missing ']'")
        rest = host[close + 1:]
        host = host[1:close]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif host.count(":") == 1:
        host, _, p = host.partition(":")
        port = _port(p, text)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: not an IP address (names are not allowed here)") from None
    return Endpoint(str(addr), port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(text)


def _endpoints(table: Table, key: str, default: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    items = table.strings(key)
    if items is None:
        return default
    out = []
    for item in items:
        try:
            out.append(parse_endpoint(item))
        except ValueError as e:
            raise table.fail(key, str(e)) from None
    return tuple(out)


def _server(t: Table) -> ServerConfig:
    d = ServerConfig()
    listen = _endpoints(t, "listen", d.listen)
    if not listen:
        raise t.fail("listen", "must list at least one address")
    cfg = ServerConfig(
        listen=listen,
        edns_payload=t.get("edns_payload", int, d.edns_payload,
                           lambda v: None if 512 <= v <= 4096 else "must be 512-4096"),
        tcp_idle_timeout=t.get("tcp_idle_timeout", float, d.tcp_idle_timeout, positive),
        tcp_max_connections=t.get("tcp_max_connections", int, d.tcp_max_connections,
                                  at_least(1)),
        tcp_max_pipelined=t.get("tcp_max_pipelined", int, d.tcp_max_pipelined, at_least(1)),
        query_timeout=t.get("query_timeout", float, d.query_timeout, positive),
    )
    t.done()
    return cfg


def _upstream(t: Table, listen: tuple[Endpoint, ...], resolv_conf: Path,
              override: tuple[Endpoint, ...]) -> UpstreamConfig:
    d = UpstreamConfig()
    servers = override or _endpoints(t, "servers", ())
    t.seen.add("servers")
    from_file = "servers" not in t.raw and not override
    if from_file:
        servers = default_upstreams(listen, resolv_conf)
    cfg = UpstreamConfig(
        servers=servers,
        timeout=t.get("timeout", float, d.timeout, positive),
        attempts=t.get("attempts", int, d.attempts, at_least(1)),
        tcp_timeout=t.get("tcp_timeout", float, d.tcp_timeout, positive),
        from_resolv_conf=from_file,
    )
    t.done()
    if not cfg.servers:
        where = (f"no usable nameserver in {resolv_conf} (ours excluded)" if from_file
                 else "empty list")
        raise t.fail("servers", f"no upstream resolver: {where}; set [upstream] servers")
    return cfg


def _dnssec(t: Table, base: Path) -> DnssecConfig:
    d = DnssecConfig()
    files = t.strings("trust_anchor_files") or ()
    paths = tuple((base / f) if not Path(f).is_absolute() else Path(f) for f in files)
    for p in paths:
        if not p.is_file():
            raise t.fail("trust_anchor_files", f"{p}: no such file")
    ntas = t.strings("negative_trust_anchors") or ()
    for n in ntas:
        if not n or any(c.isspace() for c in n) or ".." in n:
            raise t.fail("negative_trust_anchors", f"{n!r} is not a domain name")
    cfg = DnssecConfig(
        builtin_root_anchors=t.get("builtin_root_anchors", bool, d.builtin_root_anchors),
        trust_anchor_files=paths,
        negative_trust_anchors=ntas,
    )
    t.done()
    if not cfg.builtin_root_anchors and not cfg.trust_anchor_files:
        raise t.fail("builtin_root_anchors",
                     "false and no trust_anchor_files: nothing could ever validate")
    return cfg


def _cache(t: Table) -> CacheConfig:
    d = CacheConfig()
    cfg = CacheConfig(
        max_entries=t.get("max_entries", int, d.max_entries, at_least(16)),
        max_ttl=t.get("max_ttl", int, d.max_ttl, at_least(0)),
        bogus_ttl=t.get("bogus_ttl", int, d.bogus_ttl, at_least(0)),
        failure_ttl=t.get("failure_ttl", int, d.failure_ttl, between(1, 300)),
        negative_max_ttl=t.get("negative_max_ttl", int, d.negative_max_ttl, at_least(0)),
    )
    t.done()
    return cfg


def _limits(t: Table) -> LimitsConfig:
    d = LimitsConfig()
    values = {name: t.get(name, int, getattr(d, name), at_least(1))
              for name in LimitsConfig.__dataclass_fields__}
    t.done()
    return LimitsConfig(**values)


def _log(t: Table) -> LogConfig:
    d = LogConfig()
    cfg = LogConfig(
        level=t.get("level", str, d.level,
                    lambda v: None if v in LOG_LEVELS else f"must be one of {LOG_LEVELS}"),
        debug_queries=t.get("debug_queries", bool, d.debug_queries),
    )
    t.done()
    return cfg


def default_upstreams(listen: tuple[Endpoint, ...], resolv_conf: Path = RESOLV_CONF
                      ) -> tuple[Endpoint, ...]:
    """The nameservers of resolv.conf that are not this resolver itself.

    A nameserver is "us" when it equals one of our listen addresses on port 53, or when we
    listen on a wildcard address and it is a loopback address: forwarding to ourselves would
    loop. Zone indexes (fe80::1%eth0) are not supported and skipped.
    """
    try:
        text = resolv_conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    ours = {(ipaddress.ip_address(e.host), e.port) for e in listen}
    wildcard = any(ipaddress.ip_address(e.host).is_unspecified and e.port == DNS_PORT
                   for e in listen)
    out: list[Endpoint] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            addr = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        if (addr, DNS_PORT) in ours or (wildcard and addr.is_loopback):
            continue
        ep = Endpoint(str(addr))
        if ep not in out:
            out.append(ep)
    return tuple(out)


def load(path: Path | None, *, listen_override: tuple[Endpoint, ...] = (),
         upstream_override: tuple[Endpoint, ...] = (), resolv_conf: Path = RESOLV_CONF
         ) -> Config:
    """Read and check the configuration file (None: all defaults).

    Args:
        path: the TOML file.
        listen_override: from --listen; replaces [server] listen (and so affects which
            resolv.conf nameservers count as "ourselves").
        upstream_override: from --upstream; replaces [upstream] servers.
        resolv_conf: where default upstreams come from (a parameter for tests).

    Raises:
        ConfigError: naming the file, table and key, and the problem.
    """
    where = str(path) if path is not None else "(defaults)"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known = {"server", "upstream", "dnssec", "cache", "limits", "log", *PASSTHROUGH_TABLES}
    for name in raw:
        if name not in known:
            raise ConfigError(f"{where}: unknown table [{name}] "
                              f"(known: {', '.join(sorted(known))})")

    def table(name: str) -> Table:
        return Table(where, name, raw.get(name, {}))

    server = _server(table("server"))
    if listen_override:
        server = ServerConfig(**{**_asdict(server), "listen": listen_override})
    base = path.parent if path is not None else Path.cwd()
    sections: dict[str, Mapping[str, Any]] = {}
    for name in PASSTHROUGH_TABLES:
        if name in raw:
            if not isinstance(raw[name], dict):
                raise ConfigError(f"{where}: [{name}] must be a table, not {type_name(raw[name])}")
            sections[name] = raw[name]
    return Config(
        path=path,
        server=server,
        upstream=_upstream(table("upstream"), server.listen, resolv_conf, upstream_override),
        dnssec=_dnssec(table("dnssec"), base),
        cache=_cache(table("cache")),
        limits=_limits(table("limits")),
        log=_log(table("log")),
        sections=sections,
    )


def _asdict(obj: ServerConfig) -> dict[str, Any]:
    # dataclasses.asdict would deep-copy Endpoints into dicts; we want them as they are.
    return {name: getattr(obj, name) for name in ServerConfig.__dataclass_fields__}
