"""Configuration: defaults, every table, and errors that name file, table and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.config import HostPort, load, parse_hostport, parse_upstream_server
from resolver.errors import ConfigError
from resolver.validator.types import Limits
from tests.helpers import write_config


def test_defaults(tmp_path: Path) -> None:
    cfg, rc = write_config(tmp_path, "")
    c = load(cfg, resolv_conf=rc)
    assert c.server.listen == (HostPort("127.0.0.1", 53), HostPort("::1", 53))
    assert c.server.edns_payload == 1232
    assert c.upstream.servers == (HostPort("192.0.2.53"),) and c.upstream.from_resolv_conf
    assert c.dnssec.builtin_root_anchors and c.dnssec.trust_anchor_files == ()
    assert c.cache.max_ttl == 86400 and c.cache.bogus_ttl == 60
    assert c.limits == Limits()
    assert c.sections == {}


def test_no_file_means_defaults(tmp_path: Path) -> None:
    _, rc = write_config(tmp_path, "")
    assert load(None, resolv_conf=rc).server.listen[0] == HostPort("127.0.0.1")


def test_default_upstreams_exclude_ourselves(tmp_path: Path) -> None:
    resolv = ("# comment\nnameserver 127.0.0.1\nnameserver ::1\nnameserver 127.0.0.53\n"
              "nameserver 198.51.100.53 # lab\nsearch example.test\nnameserver bogus\n"
              "nameserver 198.51.100.53\n")
    cfg, rc = write_config(tmp_path, "", resolv)
    c = load(cfg, resolv_conf=rc)
    # 127.0.0.1 and ::1 are our listen addresses; 127.0.0.53 (systemd-resolved) is not us.
    assert c.upstream.servers == (HostPort("127.0.0.53"), HostPort("198.51.100.53"))
    # Listening on a wildcard: every loopback nameserver could be us.
    c = load(cfg, resolv_conf=rc, listen_override=(HostPort("0.0.0.0"),))
    assert c.upstream.servers == (HostPort("198.51.100.53"),)


def test_only_ourselves_in_resolv_conf_starts_and_follows_the_file(tmp_path: Path) -> None:
    # The README's `echo "nameserver 127.0.0.1" > /etc/resolv.conf`: the next start must work
    # (auto iterates; forward answers SERVFAIL until the file names a forwarder).
    for mode in ("auto", "forward"):
        cfg, rc = write_config(tmp_path, f'[upstream]\nmode = "{mode}"\n', "nameserver 127.0.0.1\n")
        c = load(cfg, resolv_conf=rc)
        assert c.upstream.servers == () and c.upstream.from_resolv_conf
        assert c.upstream.resolv_conf == rc
    assert load(write_config(tmp_path, "")[0], resolv_conf=rc).upstream.mode == "auto"


def test_resolv_conf_key_names_the_file_to_follow(tmp_path: Path) -> None:
    other = tmp_path / "nm-resolv.conf"
    other.write_text("nameserver 198.51.100.7\n")
    cfg, rc = write_config(tmp_path, '[upstream]\nresolv_conf = "nm-resolv.conf"\n')
    c = load(cfg, resolv_conf=rc)
    assert c.upstream.resolv_conf == other and c.upstream.from_resolv_conf
    assert c.upstream.servers == (HostPort("198.51.100.7"),)
    assert f"(from {other}, followed)" in c.summary()


def test_tls_servers_and_probe_keys(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg, rc = write_config(tmp_path, '[upstream]\nservers = ["tls://9.9.9.9#dns.quad9.net", '
                              '"tls://[2001:db8::9]:8853#dot.example.", "192.0.2.1"]\n'
                              'probe_ds = "test"\nprobe_interval = 5\ntls_ca_file = "ca.pem"\n')
    up = load(cfg, resolv_conf=rc).upstream
    assert up.servers == (HostPort("9.9.9.9", 853, "dns.quad9.net"),
                          HostPort("2001:db8::9", 8853, "dot.example"), HostPort("192.0.2.1"))
    assert [str(s) for s in up.servers] == ["tls://9.9.9.9:853#dns.quad9.net",
                                            "tls://[2001:db8::9]:8853#dot.example",
                                            "192.0.2.1:53"]
    assert str(parse_upstream_server(str(up.servers[1]))) == str(up.servers[1])  # round trip
    assert up.probe_ds == "test." and up.probe_interval == 5.0
    assert up.tls_ca_file == tmp_path / "ca.pem"


FULL = """
[server]
listen = ["127.0.0.2:5353", "[::1]:5353", "192.0.2.1"]
edns_payload = 1400
tcp_idle_timeout = 5
[upstream]
servers = ["198.51.100.53", "[2001:db8::53]:5300"]
timeout = 0.5
attempts = 3
[dnssec]
builtin_root_anchors = false
trust_anchor_files = ["root.key"]
negative_trust_anchors = ["corp.example."]
[cache]
max_entries = 500
max_ttl = 600
[limits]
max_upstream_queries = 20
max_nsec3_iterations = 1
[log]
level = "debug"
[policy]
default = "private-or-clear"
[control]
socket = "/run/x.sock"
"""


def test_full_file(tmp_path: Path) -> None:
    cfg, rc = write_config(tmp_path, FULL)
    (tmp_path / "root.key").write_text(". IN DS 1 8 2 00\n")
    c = load(cfg, resolv_conf=rc)
    assert c.server.listen == (HostPort("127.0.0.2", 5353), HostPort("::1", 5353),
                               HostPort("192.0.2.1", 53))
    assert c.server.edns_payload == 1400 and c.server.tcp_idle_timeout == 5.0
    assert c.upstream.servers == (HostPort("198.51.100.53"), HostPort("2001:db8::53", 5300))
    assert not c.upstream.from_resolv_conf and c.upstream.attempts == 3
    assert c.dnssec.trust_anchor_files == (tmp_path / "root.key",)
    assert c.dnssec.negative_trust_anchors == ("corp.example.",)
    assert c.cache.max_entries == 500 and c.limits.max_nsec3_iterations == 1
    # [limits] max_upstream_queries is the validator's max_fetches; [cache] sizes its cache.
    assert c.limits.max_fetches == 20
    assert c.limits.cache_entries == 500 and c.limits.bogus_ttl == c.cache.bogus_ttl
    assert c.log.level == "debug"
    assert c.sections == {"policy": {"default": "private-or-clear"},
                          "control": {"socket": "/run/x.sock"}}
    assert "198.51.100.53:53" in c.summary()


@pytest.mark.parametrize(("text", "message"), [
    ("[server]\nlisten = [\"localhost\"]", r"\[server\] key 'listen': 'localhost': not an IP"),
    ("[server]\nlisten = \"127.0.0.1\"", r"\[server\] key 'listen': expected a list of strings"),
    ("[server]\nlisten = []", r"\[server\] key 'listen': must list at least one"),
    ("[server]\nlisten = [\"127.0.0.1:99999\"]", r"key 'listen': .*port must be 1-65535"),
    ("[server]\nedns_payload = 100",
     r"\[server\] key 'edns_payload': must be between 512 and 4096"),
    ("[server]\nedns_payload = \"big\"", r"key 'edns_payload': expected an integer, got a string"),
    ("[server]\nlisten_addr = 1", r"\[server\] key 'listen_addr': unknown key"),
    ("[upstream]\ntimeout = 0", r"\[upstream\] key 'timeout': must be greater than 0"),
    ("[upstream]\nattempts = true",
     r"\[upstream\] key 'attempts': expected an integer, got a boolean"),
    ("[upstream]\nservers = [\"8.8.8.8:0\"]", r"\[upstream\] key 'servers': .*port"),
    ("[upstream]\nservers = [\"tls://9.9.9.9\"]", r"key 'servers': .*needs '#NAME'"),
    ("[upstream]\nservers = [\"tls://dns.quad9.net#x\"]", r"key 'servers': .*not an IP"),
    ("[upstream]\nservers = [\"tls://9.9.9.9#a b\"]", r"key 'servers': .*not a host name"),
    ("[upstream]\nmode = \"hybrid\"", r"key 'mode': must be one of auto, forward, iterate"),
    ("[upstream]\nprobe_interval = 0", r"key 'probe_interval': must be between 1 and"),
    ("[upstream]\nprobe_ds = \"a..b\"", r"key 'probe_ds': 'a..b' is not a domain name"),
    ("[upstream]\ntls_ca_file = \"nope.pem\"", r"key 'tls_ca_file': .*nope.pem: no such file"),
    ("[upstream]\nresolv_conf = \"\"", r"key 'resolv_conf': must not be empty"),
    ("[server]\nlisten = [\"tls://127.0.0.1#x\"]",
     r"\[server\] key 'listen': .*tls:// is for forwarders only"),
    ("[dnssec]\ntrust_anchor_files = [\"/nonexistent/root.key\"]",
     r"\[dnssec\] key 'trust_anchor_files': /nonexistent/root.key: no such file"),
    ("[dnssec]\nbuiltin_root_anchors = false",
     r"\[dnssec\] key 'builtin_root_anchors': false and no trust_anchor_files"),
    ("[dnssec]\nbuiltin_root_anchors = \"yes\"",
     r"key 'builtin_root_anchors': expected true or false"),
    ("[cache]\nmax_entries = 1", r"\[cache\] key 'max_entries': must be at least 16"),
    ("[limits]\nmax_ds = 0", r"\[limits\] key 'max_ds': must be at least 1"),
    ("[limits]\nmax_everything = 3", r"\[limits\] key 'max_everything': unknown key"),
    ("[log]\nlevel = \"loud\"", r"\[log\] key 'level': must be one of debug, info, warning"),
    ("[log]\nlevl = 1", r"\[log\] key 'levl': unknown key \(known keys: level, debug_queries\)"),
    ("[dns]\nx = 1", r"unknown table \[dns\]"),
    ("server = 1", r"\[server\] must be a table"),
    ("[policy\n", r"not valid TOML"),
])
def test_errors_name_file_table_and_key(tmp_path: Path, text: str, message: str) -> None:
    cfg, rc = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load(cfg, resolv_conf=rc)
    assert str(info.value).startswith(str(cfg))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


@pytest.mark.parametrize(("text", "ep"), [
    ("192.0.2.1", HostPort("192.0.2.1", 53)),
    ("192.0.2.1:5300", HostPort("192.0.2.1", 5300)),
    ("::1", HostPort("::1", 53)),
    ("[::1]:5300", HostPort("::1", 5300)),
    ("[2001:DB8::1]", HostPort("2001:db8::1", 53)),
])
def test_parse_hostport(text: str, ep: HostPort) -> None:
    assert parse_hostport(text) == ep
