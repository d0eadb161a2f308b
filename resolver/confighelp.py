"""The configuration part of `ipseckey-resolver --help`, made by running the real parsers.

Why generated: a hand copy drifts (its [policy] example ".corp.example." was one the parser
refuses). Here every table's own parser is run on a `configtable.Table` holding only the
EXAMPLES below; the table records each key the parser asks for with its default, and those are
what is printed, as TOML a user can paste. So a new key shows up by itself, a default is the
one the code uses, and an example that stops parsing breaks --help (and its test) at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from resolver import config
from resolver.configtable import REQUIRED, Table, toml_value
from resolver.endpoints.config import ControlConfig
from resolver.policy import PolicyConfig
from resolver.responder.core import ResponderConfig
from resolver.service.config import DebugConfig, MetricsConfig
from resolver.tunnels.config import Identity, ProvisionConfig

# Every table, in the order --help shows them, with its parser.
SECTIONS: Final[tuple[tuple[str, Callable[[Table], object]], ...]] = (
    ("server", config.parse_server),
    ("upstream", lambda t: config.parse_upstream(t, config.ServerConfig().listen,
                                                 config.RESOLV_CONF, ())),
    ("dnssec", lambda t: config.parse_dnssec(t, Path("/"))),  # no example names a file
    ("cache", config.parse_cache),
    ("limits", lambda t: config.parse_limits(t, config.CacheConfig())),
    ("log", config.parse_log),
    ("identity", Identity.from_table),
    ("provision", ProvisionConfig.from_table),
    ("policy", PolicyConfig.from_table),
    ("control", ControlConfig.from_table),
    ("responder", ResponderConfig.from_table),
    ("metrics", MetricsConfig.from_table),
    ("debug", DebugConfig.from_table),
)

# Values for keys whose default shows nothing useful (none, empty, or read from the system).
EXAMPLES: Final[dict[str, dict[str, Any]]] = {
    "upstream": {"servers": ["192.0.2.1", "[2001:db8::1]:53"]},
    "dnssec": {"negative_trust_anchors": ["corp.example."]},
    "identity": {"fqdn": "alice.example.com", "private_key": "/etc/ipseckey-resolver/key.pem",
                 "addresses": ["198.51.100.10", "2001:db8::10"]},
    "policy": {"private": ["198.51.100.0/24", "corp.example."], "block": ["ads.example."]},
    "metrics": {"listen": "127.0.0.1:9153"},
}

# What the value alone does not say.
NOTES: Final[dict[tuple[str, str], str]] = {
    ("upstream", "servers"): "unset: resolv_conf's, except us; tls://ADDR#NAME: DoT",
    ("upstream", "mode"): "forwarders passing a DNSSEC probe, else iterate; or forward, iterate",
    ("upstream", "resolv_conf"): "followed when servers is unset",
    ("upstream", "probe_ds"): "auto: the probe's DS (besides . DNSKEY)",
    ("upstream", "tls_ca_file"): "tls:// servers; \"\": the system's CAs",
    ("upstream", "probe_interval"): "auto: s between probes of failed forwarders",
    ("upstream", "root_hints"): "iterate; unset: the 13 IANA root servers",
    ("dnssec", "trust_anchor_files"): "DS/DNSKEY lines or BIND trust-anchors blocks",
    ("dnssec", "negative_trust_anchors"): "names not validated (RFC 7646)",
    ("limits", "max_upstream_queries"): "per client query (DESIGN.md: Limits)",
    ("identity", "private_key"): "PKCS#8 PEM, mode 0600",
    ("identity", "addresses"): "the host's own are read too",
    ("provision", "backend"): "or \"dryrun\" (logs only)",
    ("provision", "shunts"): "or \"none\"",
    ("provision", "state_file"): "the tunnels, so a restart keeps them",
    ("provision", "watch_interval"): "s between checks of charon's SAs (besides its events)",
    ("provision", "worker_process"): "false: VICI and XFRM in threads of the daemon",
    ("provision", "dpd_delay"): "s of silence before charon checks a peer (DPD); 0: off",
    ("policy", "default"): "group of what no rule matches",
    ("control", "state_file"): "the endpoints autosp pinned",
    ("responder", "accept"): "\"any\", \"none\", or name suffixes",
    ("responder", "allow_keys"): "fingerprints, as `autosp list` shows them",
    ("responder", "match_address"): "source among the name's secure A/AAAA",
    ("metrics", "listen"): "unset: no listener (autosp stats still works)",
    ("debug", "allow_hang"): "true: debug-hang blocks the loop (watchdog test)",
}

_COMMENT_COLUMN: Final = 44


def section_lines(name: str, parse: Callable[[Table], object]) -> list[str]:
    """`[name]` and a `key = value` line for every key its parser reads."""
    examples = EXAMPLES.get(name, {})
    table = Table("--help", name, dict(examples))
    parse(table)  # an example the parser refuses raises here, not in a user's face
    lines = [f"[{name}]"]
    for key, default in table.defaults.items():
        if key in examples:
            line = f"{key} = {toml_value(examples[key])}"
            note = "required" if default is REQUIRED else (
                "example" if default in (None, ()) else f"example; default {toml_value(default)}")
        else:
            line, note = f"{key} = {toml_value(default)}", ""
        note = "; ".join(n for n in (note, NOTES.get((name, key), "")) if n)
        lines.append(f"{line.ljust(_COMMENT_COLUMN)} # {note}" if note else line)
    return lines


def config_help() -> str:
    """The configuration summary for --help's epilog."""
    out = ["configuration file (TOML): every key with its default, or an example where",
           "there is no default to show; a table or key left out takes its default."]
    for name, parse in SECTIONS:
        out += ["  " + line for line in section_lines(name, parse)]
    out += ["", "With [identity] (and [provision]) A/AAAA lookups capture IPSECKEY records and",
            "bring tunnels up before answering; without them the daemon is a plain validating",
            "resolver. Policy groups and the decision table: resolver/policy.py."]
    return "\n".join(out)
