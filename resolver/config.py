"""The resolver's configuration: one TOML file, every setting with a default.

Theory of operation: `load(path)` reads the file with tomllib and hands each table this module
owns to its parser (`parse_server`, `parse_upstream`, `parse_dnssec`, `parse_cache`,
`parse_limits`, `parse_log`), which reads it key by key through configtable.Table into a frozen
dataclass; [limits] goes straight into the validator's own `Limits`. Tables owned by other
modules ([policy] [provision] [control] [identity]) are passed through raw in `Config.sections`
and parsed by their owners through the same Table. Anything wrong (an unknown table, an unknown
key, a wrong type or range) is a `ConfigError` whose message names the file, the table, the key
and the problem, so an operator never has to guess. `--help` prints every key with its default
by running these same parsers (confighelp.py).

Nothing here opens sockets. The one piece of the environment we read is /etc/resolv.conf (or
`[upstream] resolv_conf`), for the default forwarder list (the system's nameservers minus this
resolver's own addresses); resolver/upstream/resolvconf.py watches the same file and re-reads it
with
`nameservers_in` when the network changes it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from resolver.configtable import Table, at_least, between, non_empty, one_of, positive
from resolver.errors import ConfigError
from resolver.validator.types import Limits

DNS_PORT: Final = 53
DOT_PORT: Final = 853  # DNS over TLS, RFC 7858
TLS_SCHEME: Final = "tls://"
RESOLV_CONF: Final = Path("/etc/resolv.conf")
PASSTHROUGH_TABLES: Final = ("policy", "provision", "control", "identity", "metrics", "debug",
                             "responder")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class HostPort:
    """An IP address and port: a listen address or an upstream server.

    (Not an "endpoint": in resolver/endpoints that word means a peer pinned by name.)
    """

    host: str
    port: int = DNS_PORT
    # A forwarder asked over TLS (RFC 7858) whose certificate must carry this name; "" = plain
    # DNS. Only `[upstream] servers` (and --upstream) accept it: `tls://ADDR[:PORT]#NAME`.
    tls_name: str = ""

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"{TLS_SCHEME}{text}#{self.tls_name}" if self.tls_name else text

    @property
    def family(self) -> int:
        """4 or 6."""
        return ipaddress.ip_address(self.host).version


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: where we listen and how we treat clients."""

    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1"), HostPort("::1"))
    edns_payload: int = 1232  # RFC 9715 / DNS flag day 2020: no fragmentation
    tcp_idle_timeout: float = 10.0  # seconds a TCP connection may sit without a query
    tcp_max_connections: int = 256
    tcp_max_pipelined: int = 64  # queries in progress on one TCP connection
    query_timeout: float = 10.0  # a client query that takes longer gets SERVFAIL
    # Issue 10 (slow-loris, clients that never read): a TCP frame must arrive whole, and our
    # buffered output must drain, within tcp_frame_timeout; no connection lives longer than
    # tcp_max_lifetime; at most tcp_max_buffered bytes of replies wait for one peer.
    tcp_frame_timeout: float = 3.0
    tcp_max_lifetime: float = 120.0
    tcp_max_buffered: int = 131072


# "auto": forward while the forwarders pass a DNSSEC probe, else iterate
# (resolver/upstream/select.py); "forward": to `servers` (DO=1, CD=1) whatever they do;
# "iterate": from the root (resolver/iterate/iterator.py).
UPSTREAM_MODES: Final = ("auto", "forward", "iterate")


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """[upstream]: where answers come from: forwarders, or iteration from the root."""

    mode: str = "auto"  # one of UPSTREAM_MODES
    root_hints: tuple[HostPort, ...] = ()  # iterate: root server addresses; () = IANA's
    servers: tuple[HostPort, ...] = ()
    timeout: float = 1.5  # per attempt on one server
    attempts: int = 2  # rounds over the whole server list
    tcp_timeout: float = 3.0
    # Filled in from `resolv_conf` when `servers` is not set; then that file is watched.
    from_resolv_conf: bool = False
    resolv_conf: Path = RESOLV_CONF
    probe_interval: float = 60.0  # auto: seconds between probes of failed forwarders
    probe_ds: str = "com."  # auto: the DS the probe asks for (besides the root DNSKEY)
    tls_ca_file: Path | None = None  # tls:// forwarders: CA bundle; None: the system's


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


# The [limits] keys, each a field of the validator's Limits (DESIGN.md, "Limits that keep the
# resolver alive"), which is what [limits] is parsed into. One key is named differently:
# max_upstream_queries sets Limits.max_fetches, because the resolution core (resolve.py) holds
# the client query's own lookups to the same number, not only the validator's DS/DNSKEY fetches,
# and the key says so. The other Limits fields are not settable here, or come from [cache].
LIMIT_KEYS: Final = {"max_upstream_queries": "max_fetches", **{name: name for name in (
    "max_keys_per_tag", "max_sig_checks_per_rrset", "max_sig_checks_per_query",
    "max_sig_failures_per_query", "max_ds", "max_ds_mismatches", "max_nsec3_records",
    "max_nsec3_iterations", "max_nsec3_salt", "max_nsec3_hashes", "max_cname_chain",
    "max_referrals", "max_ns_lookups", "max_ns_per_referral", "max_iteration_depth")}}


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
    limits: Limits = field(default_factory=Limits)
    log: LogConfig = field(default_factory=LogConfig)
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def summary(self) -> str:
        """A few human-readable lines for --check-config."""
        up = ", ".join(map(str, self.upstream.servers)) or "(none)"
        if self.upstream.from_resolv_conf:
            up += f" (from {self.upstream.resolv_conf}, followed)"
        if self.upstream.mode == "auto":
            up = f"auto: forward to {up} while they pass the DNSSEC probe, else iterate"
        elif self.upstream.mode == "iterate":
            up = "iterate from the root, hints: " + (
                ", ".join(map(str, self.upstream.root_hints)) or "built-in (IANA)")
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


def parse_hostport(text: str, default_port: int = DNS_PORT) -> HostPort:
    """Parse "ADDR", "ADDR:PORT", "[V6]:PORT" or a bare IPv6 address.

    Raises:
        ValueError: with a short sentence saying what is wrong.
    """
    host, port = text.strip(), default_port
    if host.startswith(TLS_SCHEME):
        raise ValueError(f"{text!r}: tls:// is for forwarders only ([upstream] servers)")
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
    return HostPort(str(addr), port)


def parse_upstream_server(text: str) -> HostPort:
    """A forwarder: what parse_hostport takes, or `tls://ADDR[:PORT]#NAME` (DNS over TLS,
    port 853 by default, NAME the name the server's certificate must carry).

    Raises:
        ValueError: with a short sentence saying what is wrong.
    """
    if not text.startswith(TLS_SCHEME):
        return parse_hostport(text)
    where, sep, name = text[len(TLS_SCHEME):].partition("#")
    name = name.strip().rstrip(".")
    if not sep or not name:
        raise ValueError(f"{text!r}: a tls:// server needs '#NAME', the name its "
                         "certificate carries (e.g. tls://9.9.9.9#dns.quad9.net)")
    if any(c.isspace() or c in "/:[]@" for c in name):
        raise ValueError(f"{text!r}: {name!r} is not a host name")
    hp = parse_hostport(where, DOT_PORT)
    return HostPort(hp.host, hp.port, name)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: port must be 1-65535")
    return int(text)


def parse_server(t: Table) -> ServerConfig:
    """[server] (every table parser reads a configtable.Table and calls its done())."""
    d = ServerConfig()
    listen = t.each("listen", parse_hostport, d.listen)
    if not listen:
        raise t.fail("listen", "must list at least one address")
    cfg = ServerConfig(
        listen=listen,
        edns_payload=t.get("edns_payload", int, d.edns_payload, between(512, 4096)),
        tcp_idle_timeout=t.get("tcp_idle_timeout", float, d.tcp_idle_timeout, positive),
        tcp_max_connections=t.get("tcp_max_connections", int, d.tcp_max_connections,
                                  at_least(1)),
        tcp_max_pipelined=t.get("tcp_max_pipelined", int, d.tcp_max_pipelined, at_least(1)),
        query_timeout=t.get("query_timeout", float, d.query_timeout, positive),
        tcp_frame_timeout=t.get("tcp_frame_timeout", float, d.tcp_frame_timeout, positive),
        tcp_max_lifetime=t.get("tcp_max_lifetime", float, d.tcp_max_lifetime, positive),
        # At least one largest reply (2-byte length + 65535) must fit.
        tcp_max_buffered=t.get("tcp_max_buffered", int, d.tcp_max_buffered, at_least(65537)),
    )
    t.done()
    return cfg


def parse_upstream(t: Table, listen: tuple[HostPort, ...], resolv_conf: Path,
                   override: tuple[HostPort, ...], base: Path | None = None) -> UpstreamConfig:
    """[upstream]. `override` (--upstream) replaces servers; without either, the
    nameservers of the `resolv_conf` key's file (default: the `resolv_conf` argument) that
    are not one of `listen` (see default_upstreams). `base`: where relative file names start.

    A file with no usable nameserver is not an error: the file is followed (upstream/resolvconf.py),
    so a network that fills it in later (DHCP after boot) is used then; until then `auto` iterates
    and `forward` answers SERVFAIL. Only `forward` with an explicit empty list fails.
    """
    d = UpstreamConfig()
    folder = base or Path.cwd()
    mode = t.get("mode", str, d.mode, one_of(*UPSTREAM_MODES))
    servers = override or t.each("servers", parse_upstream_server, d.servers)
    t.defaults.setdefault("servers", d.servers)  # a known key even when --upstream replaces it
    from_file = "servers" not in t.raw and not override
    follow = folder / t.get("resolv_conf", str, str(resolv_conf), non_empty)
    if from_file:
        servers = default_upstreams(listen, follow)
    probe_ds = t.get("probe_ds", str, d.probe_ds, _domain_name)
    # "" (the default): the system's CA store.
    ca_file = t.get("tls_ca_file", str, "", lambda v: None if not v or (folder / v).is_file()
                    else f"{folder / v}: no such file")
    cfg = UpstreamConfig(
        mode=mode,
        root_hints=t.each("root_hints", parse_hostport, d.root_hints),
        servers=servers,
        timeout=t.get("timeout", float, d.timeout, positive),
        attempts=t.get("attempts", int, d.attempts, at_least(1)),
        tcp_timeout=t.get("tcp_timeout", float, d.tcp_timeout, positive),
        from_resolv_conf=from_file,
        resolv_conf=follow,
        probe_interval=t.get("probe_interval", float, d.probe_interval, between(1, 86400)),
        probe_ds=probe_ds if probe_ds.endswith(".") else probe_ds + ".",
        tls_ca_file=folder / ca_file if ca_file else None,
    )
    t.done()
    if not cfg.servers and cfg.mode == "forward" and not from_file:
        raise t.fail("servers", "no upstream resolver: empty list; list one, or leave the key "
                                "out to follow resolv_conf")
    return cfg


def _domain_name(name: str) -> str | None:
    """A configtable check: None if `name` looks like a domain name, else the problem."""
    if not name or any(c.isspace() for c in name) or ".." in name:
        return f"{name!r} is not a domain name"
    return None


def parse_dnssec(t: Table, base: Path) -> DnssecConfig:
    """[dnssec]; relative anchor file names are taken from `base`, the config's folder."""
    d = DnssecConfig()

    def anchor_file(name: str) -> Path:
        path = base / name  # an absolute name stays as it is
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        return path

    def domain_name(name: str) -> str:
        if not name or any(c.isspace() for c in name) or ".." in name:
            raise ValueError(f"{name!r} is not a domain name")
        return name

    cfg = DnssecConfig(
        builtin_root_anchors=t.get("builtin_root_anchors", bool, d.builtin_root_anchors),
        trust_anchor_files=t.each("trust_anchor_files", anchor_file, d.trust_anchor_files),
        negative_trust_anchors=t.each("negative_trust_anchors", domain_name,
                                      d.negative_trust_anchors),
    )
    t.done()
    if not cfg.builtin_root_anchors and not cfg.trust_anchor_files:
        raise t.fail("builtin_root_anchors",
                     "false and no trust_anchor_files: nothing could ever validate")
    return cfg


def parse_cache(t: Table) -> CacheConfig:
    """[cache]."""
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


def parse_limits(t: Table, cache: CacheConfig) -> Limits:
    """[limits], into the validator's own Limits (see LIMIT_KEYS)."""
    d = Limits()
    values = {name: t.get(key, int, getattr(d, name), at_least(1))
              for key, name in LIMIT_KEYS.items()}
    t.done()
    # The validator's DS/DNSKEY cache follows [cache]: as many entries, bogus kept as long.
    return dataclasses.replace(d, **values, bogus_ttl=cache.bogus_ttl,
                               cache_entries=cache.max_entries)


def parse_log(t: Table) -> LogConfig:
    """[log]."""
    d = LogConfig()
    cfg = LogConfig(
        level=t.get("level", str, d.level, one_of(*LOG_LEVELS)),
        debug_queries=t.get("debug_queries", bool, d.debug_queries),
    )
    t.done()
    return cfg


def default_upstreams(listen: tuple[HostPort, ...], resolv_conf: Path = RESOLV_CONF
                      ) -> tuple[HostPort, ...]:
    """The nameservers of resolv.conf that are not this resolver itself.

    A nameserver is "us" when it equals one of our listen addresses on port 53, or when we
    listen on a wildcard address and it is a loopback address: forwarding to ourselves would
    loop. Zone indexes (fe80::1%eth0) are not supported and skipped.
    """
    try:
        text = resolv_conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return nameservers_in(text, listen)


def nameservers_in(text: str, listen: tuple[HostPort, ...]) -> tuple[HostPort, ...]:
    """The `nameserver` lines of resolv.conf text, without this resolver (default_upstreams)."""
    ours = {(ipaddress.ip_address(e.host), e.port) for e in listen}
    wildcard = any(ipaddress.ip_address(e.host).is_unspecified and e.port == DNS_PORT
                   for e in listen)
    out: list[HostPort] = []
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
        ep = HostPort(str(addr))
        if ep not in out:
            out.append(ep)
    return tuple(out)


def load(path: Path | None, *, listen_override: tuple[HostPort, ...] = (),
         upstream_override: tuple[HostPort, ...] = (), resolv_conf: Path = RESOLV_CONF
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

    server = parse_server(table("server"))
    if listen_override:
        server = dataclasses.replace(server, listen=listen_override)
    base = path.parent if path is not None else Path.cwd()
    cache = parse_cache(table("cache"))
    sections: dict[str, Mapping[str, Any]] = {}
    for name in PASSTHROUGH_TABLES:
        if name in raw:
            sections[name] = Table(where, name, raw[name]).raw  # their owners parse them
    return Config(
        path=path,
        server=server,
        upstream=parse_upstream(table("upstream"), server.listen, resolv_conf, upstream_override,
                                base),
        dnssec=parse_dnssec(table("dnssec"), base),
        cache=cache,
        limits=parse_limits(table("limits"), cache),
        log=parse_log(table("log")),
        sections=sections,
    )

