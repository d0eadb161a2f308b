"""strongSwan over VICI: InstallTunnel / RemoveTunnel as charon connections with raw public keys.

Theory of operation. The `vici` package is blocking and its streamed commands are lazy
generators, so every operation here runs in a worker thread with a *session of its own*: a
unix-socket connect costs tens of microseconds, and one session per operation means two commands
can never interleave on one socket, and a peer that takes the whole timeout to fail never holds
up the setup of another. The worker threads come from a dedicated pool rather than
`asyncio.to_thread`'s default executor, whose handful of threads (cores + 4) would queue 200
concurrent setups behind each other.

One tunnel (lab-notes, "IKE" section, followed exactly):
  1. the host's private key is loaded once (`load-key`), again whenever charon was restarted
     (detected by its start time in `stats`);
  2. `load-conn` "isk-...": local id = our FQDN with our SPKI; remote id = the peer's identity with
     the peer's SPKI from the secure IPSECKEY (charon binds the key to that id);
     remote_addrs = the IKE peer (destination or gateway); tunnel mode; local_ts = our
     address /32 (/128), remote_ts = the destination /32 (/128), never more than the record
     vouches for; start_action = trap (fail closed: 5.9.8 raises no acquire from it, hence 3.);
  3. `initiate` without waiting in charon (a blocking initiate holds a charon worker thread;
     more concurrent setups than threads starved charon), then `list-sas` until the CHILD_SA
     is INSTALLED: that, and nothing less, is success; an IKE_SA that appears and vanishes
     is a rejection. A replacement (`replaces`: same name, new
     key or gateway) waits for a CHILD_SA in a *new* IKE_SA and only then terminates the old
     IKE_SAs by unique id (make before break);
  4. on failure and on teardown: `terminate` the IKE_SA (force; an initiate timeout does not
     stop retransmits) and then `unload-conn` (unload alone keeps an established SA).
Foreign exceptions (OSError, vici.exception.*) become ProvisioningError subclasses here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_network
from pathlib import Path
from typing import Any, Final, TypeVar

import vici
import vici.exception
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from resolver.ipseckey import spki_pem
from resolver.provision import (
    CONN_PREFIX,
    DaemonUnreachable,
    Identity,
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveShunt,
    RemoveTunnel,
    TunnelRejected,
    TunnelSpec,
    TunnelTimeout,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_TERMINATE_MS: Final = 1000
_SUPPORTED: Final = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                     ed448.Ed448PublicKey)


class ViciBackend:
    """ProvisioningBackend for tunnels (shunt intents are not ours: see CompositeBackend)."""

    def __init__(
        self,
        socket_uri: str,
        identity: Identity,
        private_key_pem: bytes | None = None,
        *,
        max_workers: int = 64,
        connect_timeout: float = 2.0,
    ) -> None:
        """
        Args:
            socket_uri: "unix:///path/charon.vici" or "tcp://host:port".
            identity: our FQDN, key path and addresses.
            private_key_pem: the key itself (default: read from identity.private_key).

        Raises:
            ProvisioningError: the private key cannot be read or parsed.
        """
        self.uri = socket_uri
        self.identity = identity
        self.connect_timeout = connect_timeout
        pem = private_key_pem if private_key_pem is not None else _read(identity.private_key)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TunnelRejected(f"private key {identity.private_key}: {exc}") from None
        self._private_der = key.private_bytes(serialization.Encoding.DER,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        public = key.public_key()
        if not isinstance(public, _SUPPORTED):
            raise TunnelRejected(f"private key {identity.private_key}: unsupported key type")
        self._own_spki = spki_pem(public)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vici")
        self._key_lock = threading.Lock()
        self._charon_since: str | None = None  # charon's start time when we loaded the key
        # (load-conn ms, initiate -> INSTALLED ms) of recent setups, for the benchmark/report.
        self.timings: deque[tuple[float, float]] = deque(maxlen=1000)

    # -- ProvisioningBackend -------------------------------------------------------------------

    async def apply(self, intent: Intent) -> None:
        """Raises ProvisioningError subclasses only."""
        if isinstance(intent, InstallTunnel):
            await self._run(self._install, intent.spec, intent.timeout, intent.replaces)
        elif isinstance(intent, RemoveTunnel):
            await self._run(self._remove, intent.name)
        elif isinstance(intent, InstallShunt | RemoveShunt):
            raise TunnelRejected(f"{type(intent).__name__} is not a VICI intent")

    async def installed(self) -> frozenset[PolicyKey]:
        """Our connections loaded in charon (by the "isk-" prefix)."""
        names = await self._run(self._conn_names)
        return frozenset(PolicyKey.tunnel(n) for n in names if n.startswith(CONN_PREFIX))

    async def child_states(self) -> dict[str, str]:
        """CHILD_SA name -> state for our connections (tests, `autosp status`)."""
        return await self._run(self._child_states)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- payloads (pure) -----------------------------------------------------------------------

    def connection(self, spec: TunnelSpec) -> dict[str, Any]:
        """The load-conn payload for `spec`."""
        version = spec.destination.version
        own = self.identity.local_address(version)
        local_ts = [str(ip_network(own))] if own is not None else ["dynamic"]
        conn: dict[str, Any] = {
            "version": "2",
            "mobike": "no",  # see lab/ike.py: MOBIKE moved SAs to another family's path
            "keyingtries": "1",  # a failure is reported to us; we decide about retries
            "remote_addrs": [str(spec.remote_addr)],
            "local": {"auth": "pubkey", "id": self.identity.fqdn, "pubkeys": [self._own_spki]},
            "remote": {"auth": "pubkey", "id": spec.remote_id, "pubkeys": [spec.key.spki_pem()]},
            "children": {
                spec.name: {
                    "mode": "tunnel",  # transport fails under kernel-libipsec (lab-notes)
                    "local_ts": local_ts,
                    "remote_ts": [str(ip_network(spec.destination))],
                    "start_action": "trap",
                }
            },
        }
        if own is not None:
            conn["local_addrs"] = [str(own)]
        return {spec.name: conn}

    # -- blocking work (worker threads) --------------------------------------------------------

    def _install(self, spec: TunnelSpec, timeout: float, replaces: bool) -> None:
        deadline = time.monotonic() + timeout
        with self._session() as s:
            self._ensure_key(s)
            # The IKE_SAs of this name now: with `replaces`, they are the old ones, ended only
            # once a new CHILD_SA (in a new IKE_SA) is INSTALLED: make before break.
            old_ids = _ike_ids(s, spec.name) if replaces else set()
            t0 = time.perf_counter()
            s.load_conn(self.connection(spec))  # always: it may restore an older configuration
            t1 = time.perf_counter()
            if not replaces and _installed_child(s, spec.name):
                return  # already up (reconcile, a failed replacement): nothing to initiate
            self._initiate(s, spec, timeout, deadline)
            self._await_installed(s, spec, timeout, deadline, old_ids)
            self.timings.append(((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000))
            for ike_id in old_ids:
                with contextlib.suppress(vici.exception.CommandException):
                    for _ in s.terminate({"ike-id": ike_id, "force": "yes",
                                          "timeout": _TERMINATE_MS}):
                        pass

    @staticmethod
    def _initiate(s: vici.Session, spec: TunnelSpec, timeout: float, deadline: float) -> None:
        """Start the CHILD_SA without waiting in charon (`timeout = -1`).

        A blocking `initiate` holds one of charon's worker threads (16 by default) until the
        SA is up; with more concurrent setups than threads, charon had no thread left to
        process the IKE replies and every setup timed out (measured: 20 peers at once, 12
        SERVFAIL after 3.4 s). So charon returns at once and `_await_installed` polls.
        """
        if deadline - time.monotonic() <= 0:
            raise TunnelTimeout(f"{spec.name}: no time left to initiate")
        try:
            for _ in s.initiate({"child": spec.name, "ike": spec.name, "timeout": -1,
                                 "init-limits": "no"}):
                pass  # nothing is streamed without waiting; iterating sends the command
        except vici.exception.CommandException as exc:
            raise TunnelRejected(f"tunnel to {spec.destination} via {spec.remote_addr} "
                                 f"({spec.remote_id}): {exc}") from None

    @staticmethod
    def _await_installed(s: vici.Session, spec: TunnelSpec, timeout: float, deadline: float,
                         old_ids: set[str]) -> None:
        """Poll list-sas until the CHILD_SA is INSTALLED (success, and nothing less).

        An IKE_SA of ours that was seen and then vanished failed (authentication, proposals,
        the peer said no): that is a rejection, reported at once rather than at the deadline.
        The poll interval grows from 2 ms to 20 ms, so hundreds of concurrent setups do not
        flood charon with list-sas requests.
        """
        seen, pause = False, 0.002
        while True:
            ikes = [ike for ike in _ike_sas(s, spec.name)
                    if _text(ike.get("uniqueid", b"")) not in old_ids]
            if any(_child_installed(ike, spec.name) for ike in ikes):
                return
            if ikes:
                seen = True
            elif seen:
                raise TunnelRejected(f"tunnel to {spec.destination} via {spec.remote_addr} "
                                     f"({spec.remote_id}): IKE_SA failed")
            if time.monotonic() >= deadline:
                raise TunnelTimeout(f"tunnel to {spec.destination} via {spec.remote_addr}: "
                                    f"no CHILD_SA within {timeout:g} s")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, 0.02)

    def _remove(self, name: str) -> None:
        with self._session() as s:
            with contextlib.suppress(vici.exception.CommandException):  # no SA: fine
                for _ in s.terminate({"ike": name, "force": "yes", "timeout": _TERMINATE_MS}):
                    pass
            with contextlib.suppress(vici.exception.CommandException):  # not loaded: fine
                s.unload_conn({"name": name})

    def _conn_names(self) -> list[str]:
        with self._session() as s:
            return [_text(n) for n in s.get_conns().get("conns", [])]

    def _child_states(self) -> dict[str, str]:
        with self._session() as s:
            return {name: state for name, state in _children(s) if name.startswith(CONN_PREFIX)}

    def _ensure_key(self, s: vici.Session) -> None:
        """load-key once per charon lifetime (a restarted charon forgot it)."""
        since = _text(s.stats().get("uptime", {}).get("since", b""))
        with self._key_lock:
            if since and since == self._charon_since:
                return
            s.load_key({"type": "any", "data": self._private_der})
            self._charon_since = since
            log.info("loaded our private key into charon (%s)", self.uri)

    @contextlib.contextmanager
    def _session(self) -> Iterator[vici.Session]:
        sock = _connect(self.uri, self.connect_timeout)
        try:
            yield vici.Session(sock)
        finally:
            sock.close()

    # -- the boundary: run in a worker, translate foreign errors once ------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args))
        except (TunnelTimeout, TunnelRejected, DaemonUnreachable):
            raise
        except (OSError, vici.exception.SessionException,
                vici.exception.DeserializationException) as exc:
            self._charon_since = None
            raise DaemonUnreachable(f"IKE daemon at {self.uri}: {exc}") from None
        except vici.exception.CommandException as exc:
            raise TunnelRejected(f"IKE daemon refused: {exc}") from None


def _connect(uri: str, timeout: float) -> socket.socket:
    if uri.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = uri[len("unix://"):]
    elif uri.startswith("tcp://"):
        host, _, port = uri[len("tcp://"):].rpartition(":")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        address = (host.strip("[]"), int(port))
    else:
        raise DaemonUnreachable(f"unsupported VICI URI {uri!r}")
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    # Blocking reads from here on: initiate may legitimately take the whole setup timeout,
    # which is bounded by charon (the "timeout" we pass) and by the provisioner.
    sock.settimeout(None)
    return sock


def _children(s: vici.Session) -> Iterator[tuple[str, str]]:
    # list_sas is a lazy generator: collect everything before sending anything else.
    sas = list(s.list_sas())
    for sa in sas:
        for ike in sa.values():
            for child in (ike.get("child-sas") or {}).values():
                yield _text(child.get("name", b"")), _text(child.get("state", b""))


def _ike_sas(s: vici.Session, name: str) -> list[dict[str, Any]]:
    # list_sas is a lazy generator: collect everything before sending anything else.
    return [ike for sa in list(s.list_sas({"ike": name})) for ike in sa.values()]


def _ike_ids(s: vici.Session, name: str) -> set[str]:
    return {_text(ike.get("uniqueid", b"")) for ike in _ike_sas(s, name)}


def _installed_child(s: vici.Session, name: str, exclude: set[str] | None = None) -> bool:
    """Whether a CHILD_SA `name` is INSTALLED (in an IKE_SA whose id is not in `exclude`)."""
    return any(_child_installed(ike, name) for ike in _ike_sas(s, name)
               if not (exclude and _text(ike.get("uniqueid", b"")) in exclude))


def _child_installed(ike: dict[str, Any], name: str) -> bool:
    for child in (ike.get("child-sas") or {}).values():
        if _text(child.get("name", b"")) == name and \
                _text(child.get("state", b"")) == "INSTALLED":
            return True
    return False


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TunnelRejected(f"private key {path}: {exc}") from None

