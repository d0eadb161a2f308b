"""`[upstream] mode` and `root_hints`: parsing, errors, and which upstream the daemon builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from resolver.cli import build_upstream, main
from resolver.config import HostPort, load
from resolver.errors import ConfigError
from resolver.iterate.hints import ROOT_SERVERS
from resolver.iterate.iterator import Iterator
from resolver.resolve import Fetch, Validating
from tests.helpers import write_config


def no_validator(fetch: Fetch) -> Validating:
    raise AssertionError("no probe runs in these tests")


def test_auto_is_the_default(tmp_path: Path) -> None:
    cfg, rc = write_config(tmp_path, "")
    c = load(cfg, resolv_conf=rc)
    assert c.upstream.mode == "auto" and c.upstream.root_hints == ()
    selector = build_upstream(c, no_validator)
    assert selector.config.mode == "auto" and selector.servers == (HostPort("192.0.2.53"),)
    assert isinstance(selector.iterator(), Iterator)  # where it goes when the probe fails


def test_iterate_needs_no_forwarder_and_takes_root_hints(tmp_path: Path) -> None:
    cfg, rc = write_config(tmp_path, '[upstream]\nmode = "iterate"\n'
                              'root_hints = ["198.51.100.2", "[2001:db8:100::2]:5353"]\n',
                    resolv="nameserver 127.0.0.1\n")  # only ourselves: fine when iterating
    c = load(cfg, resolv_conf=rc)
    assert c.upstream.mode == "iterate"
    assert c.upstream.root_hints == (HostPort("198.51.100.2"), HostPort("2001:db8:100::2", 5353))
    it = build_upstream(c, no_validator).iterator()
    assert isinstance(it, Iterator)
    assert it.hints.hints == (("198.51.100.2", 53), ("2001:db8:100::2", 5353))
    assert "iterate from the root, hints: 198.51.100.2:53" in c.summary()


def test_builtin_root_hints_are_the_iana_servers(tmp_path: Path) -> None:
    cfg, rc = write_config(tmp_path, '[upstream]\nmode = "iterate"\n')
    it = build_upstream(load(cfg, resolv_conf=rc), no_validator).iterator()
    assert isinstance(it, Iterator)
    assert len(it.hints.ns) == 13 and len(ROOT_SERVERS) == 13
    assert it.hints.glue[it.hints.ns[0]] == ("198.41.0.4", "2001:503:ba3e::2:30")


@pytest.mark.parametrize(("text", "message"), [
    ('[upstream]\nmode = "recursive"\n',
     r"\[upstream\] key 'mode': must be one of auto, forward, iterate"),
    ('[upstream]\nmode = "iterate"\nroot_hints = ["a.root-servers.net"]\n',
     r"\[upstream\] key 'root_hints': .*not an IP address"),
    ('[upstream]\nmode = "forward"\nservers = []\n', r"no upstream resolver"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg, rc = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message):
        load(cfg, resolv_conf=rc)


def test_check_config_shows_the_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    cfg, _rc = write_config(tmp_path, '[upstream]\nmode = "iterate"\n')
    assert main(["--config", str(cfg), "--check-config"]) == 0
    assert "upstream: iterate from the root, hints: built-in (IANA)" in capsys.readouterr().out
