"""resolver.endpoints.control and .protocol: config, request parsing, and the socket server
driven by autosp's real client (autosp/control.py), on a temporary socket path.

Security requirements S1-S3 of the module docstring each have a test here: the socket is 0600
from birth in a 0700 directory, another uid is refused (by SO_PEERCRED even when the file mode
would let it in), hostile requests (garbage, oversize, silence) get a reply and never stop the
server, a stale socket is replaced but a live one or a regular file is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.name
import pytest

from autosp import control as client
from autosp.cli import main as autosp_main
from autosp.errors import OperationFailed, ResolverUnreachable
from resolver.endpoints import control
from resolver.endpoints.control import ControlConfig, ControlServer, bind_socket, start_control
from resolver.endpoints.protocol import MAX_REQUEST, EndpointError, Request, parse_request
from resolver.errors import ConfigError
from tests.helpers import aio, until

WHEN = 1_800_000_000.0
BOB = dns.name.from_text("bob.example.test.")
ENDPOINT = {"name": "bob.example.test.", "addresses": ["198.51.100.11"], "algorithm": "ed25519",
            "fingerprint": "SHA256:x", "security": "secure", "tunnel": "up",
            "next_refresh": WHEN + 300, "error": ""}


class FakeOps:
    """EndpointOps that records calls; `fail` makes the next call raise it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail: BaseException | None = None
        self.delay = 0.0
        self.finished = 0

    def _maybe_fail(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def add(self, name: dns.name.Name, group: str | None, now: float) -> Any:
        self.calls.append(("add", name, group, now))
        await asyncio.sleep(self.delay)
        self._maybe_fail()
        self.finished += 1
        return ENDPOINT

    async def remove(self, name: dns.name.Name, now: float) -> Any:
        self.calls.append(("remove", name, now))
        self._maybe_fail()
        return {"removed": name.to_text()}

    def list(self, now: float) -> Any:
        self.calls.append(("list", now))
        self._maybe_fail()
        return {"endpoints": [ENDPOINT]}

    def status(self, name: dns.name.Name, now: float) -> Any:
        self.calls.append(("status", name, now))
        self._maybe_fail()
        return ENDPOINT

    async def refresh(self, name: dns.name.Name | None, now: float) -> Any:
        self.calls.append(("refresh", name, now))
        self._maybe_fail()
        return {"endpoints": [ENDPOINT]}


async def serve(tmp_path: Path, ops: FakeOps | None = None, **kw: Any
                ) -> tuple[ControlServer, FakeOps, Path]:
    path = tmp_path / "run" / "control.sock"
    fake = ops or FakeOps()
    server = ControlServer(path, fake, clock=lambda: WHEN, **kw)
    await server.start()
    return server, fake, path


async def ask(path: Path, op: str, **args: Any) -> Any:
    """The real autosp client, in a thread (it is blocking)."""
    return await asyncio.to_thread(client.request, path, op, 5.0, **args)


async def raw(path: Path, data: bytes, *, shut: bool = True) -> dict[str, Any]:
    """Send raw bytes, return the parsed reply."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    if shut:
        writer.write_eof()
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    reply: dict[str, Any] = json.loads(line)
    return reply


# --- config -------------------------------------------------------------------------------


def test_config_defaults_and_values() -> None:
    assert ControlConfig.from_section({}) == ControlConfig(
        True, Path("/run/ipseckey-resolver/control.sock"),
        Path("/var/lib/ipseckey-resolver/endpoints.json"))
    cfg = ControlConfig.from_section({"enabled": False, "socket": "/tmp/x/c.sock",
                                      "state_file": "/tmp/x/e.json"})
    assert cfg == ControlConfig(False, Path("/tmp/x/c.sock"), Path("/tmp/x/e.json"))


@pytest.mark.parametrize(("section", "key", "words"), [
    ({"enabled": "yes"}, "enabled", "true or false"),
    ({"socket": "relative.sock"}, "socket", "absolute"),
    ({"socket": 5}, "socket", "expected a string"),
    ({"socket": "/" + "x" * 120}, "socket", "107 bytes"),
    ({"state_file": ""}, "state_file", "path"),
    ({"sockett": "/a"}, "sockett", "unknown key"),
])
def test_config_errors_name_the_key(section: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        ControlConfig.from_section(section, "/etc/r.toml")
    assert f"/etc/r.toml: [control] key {key!r}" in str(e.value) and words in str(e.value)


# --- request parsing ----------------------------------------------------------------------


def test_parse_valid_requests() -> None:
    assert parse_request(b'{"op": "list"}\n') == Request("list")
    assert parse_request(b'{"op": "add", "name": "bob.example.test", "group": "private"}') == \
        Request("add", BOB, "private")
    assert parse_request(b'{"op": "refresh"}') == Request("refresh")
    assert parse_request(b'{"op": "refresh", "name": "bob.example.test."}') == \
        Request("refresh", BOB)


@pytest.mark.parametrize(("line", "words"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'["list"]', "JSON object"),
    (b'{"op": "format-disk"}', "unknown op"),
    (b'{"op": "list", "evil": 1}', "unknown field"),
    (b'{"op": "add"}', "needs a name"),
    (b'{"op": "list", "name": "x.test"}', "takes no name"),
    (b'{"op": "status", "name": 7}', "must be a string"),
    (b'{"op": "status", "name": "a..b"}', "not a DNS name"),
    (b'{"op": "status", "name": "."}', "root"),
    (b'{"op": "remove", "name": "x.test", "group": "private"}', "only for add"),
    (b"[" * 30_000, "nested too deeply"),
    (b'{"op": ' + b"[" * 30_000, "nested too deeply"),
])
def test_parse_bad_requests(line: bytes, words: str) -> None:
    with pytest.raises(EndpointError) as e:
        parse_request(line)
    assert e.value.code == "bad-request" and words in str(e.value)


# --- the socket -----------------------------------------------------------------------------


@aio
async def test_socket_mode_owner_and_directory(tmp_path: Path) -> None:
    server, _, path = await serve(tmp_path)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    finally:
        await server.close()
    assert not path.exists()  # close removes our socket


def test_socket_is_0600_from_birth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No window with a wider mode: look at the file right after bind, before any chmod."""
    seen: list[int] = []
    real_chmod = os.chmod

    def spy(p: Any, mode: int, **kw: Any) -> None:
        seen.append(stat.S_IMODE(os.lstat(p).st_mode))
        real_chmod(p, mode, **kw)

    monkeypatch.setattr(os, "chmod", spy)
    sock = bind_socket(tmp_path / "c.sock")
    sock.close()
    assert seen == [0o600]


@aio
async def test_every_op_through_the_real_client(tmp_path: Path) -> None:
    server, ops, path = await serve(tmp_path)
    try:
        assert await ask(path, "add", name="bob.example.test.", group="private") == ENDPOINT
        assert await ask(path, "list") == {"endpoints": [ENDPOINT]}
        assert await ask(path, "status", name="bob.example.test.") == ENDPOINT
        assert await ask(path, "refresh") == {"endpoints": [ENDPOINT]}
        assert await ask(path, "refresh", name="bob.example.test.") == {"endpoints": [ENDPOINT]}
        assert await ask(path, "remove", name="bob.example.test.") == {
            "removed": "bob.example.test."}
        assert ops.calls == [("add", BOB, "private", WHEN), ("list", WHEN),
                             ("status", BOB, WHEN), ("refresh", None, WHEN),
                             ("refresh", BOB, WHEN), ("remove", BOB, WHEN)]
    finally:
        await server.close()


@aio
async def test_errors_reach_the_client_with_their_codes(tmp_path: Path) -> None:
    server, ops, path = await serve(tmp_path)
    try:
        ops.fail = EndpointError("no-secure-key", "bob.example.test has no secure IPSECKEY")
        with pytest.raises(OperationFailed, match="no secure IPSECKEY"):
            await ask(path, "add", name="bob.example.test.")
        ops.fail = EndpointError("bad-request", "--group x: not a policy group")
        with pytest.raises(ConfigError, match="not a policy group"):  # autosp exit 2
            await ask(path, "add", name="bob.example.test.", group="x")
        ops.fail = RuntimeError("a bug")
        reply = await raw(path, b'{"op": "list"}\n')
        assert reply == {"ok": False, "code": "internal",
                         "error": "internal error: RuntimeError: a bug"}
        ops.fail = None
        assert await ask(path, "list") == {"endpoints": [ENDPOINT]}  # still serving
    finally:
        await server.close()


@aio
async def test_hostile_requests_get_bad_request(tmp_path: Path) -> None:
    server, ops, path = await serve(tmp_path, read_timeout=0.3)
    try:
        reply = await raw(path, b"{garbage\n")
        assert reply["ok"] is False and reply["code"] == "bad-request"
        reply = await raw(path, b"[" * 30_000 + b"\n")  # deeper than json's recursion limit
        assert reply["code"] == "bad-request" and "nested too deeply" in reply["error"]
        reply = await raw(path, b"x" * (MAX_REQUEST + 10) + b"\n")
        assert reply["code"] == "bad-request" and "longer than" in reply["error"]
        reply = await raw(path, b'{"op": "list"', shut=False)  # no newline, no EOF: silence
        assert reply["code"] == "bad-request" and "no request within" in reply["error"]
        reply = await raw(path, b'{"op": "list"}')  # EOF ends the line: accepted
        assert reply["ok"] is True
        assert ops.calls == [("list", WHEN)]
    finally:
        await server.close()


@aio
async def test_slow_operation_times_out_with_a_reply(tmp_path: Path) -> None:
    ops = FakeOps()
    server, _, path = await serve(tmp_path, ops, op_timeout=0.2)
    ops.delay = 0.5
    try:
        reply = await raw(path, b'{"op": "add", "name": "bob.example.test"}\n')
        assert reply["ok"] is False and "longer than 0.2 s" in reply["error"]
        assert "background" in reply["error"]
        await until(lambda: ops.finished == 1, "the operation finished in the background")
    finally:
        await server.close()


@aio
async def test_peer_uid_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server, ops, path = await serve(tmp_path)
    monkeypatch.setattr(control, "peer_uid", lambda _sock: 4242)
    try:
        reply = await raw(path, b'{"op": "list"}\n')
        assert reply["ok"] is False and reply["code"] == "forbidden"
        with pytest.raises(OperationFailed, match="permission denied: run as root or as the "
                                                  "daemon's user"):  # autosp exit 1
            await ask(path, "list")
        assert ops.calls == []
    finally:
        await server.close()


def as_nobody(work: Callable[[], bytes]) -> bytes:
    """`work()` in a forked child of uid and gid 65534; what it returns (or its exception).

    fork, not subprocess: the venv's interpreter may live where uid 65534 cannot read. The
    child runs code already imported, makes plain syscalls and leaves with os._exit.
    """
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out = b"child failed"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = work()
        except BaseException as exc:
            out = repr(exc).encode()
        finally:
            os.write(wfd, out)
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def raw_list(path: Path) -> bytes:
    """A `list` request by hand; b"EACCES" if the socket's file mode stops us."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(str(path))
        s.sendall(b'{"op": "list"}\n')
        return s.makefile("rb").readline().strip()
    except PermissionError:
        return b"EACCES"
    finally:
        s.close()


def traversable_dir() -> Path:
    """A fresh directory uid 65534 can traverse (pytest's tmp_path sits under a 0700 one)."""
    base = Path(tempfile.mkdtemp(prefix="isk-ctl-"))
    os.chmod(base, 0o755)
    return base


@pytest.mark.integration  # needs root to switch uid; fails loudly, never skips, without it
@aio
async def test_another_uid_is_refused_for_real() -> None:
    """A real process of uid 65534: the file mode stops it; with the mode opened up (as a
    careless admin might), SO_PEERCRED still does. Needs root to switch uid."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it runs a client as uid 65534)", pytrace=False)
    base = traversable_dir()
    server, ops, path = await serve(base)
    os.chmod(path.parent, 0o755)
    try:
        # The server runs on this loop: the child is waited for in a thread.
        assert await asyncio.to_thread(as_nobody, lambda: raw_list(path)) == b"EACCES"
        os.chmod(path, 0o666)  # past the file mode: gate two
        reply = json.loads(await asyncio.to_thread(as_nobody, lambda: raw_list(path)))
        assert reply["ok"] is False and reply["code"] == "forbidden"
        assert ops.calls == []
    finally:
        await server.close()
        shutil.rmtree(base)


def test_autosp_without_permission_exits_1_not_3() -> None:
    """Permission denied is not "resolver not running" (exit 3): exit 1, and what to do.

    As root, autosp runs as uid 65534 against the daemon's 0600 socket; as another user, the
    socket is its own with mode 0, which stops its owner just the same.
    """
    base = traversable_dir()
    path = base / "run" / "control.sock"
    sock = bind_socket(path)  # listening: the resolver is running

    def autosp_list() -> bytes:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = autosp_main(["--control", str(path), "list"])
        return f"{status} {err.getvalue()}".encode()

    try:
        os.chmod(path.parent, 0o755)
        if os.geteuid() == 0:
            out = as_nobody(autosp_list).decode()
        else:
            os.chmod(path, 0)
            out = autosp_list().decode()
    finally:
        sock.close()
        shutil.rmtree(base)
    status, _, err = out.partition(" ")
    assert status == "1", out
    assert "permission denied: run as root or as the daemon's user" in err


@aio
async def test_stale_socket_replaced_live_socket_and_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what kill -9 leaves behind
    server = ControlServer(path, FakeOps())
    await server.start()
    try:
        with pytest.raises(ConfigError, match="another resolver is running"):
            await ControlServer(path, FakeOps()).start()
        assert await ask(path, "list") == {"endpoints": [ENDPOINT]}  # the first one untouched
    finally:
        await server.close()
    regular = tmp_path / "file.sock"
    regular.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        await ControlServer(regular, FakeOps()).start()
    assert regular.read_text() == "precious"


def test_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        bind_socket(d / "c.sock")


def test_client_without_daemon_says_so(tmp_path: Path) -> None:
    with pytest.raises(ResolverUnreachable, match="no control socket"):
        client.request(tmp_path / "none.sock", "list", 1.0)


# --- wiring ----------------------------------------------------------------------------------


class Cfg:
    def __init__(self, sections: dict[str, Any]) -> None:
        self.path: Path | None = Path("/etc/ipseckey-resolver.toml")
        self.sections = sections


class NoResolution:
    async def resolve(self, qname: Any, qtype: Any, now: float, *, fresh: bool = False) -> Any:
        raise AssertionError("not expected")


class NoTunnels:
    async def ensure(self, spec: Any, now: float, *, shunt: bool = False) -> float:
        raise AssertionError("not expected")

    def tunnels(self) -> dict[Any, Any]:
        return {}

    def pin(self, destination: Any, pinned: bool = True) -> None:
        raise AssertionError("not expected")

    async def release(self, destination: Any, now: float) -> None:
        raise AssertionError("not expected")


@aio
async def test_start_control_wires_socket_and_manager(tmp_path: Path) -> None:
    sock, state = tmp_path / "run" / "c.sock", tmp_path / "lib" / "e.json"
    cfg = Cfg({"control": {"socket": str(sock), "state_file": str(state)}})
    service = await start_control(cfg, NoResolution(), NoTunnels())
    assert service is not None
    try:
        assert await ask(sock, "list") == {"endpoints": []}
        with pytest.raises(OperationFailed, match="is not an endpoint"):
            await ask(sock, "status", name="bob.example.test")
    finally:
        await service.close()
    assert service.timer.done() and not sock.exists()
    assert await start_control(Cfg({"control": {"enabled": False}}), NoResolution(),
                               NoTunnels()) is None
    with pytest.raises(ConfigError, match=r"ipseckey-resolver.toml: \[control\] key 'x'"):
        await start_control(Cfg({"control": {"x": 1}}), NoResolution(), NoTunnels())
