"""strongSwan charon per peer namespace, configured as strongswan_conf explains, driven over VICI.

Theory of operation: the ESP data path is a choice (`ESP_MODES`, env LAB_ESP). The default,
"libipsec", runs charon with kernel-libipsec (userland ESP over a TUN device, always
UDP-encapsulated on 4500): the only path on kernels without ESP, like the project's machine.
"kernel" leaves ESP to the kernel (kernel-netlink only) and needs a kernel with ESP; `Lab.up`
checks that first. Each charon gets a private
/run (bind mount inside the mount namespace `ip netns exec` creates), because the pid file
/run/charon.pid is compiled in. At start, the host's private key and one responder connection per
other lab peer (remote id = its FQDN, remote key = its published key) are loaded over VICI. Test
code loads its own initiator connections (with keys taken from DNS) and calls `initiate`.

The `vici` package is blocking and its streamed commands are lazy generators: every helper here
iterates them to the end before sending anything else on the same session.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import vici

from lab.net import ANCHOR_IF, LabError
from lab.topology import CHARON_TABLE, HOSTS, PEERS, Host, ike_identities

CHARON = "/usr/lib/ipsec/charon"
FWMARK = "0x42"

ESP_LIBIPSEC = "libipsec"  # userland ESP in charon (kernel-libipsec); works without kernel ESP
ESP_KERNEL = "kernel"  # kernel ESP via XFRM (kernel-netlink only); needs a kernel with ESP
ESP_MODES = (ESP_LIBIPSEC, ESP_KERNEL)

# Plugin order matters: kernel-libipsec must come before kernel-netlink (it takes over the
# IPsec part of the kernel interface); kdf is needed for key derivation in 5.9.8; openssl
# brings ECDSA (and RSA/Ed25519 alongside gmp/curve25519).
_PLUGINS_HEAD = "random nonce aes sha1 sha2 hmac kdf gmp pem pkcs1 pkcs8 pubkey openssl curve25519"
_PLUGINS_TAIL = "kernel-netlink socket-default vici"


def plugins(esp: str) -> str:
    """charon's `load =` list for an ESP data path (one of ESP_MODES)."""
    if esp == ESP_LIBIPSEC:
        return f"{_PLUGINS_HEAD} kernel-libipsec {_PLUGINS_TAIL}"
    if esp == ESP_KERNEL:
        return f"{_PLUGINS_HEAD} {_PLUGINS_TAIL}"
    raise LabError(f"ESP data path must be one of {', '.join(ESP_MODES)}, got {esp!r}")


def strongswan_conf(cdir: Path, esp: str = ESP_LIBIPSEC) -> str:
    """strongswan.conf for one charon (comments in it say why each setting is there)."""
    return f"""# Written by lab/ike.py at `lab up` (ESP data path: {esp}).
charon {{
    load = {plugins(esp)}
    retransmit_tries = 2
    retransmit_timeout = 1.0
    retransmit_base = 1.4
    install_virtual_ip = no
    # Explicit (these are the defaults): lab.net puts gw's traffic-selector anchors in this
    # table and a rule before this priority (see Host.ts_anchors, lab/README.md).
    routing_table = {CHARON_TABLE}
    routing_table_prio = {CHARON_TABLE}
    # The anchor interface holds addresses only for kernel-libipsec's route source lookup;
    # charon must never use them for IKE.
    interfaces_ignore = {ANCHOR_IF}
    filelog {{
        lab {{
            path = {cdir / 'charon.log'}
            default = 1
            ike = 1
            time_format = %H:%M:%S
            flush_line = yes
        }}
    }}
    syslog {{
        identifier = charon-lab
        daemon {{
            default = -1
        }}
    }}
    plugins {{
        vici {{
            socket = unix://{cdir / 'charon.vici'}
        }}
        kernel-libipsec {{
            # Without it, host-to-host routes are refused and traffic goes out in clear.
            allow_peer_ts = yes
        }}
        kernel-netlink {{
            # IKE packets carry the mark and bypass the tunnel routes (else replies loop).
            fwmark = !{FWMARK}
        }}
        socket-default {{
            fwmark = {FWMARK}
        }}
    }}
}}
"""


def charon_argv(ns: str, cdir: Path) -> list[str]:
    """The command that runs charon inside `ns` with a private /run.

    `sh` only runs a fixed script; the directory is passed as "$1", never spliced in.
    """
    return [
        "ip", "netns", "exec", ns,
        "env", f"STRONGSWAN_CONF={cdir / 'strongswan.conf'}",
        "sh", "-c", 'mount --bind "$1" /run && exec "$2"', "sh", str(cdir / "run"), CHARON,
    ]


def connect(socket_path: Path, timeout: float = 10.0) -> vici.Session:
    """A VICI session on charon's socket, polling until charon accepts (bounded)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            return vici.Session(sock)
        except OSError as exc:
            sock.close()
            last = exc
            time.sleep(0.01)
    raise LabError(f"charon VICI socket {socket_path} not ready after {timeout} s: {last}")


@contextmanager
def session(socket_path: Path, timeout: float = 10.0) -> Iterator[vici.Session]:
    """A VICI session that is closed afterwards."""
    s = connect(socket_path, timeout)
    try:
        yield s
    finally:
        try:
            s.transport.close()
        except OSError:
            pass


def responder_conn(me: Host, peer: Host, my_spki: str, peer_spki: str, *,
                   local_id: str | None = None) -> dict[str, Any]:
    """VICI load-conn payload: `me` accepts `peer` (by FQDN and published key), tunnel mode.

    `local_id` is the identity `me` answers to (default: its FQDN; see
    `topology.ike_identities` for the others, e.g. gw's address or multi.example.test). charon
    picks the responder conn by the IDr the initiator sends, so one conn per identity; the
    default identity keeps the plain name "peer-<peer>", others are "peer-<peer>@<id>".

    No address restriction (it matches by identity, so it keeps working after `Lab.move`), and
    no MOBIKE: with MOBIKE, a moved responder migrated its IKE_SA to whichever path answered
    first (sometimes IPv6) and charon rewrote the dynamic traffic selectors to that family, so
    IPv4 traffic silently went out in clear. Without it an SA stays bound to the addresses it
    was made with, and a move is followed by a new `initiate` (see lab/README.md).
    """
    local_ts = ["dynamic", *me.local_ts]
    ident = local_id or me.fqdn
    name = f"peer-{peer.name}" if ident == me.fqdn else f"peer-{peer.name}@{ident}"
    return {
        name: {
            "version": "2",
            "mobike": "no",
            "local": {"auth": "pubkey", "id": ident, "pubkeys": [my_spki]},
            "remote": {"auth": "pubkey", "id": peer.fqdn, "pubkeys": [peer_spki]},
            "children": {
                name: {
                    "mode": "tunnel",
                    "local_ts": local_ts,
                    "remote_ts": ["dynamic"],
                }
            },
        }
    }


def initiator_conn(name: str, me: Host, peer_addr: str, peer_id: str, my_spki: str,
                   peer_spki: str, remote_ts: list[str] | None = None,
                   local_addr: str | None = None) -> dict[str, Any]:
    """VICI load-conn payload to reach a peer at `peer_addr` (IPv4 or IPv6) with `peer_spki`.

    start_action=trap makes the policy fail closed until the SA is up; 5.9.8 raises no acquire
    from the trap, so callers also `initiate` explicitly. `local_addr` pins IKE's source
    address; by default charon picks it by route (of the peer's family), which also lets the
    SA be re-authenticated from a new address after the initiator itself moved. MOBIKE is off
    (see `responder_conn`).
    """
    return {
        name: {
            "version": "2",
            "mobike": "no",
            **({"local_addrs": [local_addr]} if local_addr else {}),
            "remote_addrs": [peer_addr],
            "local": {"auth": "pubkey", "id": me.fqdn, "pubkeys": [my_spki]},
            "remote": {"auth": "pubkey", "id": peer_id, "pubkeys": [peer_spki]},
            "children": {
                name: {
                    "mode": "tunnel",
                    "local_ts": ["dynamic"],
                    "remote_ts": remote_ts or ["dynamic"],
                    "start_action": "trap",
                }
            },
        }
    }


def load_host(s: vici.Session, host: Host, private_der: bytes,
              spkis: dict[str, str]) -> None:
    """Load a peer's private key and its responder connections: one per other lab peer and
    identity the host answers to (`topology.ike_identities`)."""
    s.load_key({"type": "any", "data": private_der})
    for other in PEERS:
        if other == host.name:
            continue
        for ident in ike_identities(host.name):
            s.load_conn(responder_conn(host, HOSTS[other], spkis[host.name], spkis[other],
                                       local_id=ident))


def initiate(s: vici.Session, child: str, ike: str, timeout_ms: int = 5000) -> list[str]:
    """Initiate a CHILD_SA and wait for the result; returns charon's log lines.

    Raises LabError (with the log) on failure. On failure the half-open IKE_SA is terminated,
    because an initiate timeout does not stop charon's retransmits.
    """
    log: list[str] = []
    try:
        for msg in s.initiate({"child": child, "ike": ike, "timeout": timeout_ms,
                               "init-limits": "no"}):
            log.append(_text(msg.get("msg", b"")))
    except vici.exception.CommandException as exc:
        try:
            for _ in s.terminate({"ike": ike, "force": "yes", "timeout": 1000}):
                pass
        except vici.exception.CommandException:
            pass
        raise LabError(f"initiate {child}: {exc}\n" + "\n".join(log)) from exc
    return log


def close(s: vici.Session, name: str) -> None:
    """Terminate the IKE_SA of connection `name` (if any) and unload the connection.

    Terminate first: `unload-conn` alone keeps an established SA.
    """
    try:
        for _ in s.terminate({"ike": name, "force": "yes", "timeout": 2000}):
            pass
    except vici.exception.CommandException:
        pass  # nothing established under that name
    try:
        s.unload_conn({"name": name})
    except vici.exception.CommandException:
        pass  # never loaded


def terminate_id(s: vici.Session, ike_id: str) -> None:
    """Terminate one IKE_SA by its unique id (gone already: fine)."""
    try:
        for _ in s.terminate({"ike-id": ike_id, "force": "yes", "timeout": 2000}):
            pass
    except vici.exception.CommandException:
        pass


def list_sas(s: vici.Session, ike: str | None = None) -> list[dict[str, Any]]:
    """All IKE_SAs (or those of conn `ike`) with their CHILD_SAs, fully iterated."""
    return [{k: _decode(v) for k, v in sa.items()}
            for sa in s.list_sas({"ike": ike} if ike else None)]


def child_sas(s: vici.Session, ike: str | None = None
              ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(IKE_SA, CHILD_SA) for every CHILD_SA charon has (of conn `ike`), decoded."""
    return [(ike_sa, child) for sa in list_sas(s, ike) for ike_sa in sa.values()
            for child in (ike_sa.get("child-sas") or {}).values()]


def child_states(s: vici.Session, ike: str | None = None) -> dict[str, str]:
    """CHILD_SA name -> state (e.g. "INSTALLED") for every CHILD_SA charon has (of conn
    `ike`)."""
    return {str(child.get("name")): str(child.get("state")) for _, child in child_sas(s, ike)}


def conn_names(s: vici.Session) -> list[str]:
    """Names of the connections loaded in charon."""
    return [_text(n) for n in s.get_conns().get("conns", [])]


def _text(v: object) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _decode(v: Any) -> Any:
    """VICI values arrive as bytes; make them str for printing and comparisons."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v
