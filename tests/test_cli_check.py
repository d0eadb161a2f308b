"""`ipseckey-resolver --check-config` runs the start-up checks of the daemon itself
(resolver/startup.py): every table, the private key file, the state directories, the instance
lock, the listen addresses; it warns about an IKE daemon it cannot reach and prints the
effective policy. The real start refuses the same configurations with the same line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from resolver.cli import main
from resolver.instancelock import LOCK_NAME, InstanceLock

GOOD = """
[server]
listen = ["127.0.0.1:{port}"]
[upstream]
servers = ["192.0.2.1"]
[identity]
fqdn = "alice.example.com"
private_key = "{key}"
[provision]
backend = "vici"
vici_socket = "unix://{tmp}/charon.vici"
state_file = "{tmp}/state/provision.json"
[policy]
default = "private-or-clear"
private = ["10.1.0.0/16", "corp.example.com."]
block = ["ads.example."]
[control]
socket = "{tmp}/control.sock"
state_file = "{tmp}/state/endpoints.json"
[responder]
accept = ["example.com."]
"""


def write_key(path: Path, mode: int = 0o600) -> Path:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(mode)
    return path


@pytest.fixture
def good(tmp_path: Path) -> str:
    key = write_key(tmp_path / "key.pem")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return GOOD.format(key=key, tmp=tmp_path, port=port)


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str],
          *extra: str) -> tuple[int, str, str]:
    path = tmp_path / "r.toml"
    path.write_text(text)
    code = main(["--config", str(path), "--check-config", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_good_config_passes_with_a_warning_and_the_policy(
        tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = check(tmp_path, good, capsys)
    assert code == 0, err
    # charon is not running here: a warning (one line), not a failure
    assert err.count("\n") == 1 and err.startswith("ipseckey-resolver: warning: IKE daemon "
                                                   f"not reachable at unix://{tmp_path}")
    assert "No such file or directory" in err and "EDE 14" in err
    assert "policy: default private-or-clear, strict yes (a failed tunnel is SERVFAIL)" in out
    assert "  private: 10.1.0.0/16, corp.example.com." in out
    assert "  block: ads.example." in out
    assert f"lock {LOCK_NAME} in {tmp_path / 'state'}" in out
    assert not (tmp_path / "state").exists()  # checking created nothing


def test_reachable_ike_daemon_no_warning(tmp_path: Path, good: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_UNIX) as charon:
        charon.bind(str(tmp_path / "charon.vici"))
        charon.listen()
        code, _, err = check(tmp_path, good, capsys)
    assert (code, err) == (0, "")


@pytest.mark.parametrize(("old", "new", "named"), [
    ('"corp.example.com."', '".corp.example.com."', "[policy] key 'private'"),
    ('default = "private-or-clear"', 'default = "secret"', "[policy] key 'default'"),
    ('backend = "vici"', 'backend = "racoon"', "[provision] key 'backend'"),
    ('backend = "vici"', 'backend = "vici"\ndpd_delay = -5', "[provision] key 'dpd_delay'"),
    ('fqdn = "alice.example.com"', 'fqdn = 7', "[identity] key 'fqdn'"),
    ('\nsocket = "', '\nsockt = "', "[control] key 'sockt'"),
    ('accept = ["example.com."]', 'accept = "all"', "[responder] key 'accept'"),
])
def test_bad_key_in_a_delegated_table_is_named(tmp_path: Path, good: str,
                                               capsys: pytest.CaptureFixture[str],
                                               old: str, new: str, named: str) -> None:
    assert old in good
    code, _, err = check(tmp_path, good.replace(old, new, 1), capsys)
    assert code == 2
    assert named in err and str(tmp_path / "r.toml") in err


def test_policy_without_identity_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(tmp_path, '[upstream]\nservers = ["192.0.2.1"]\n[policy]\n'
                                   'default = "private"\n', capsys)
    assert code == 2 and "[policy] needs [identity]" in err


def test_responder_without_identity_is_refused(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(tmp_path, '[upstream]\nservers = ["192.0.2.1"]\n[responder]\n'
                                   'accept = "any"\n', capsys)
    assert code == 2 and "[responder] needs [identity]" in err


def test_answering_in_clear_after_a_failure_is_warned_about(
        tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = check(tmp_path, good.replace("[policy]\n", "[policy]\nstrict = false\n"),
                         capsys)
    assert code == 0
    assert "warning: [policy] strict = false: a private-or-clear destination" in err
    code, _, err = check(tmp_path, good, capsys)
    assert code == 0 and "strict = false" not in err


# --- what the daemon would refuse: --check-config refuses it too, with the same line ---------


def missing_key(tmp: Path) -> Path:
    return tmp / "nokey.pem"


def key_directory(tmp: Path) -> Path:
    (tmp / "keydir").mkdir()
    return tmp / "keydir"


def key_too_open(tmp: Path) -> Path:
    return write_key(tmp / "open.pem", 0o644)


def key_not_a_key(tmp: Path) -> Path:
    (tmp / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n")
    (tmp / "junk.pem").chmod(0o600)
    return tmp / "junk.pem"


def key_of_someone_else(tmp: Path) -> Path:
    key = write_key(tmp / "theirs.pem")
    os.chown(key, 4321, 4321)
    return key


KEY_FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (missing_key, "No such file or directory"),
    "directory": (key_directory, "not a regular file"),
    "too open": (key_too_open, "permissions 0644 are too open"),
    "not a key": (key_not_a_key, "not a usable PEM private key"),
    "someone else's": (key_of_someone_else, "owned by uid 4321"),
}


def refusals(tmp: Path, good: str) -> dict[str, tuple[str, str]]:
    """Configurations the daemon refuses -> (config text, what the one line says)."""
    out = {}
    for kind, (make, says) in KEY_FAULTS.items():
        path = make(tmp)
        text = "\n".join(f'private_key = "{path}"' if ln.startswith("private_key") else ln
                         for ln in good.splitlines())
        out[f"key {kind}"] = (text, f"[identity] key 'private_key': {path}: ")
        out[f"key {kind} says"] = (text, says)
    out["vici over tcp"] = (good.replace(f'"unix://{tmp}/charon.vici"', '"tcp://127.0.0.1:4502"'),
                            "[provision] key 'vici_socket': tcp:// is not supported")
    local = next(ln for ln in good.splitlines() if ln.startswith("listen"))
    out["listen not local"] = (good.replace(local, 'listen = ["192.0.2.1:5353"]'),
                               "cannot listen on 192.0.2.1:5353: Cannot assign requested address")
    (tmp / "afile").write_text("")
    out["state under a file"] = (good.replace(f'"{tmp}/state/provision.json"',
                                              f'"{tmp}/afile/sub/provision.json"'),
                                 f"state directory {tmp}/afile/sub cannot be created")
    return out


@pytest.mark.parametrize("case", [
    "key missing", "key missing says", "key directory", "key directory says",
    "key too open", "key too open says", "key not a key", "key not a key says",
    "key someone else's", "key someone else's says", "vici over tcp", "listen not local",
    "state under a file"])
def test_check_config_refuses_what_the_daemon_refuses(
        tmp_path: Path, good: str, capsys: pytest.CaptureFixture[str], case: str) -> None:
    text, says = refusals(tmp_path, good)[case]
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and says in err, err  # one line, no traceback
    # the real start: the same check, the same line, exit 2, before anything is started
    code = main(["--config", str(tmp_path / "r.toml")])
    assert (code, capsys.readouterr().err) == (2, err)


def test_listen_address_in_use(tmp_path: Path, good: str,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        local = next(ln for ln in good.splitlines() if ln.startswith("listen"))
        text = good.replace(local, f'listen = ["127.0.0.1:{port}"]')
        code, _, err = check(tmp_path, text, capsys)
        assert code == 2
        assert err == f"ipseckey-resolver: cannot listen on 127.0.0.1:{port}: " \
                      "Address already in use\n"
        assert main(["--config", str(tmp_path / "r.toml")]) == 2
        assert capsys.readouterr().err == err


def test_running_instance_is_named_by_its_pid(tmp_path: Path, good: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The lock is held by another process (here: a child holding it as the daemon does);
    both --check-config and the real start name it; it goes with the process, even by
    SIGKILL."""
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from resolver.instancelock import InstanceLock\n"
         f"InstanceLock([Path({str(state)!r})]).acquire()\n"
         "print('locked', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        code, _, err = check(tmp_path, good, capsys)
        assert code == 2
        assert err == (f"ipseckey-resolver: another ipseckey-resolver is running (pid "
                       f"{holder.pid}) with state directory {state} (it holds "
                       f"{state / LOCK_NAME}); not starting\n")
        assert main(["--config", str(tmp_path / "r.toml")]) == 2
        assert capsys.readouterr().err == err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    code, _, _ = check(tmp_path, good, capsys)
    assert code == 0  # the kernel dropped the lock with the process


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    first = InstanceLock([tmp_path])
    first.acquire()
    try:
        with pytest.raises(Exception, match=f"pid {os.getpid()}"):
            InstanceLock([tmp_path]).acquire()
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert oct((tmp_path / LOCK_NAME).stat().st_mode & 0o777) == "0o600"
    finally:
        first.release()
    second = InstanceLock([tmp_path])
    second.acquire()
    second.release()
    time.sleep(0)  # nothing left behind but the lock file itself
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_control_socket_of_a_running_daemon(tmp_path: Path, good: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Another daemon (other state directory, other listen address) answering on our control
    socket: refused at the check, before reconcile could touch its tunnels."""
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(tmp_path / "control.sock"))
        other.listen()
        code, _, err = check(tmp_path, good, capsys)
    assert code == 2 and err == (f"ipseckey-resolver: control socket {tmp_path / 'control.sock'}"
                                 ": another resolver is running and listening on it\n")
    code, _, _ = check(tmp_path, good, capsys)  # now stale: the daemon would remove it
    assert code == 0
