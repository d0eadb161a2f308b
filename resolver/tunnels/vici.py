"""strongSwan over VICI: InstallTunnel / RemoveTunnel as charon connections with raw public keys.

Theory of operation. The `vici` package is blocking and its streamed commands are lazy
generators, so every command runs in a worker thread of a small dedicated pool (never
`asyncio`'s default executor), each worker with a *session of its own, kept open*: two commands
never interleave on one socket, and 200 concurrent setups do not make 200 connects (charon's
listen backlog is small: a burst of connects failed with EAGAIN). No worker ever waits for an
SA: waiting is done on the event loop, on a future that one *event listener* thread (its own
session; resolver/tunnels/vici_listener.py) completes when charon reports the CHILD_SA up.
Before it, each setup polled `list-sas` every 2-20 ms in a thread of its own: measured, 64
threads polling kept charon and the GIL busy, detected an SA up to 7 ms late, and the setups
queued behind one another. A slow poll (25 ms doubling to 250 ms) remains as the safety net
for a missed event (listener reconnecting after a charon restart) and to see a failed IKE_SA.

One tunnel (measured with strongSwan 5.9.8 and kernel-libipsec in the lab, where this is the one
setup that carries traffic; each step is there for a failure seen without it):
  1. the host's private key is loaded once (`load-key`), again whenever charon was restarted
     (detected by its start time in `stats`);
  2. `load-conn` "isk-...": local id = our FQDN with our SPKI; remote id = the peer's identity with
     the peer's SPKI from the secure IPSECKEY (charon binds the key to that id);
     remote_addrs = the IKE peer (destination or gateway); tunnel mode; local_ts = our
     address /32 (/128), remote_ts = the destination /32 (/128), never more than the record
     vouches for; start_action = trap (fail closed: 5.9.8 raises no acquire from it, hence 3.);
  3. `initiate` without waiting in charon (a blocking initiate holds a charon worker thread;
     more concurrent setups than threads starved charon), then wait until charon reports the
     CHILD_SA INSTALLED (child-updown event, or the safety-net poll): that, and nothing less,
     is success; an IKE_SA that appears and vanishes (or goes down) is a rejection. A
     replacement (`replaces`: same name, new key or gateway) waits for a CHILD_SA in a *new*
     IKE_SA and only then terminates the old IKE_SAs by unique id (make before break);
  4. on failure and on teardown: `terminate` the IKE_SA (force; an initiate timeout does not
     stop retransmits) and then `unload-conn` (unload alone keeps an established SA).
Foreign exceptions (OSError, vici.exception.*) become ProvisioningError subclasses here, once.

The watch (resolver/provisioning/watch.py): `watch(sink)` starts the same listener for good and has
it report
charon's events about our SAs and the end and return of its own session (a dead charon);
`live()` is what charon holds right now (one list-sas), against which every report is checked.

Both ends run our code (issue 11). A peer whose responder did not know us yet answers
AUTHENTICATION_FAILED and looks our key up (resolver/responder/); the initiate is then tried
again after RETRY_DELAYS (5 ms, doubling), within the setup timeout (`_install_retrying`; the
timing is DESIGN.md's "First contact"). What the peer answered comes from charon's log
(resolver/tunnels/vici_log.py) and is what a failure says, in words: never "IKE_SA isk-... went
down". Conns we load are remembered (`loaded`), so that `reload_credentials` can drop every
credential charon holds (a key stays trusted after its conn is unloaded: lab-notes, Careful 1)
and load ours again; `call` runs a caller's VICI function in our workers (the responder's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
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

from resolver.errors import IkeDaemonUnreachable, ProvisioningError, TunnelRejected, TunnelTimeout
from resolver.ipseckey import spki_pem
from resolver.keyfile import read_private_key_file
from resolver.responder.charonlog import Failure, Reason
from resolver.tunnels.config import DEFAULT_DPD_DELAY, Identity
from resolver.tunnels.events import BackendEvent, HeldSa
from resolver.tunnels.intents import (
    CONN_PREFIX,
    DPD_CHILD_OPTIONS,
    InstallFloor,
    InstallShunt,
    InstallTunnel,
    Intent,
    PolicyKey,
    RemoveFloor,
    RemoveShunt,
    RemoveTunnel,
    TunnelSpec,
    dpd_options,
)
from resolver.tunnels.vici_listener import (
    SESSION_ERRORS,
    EventListener,
    child_installed,
    connect,
    text,
)
from resolver.tunnels.vici_log import CharonLog

log = logging.getLogger(__name__)

T = TypeVar("T")

_TERMINATE_MS: Final = 1000
_FIRST_POLL: Final = 0.025  # safety-net poll of list-sas, doubling to _LAST_POLL
_LAST_POLL: Final = 0.25
# With the event listener registered, its child-updown is how a setup ends; the poll only
# catches a missed event or an IKE_SA that failed before it was ever up. Measured (issue 13):
# starting it at 25 ms, most of 32 setups in flight under load polled 2-4 times, each poll 3
# round trips: more VICI traffic than the setups themselves, on charon's CPU and ours.
_EVENT_POLL: Final = 0.25
# CHILD_SA states that carry traffic (REKEYING/UPDATING: still installed while it changes),
# and IKE_SA states whose CHILD_SAs no longer count (being deleted).
_HELD_CHILD: Final = frozenset({"INSTALLED", "REKEYING", "UPDATING"})
_DYING_IKE: Final = frozenset({"DELETING", "DESTROYING"})
_SUPPORTED: Final = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey,
                     ed448.Ed448PublicKey)
# After an AUTHENTICATION_FAILED, try again after these pauses (seconds), as long as the setup
# timeout leaves room for the pause plus RETRY_ROOM. Why these: DESIGN.md, "First contact".
RETRY_DELAYS: Final = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
RETRY_ROOM: Final = 0.05
# The log lines of a failure may trail its ike-updown event (two sessions, no order between
# them; measured a few ms, more under load). Only failures wait, and only until the reason.
_REASON_WAIT: Final = 0.2


class ViciBackend:
    """ProvisioningBackend for tunnels (shunt intents are not ours: see CompositeBackend)."""

    def __init__(
        self,
        socket_uri: str,
        identity: Identity,
        private_key_pem: bytes | None = None,
        *,
        max_workers: int = 8,
        connect_timeout: float = 2.0,
        dpd_delay: int = DEFAULT_DPD_DELAY,
    ) -> None:
        """
        Args:
            socket_uri: "unix:///path/charon.vici" or "tcp://host:port".
            identity: our FQDN, key path and addresses.
            private_key_pem: the key itself (default: read from identity.private_key).
            dpd_delay: [provision] dpd_delay, on every conn we load (ours and the
                responder's: `dpd_options`).

        Raises:
            ProvisioningError: the private key cannot be read or parsed.
        """
        self.uri = socket_uri
        self.identity = identity
        self.connect_timeout = connect_timeout
        self.dpd_delay = dpd_delay
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
        self._local = threading.local()  # each worker's open session
        self._events = EventListener(socket_uri, connect_timeout)
        self.log = CharonLog(lambda: connect(socket_uri, connect_timeout))
        self._loaded: dict[str, dict[str, Any]] = {}  # conn name -> its load-conn payload
        self._cred_lock = threading.Lock()  # load-conn vs. clear-creds and the reload after it
        self.keys_left = False  # a conn with a key was unloaded since the last reload
        self._key_lock = threading.Lock()
        self._charon_since: str | None = None  # charon's start time when we loaded the key
        # The names of our conns charon held when `installed` listed them (None: not listed
        # yet). A conn neither in it nor loaded since has no SA: its first setup skips the
        # look for one (3 VICI round trips, `_fresh`).
        self._listed: frozenset[str] | None = None
        # (load-conn ms, initiate -> INSTALLED ms) of recent setups, for the benchmark/report.
        self.timings: deque[tuple[float, float]] = deque(maxlen=1000)

    # -- ProvisioningBackend -------------------------------------------------------------------

    async def apply(self, intent: Intent) -> None:
        """Raises ProvisioningError subclasses only."""
        if isinstance(intent, InstallTunnel):
            await self._install_retrying(intent.spec, intent.timeout, intent.replaces)
        elif isinstance(intent, RemoveTunnel):
            await self._run(self._remove, intent.name, intent.keep_conn)
        elif isinstance(intent, InstallShunt | RemoveShunt | InstallFloor | RemoveFloor):
            raise TunnelRejected(f"{type(intent).__name__} is not a VICI intent")

    async def installed(self) -> frozenset[PolicyKey]:
        """Our connections loaded in charon (by the "isk-" prefix)."""
        names = await self._run(self._conn_names)
        self._listed = frozenset(names)
        return frozenset(PolicyKey.tunnel(n) for n in names if n.startswith(CONN_PREFIX))

    def watch(self, sink: Callable[[BackendEvent], None]) -> bool:
        """Report charon's events and the event session's state to `sink`, called on the
        running event loop (see resolver/tunnels/events.py). Starts the listener."""
        self._events.subscribe(asyncio.get_running_loop(), sink)
        self._events.start()
        return True

    async def live(self) -> frozenset[HeldSa]:
        """Our CHILD_SAs charon holds now: INSTALLED, in an IKE_SA not being deleted."""
        return await self._run(self._held)

    async def child_states(self) -> dict[str, str]:
        """CHILD_SA name -> state for our connections (tests, `autosp status`)."""
        return await self._run(self._child_states)

    def close(self) -> None:
        self._events.close()
        self.log.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- for the responder ---------------------------------------------------------------------

    def listening(self, timeout: float = 2.0) -> bool:
        """Start both event listeners and wait until charon confirmed their registrations
        (blocking; for benchmarks and tests that time a first setup: the daemon starts them
        at start-up, long before its first query)."""
        self._events.start()
        self.log.start()
        return self._events.ready.wait(timeout) and self.log.ready.wait(timeout)

    async def ensure_key(self) -> None:
        """Our private key in charon (again, if charon was restarted since)."""
        await self._run(lambda: self._ensure_key(self._session()))

    @property
    def own_spki(self) -> str:
        """Our public key as SPKI PEM (what a conn's `local.pubkeys` takes)."""
        return self._own_spki

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(session, *args)` in one of our workers, errors translated as for our own calls;
        a conn `fn` loads should go through `load_conn` so that credential reloads keep it."""
        return await self._run(lambda: fn(self._session(), *args))

    def load_conn(self, s: vici.Session, payload: dict[str, Any]) -> None:
        """load-conn, remembered for `reload_credentials` (worker thread)."""
        with self._cred_lock:
            self._loaded.update(payload)
            s.load_conn(payload)

    def unload_conn(self, s: vici.Session, name: str) -> None:
        """Terminate the IKE_SAs of conn `name` and unload it (worker thread; idempotent)."""
        self._remove(name)

    async def reload_credentials(self) -> int:
        """Drop every credential charon holds (`clear-creds`: keys of conns unloaded long ago
        included) and load ours again: the private key, then every conn we loaded, whose
        pubkeys come back with them. Returns how many conns were reloaded.

        Conns loaded by others lose their credentials too: the caller checks there are none.
        While this runs (about 1 ms per conn) an IKE_AUTH with one of ours may fail; the
        initiator's retries cover that window.
        """
        return await self._run(self._reload_credentials)

    def _reload_credentials(self) -> int:
        s = self._session()
        with self._cred_lock:
            s.clear_creds()
            with self._key_lock:
                s.load_key({"type": "any", "data": self._private_der})
            for name, conn in list(self._loaded.items()):
                s.load_conn({name: conn})
            self.keys_left = False
            return len(self._loaded)

    # -- retries and reasons (issue 11) ---------------------------------------------------------

    async def _install_retrying(self, spec: TunnelSpec, timeout: float, replaces: bool) -> None:
        """`_install`, tried again while the peer answers AUTHENTICATION_FAILED (its responder
        is looking our key up), within `timeout`; a failure says what the peer answered."""
        deadline = time.monotonic() + timeout
        self.log.start()
        if not self.log.ready.is_set():
            await asyncio.to_thread(self.log.ready.wait, min(1.0, timeout / 2))
        delays = iter(RETRY_DELAYS)
        tries = 0
        try:
            while True:
                tries += 1
                self.log.begin(spec.name)
                left = max(0.05, deadline - time.monotonic())
                try:
                    if tries == 1 or replaces:
                        await self._install(spec, left, replaces)
                    else:  # key and conn are loaded: initiate again, and wait
                        await self._initiate_again(spec, left)
                    if tries > 1:
                        log.info("tunnel %s to %s up on try %d", spec.name, spec.destination,
                                 tries)
                    return
                except (TunnelRejected, TunnelTimeout) as exc:
                    reason = await self._reason(spec.name)
                    pause = next(delays, None)
                    if (reason is not None and reason.retry and pause is not None
                            and deadline - time.monotonic() > pause + RETRY_ROOM):
                        log.debug("tunnel %s: %s; trying again in %.0f ms", spec.name,
                                  reason.failure.value, pause * 1000)
                        await asyncio.sleep(pause)
                        continue
                    raise self._explained(spec, exc, reason, tries, timeout) from None
        finally:
            self.log.end(spec.name)

    async def _initiate_again(self, spec: TunnelSpec, timeout: float) -> None:
        """A retry: only the initiate and the wait (saves the 2-3 VICI round trips of
        `_prepare` that a retry within milliseconds has no use for)."""
        deadline = time.monotonic() + timeout

        def again() -> concurrent.futures.Future[None]:
            waiter = self._events.expect(spec.name, set())  # before initiate: no event missed
            try:
                self._initiate(self._session(), spec, timeout, deadline)
            except BaseException:
                self._events.discard(spec.name, waiter)
                raise
            return waiter

        waiter = await self._run(again)
        try:
            await self._await_installed(spec, timeout, deadline, set(), waiter)
        finally:
            self._events.discard(spec.name, waiter)

    async def _reason(self, name: str) -> Reason | None:
        """The failure evidence of `name`'s attempt, waiting briefly for trailing log lines."""
        end = time.monotonic() + _REASON_WAIT
        while (reason := self.log.reason(name)) is None and time.monotonic() < end:
            await asyncio.sleep(0.001)
        return reason

    def _explained(self, spec: TunnelSpec, exc: ProvisioningError, reason: Reason | None,
                   tries: int, timeout: float) -> ProvisioningError:
        """The error to report: what the peer answered, in words (else the original)."""
        if reason is None:
            return exc
        peer = (f"{spec.remote_id} ({spec.remote_addr})"
                if spec.remote_id != str(spec.remote_addr) else str(spec.remote_addr))
        text = reason.words(peer, self.identity.fqdn)
        if tries > 1:
            text += f" ({tries} tries in {timeout:g} s)"
        if reason.failure is Failure.NO_RESPONSE:
            return TunnelTimeout(text)
        return TunnelRejected(text)

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
            **dpd_options(self.dpd_delay),
            "remote_addrs": [str(spec.remote_addr)],
            "local": {"auth": "pubkey", "id": self.identity.fqdn, "pubkeys": [self._own_spki]},
            "remote": {"auth": "pubkey", "id": spec.remote_id, "pubkeys": [spec.key.spki_pem()]},
            "children": {
                spec.name: {
                    "mode": "tunnel",  # transport fails under kernel-libipsec ("unsupported mode")
                    "local_ts": local_ts,
                    "remote_ts": [str(ip_network(spec.destination))],
                    "start_action": "trap",
                    **DPD_CHILD_OPTIONS,
                }
            },
        }
        if own is not None:
            conn["local_addrs"] = [str(own)]
        return {spec.name: conn}

    # -- blocking work (worker threads) --------------------------------------------------------

    async def _install(self, spec: TunnelSpec, timeout: float, replaces: bool) -> None:
        deadline = time.monotonic() + timeout
        self._events.start()
        t0 = time.perf_counter()
        old_ids, waiter = await self._run(self._prepare, spec, timeout, replaces, deadline)
        if waiter is None:
            return  # already up (reconcile, a failed replacement): nothing to initiate
        t1 = time.perf_counter()
        try:
            await self._await_installed(spec, timeout, deadline, old_ids, waiter)
        finally:
            self._events.discard(spec.name, waiter)
        self.timings.append(((t1 - t0) * 1000, (time.perf_counter() - t1) * 1000))
        if old_ids:
            self._events.ending(old_ids)  # our own doing, not a loss for the watch
            await self._run(self._terminate_ids, old_ids)

    def _prepare(self, spec: TunnelSpec, timeout: float, replaces: bool, deadline: float
                 ) -> tuple[set[str], concurrent.futures.Future[None] | None]:
        """load-key, load-conn, register the waiter, initiate (worker thread)."""
        s = self._session()
        self._ensure_key(s)
        # The IKE_SAs of this name now: with `replaces`, they are the old ones, ended only
        # once a new CHILD_SA (in a new IKE_SA) is INSTALLED: make before break.
        old_ids = _ike_ids(s, spec.name) if replaces else set()
        fresh = self._fresh(spec.name)
        self.load_conn(s, self.connection(spec))  # always: it may restore an older one
        if not replaces and not fresh and _installed_child(s, spec.name):
            return old_ids, None
        self._events.ready.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        waiter = self._events.expect(spec.name, old_ids)  # before initiate: no event missed
        try:
            self._initiate(s, spec, timeout, deadline)
        except BaseException:
            self._events.discard(spec.name, waiter)
            raise
        return old_ids, waiter

    def _fresh(self, name: str) -> bool:
        """Whether conn `name` cannot have an SA: charon did not hold it when `installed`
        listed our conns (reconcile does, before any setup) and we have not loaded it since
        (`_remove` forgets what it unloads). A charon restart only removes conns, so a stale
        list errs on the side of looking."""
        return self._listed is not None and name not in self._listed and name not in self._loaded

    def _terminate_ids(self, ike_ids: set[str]) -> None:
        s = self._session()
        for ike_id in ike_ids:
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
        SERVFAIL after 3.4 s). So charon returns at once and `_await_installed` waits.
        """
        if deadline - time.monotonic() <= 0:
            raise TunnelTimeout(f"{spec.name}: no time left to initiate")
        try:
            # A plain request, not the package's streamed `initiate`: without waiting nothing
            # is streamed, and registering and unregistering for control-log made it three
            # round trips instead of one.
            s.request("initiate", {"child": spec.name, "ike": spec.name, "timeout": -1,
                                   "init-limits": "no"})
        except vici.exception.CommandException as exc:
            raise TunnelRejected(f"tunnel to {spec.destination} via {spec.remote_addr} "
                                 f"({spec.remote_id}): {exc}") from None

    async def _await_installed(self, spec: TunnelSpec, timeout: float, deadline: float,
                               old_ids: set[str], waiter: concurrent.futures.Future[None]
                               ) -> None:
        """Wait until the CHILD_SA is INSTALLED (success, and nothing less).

        The listener completes `waiter` on charon's child-updown event (or fails it when a
        new IKE_SA of this name goes down). Between events, a slow list-sas poll: an IKE_SA
        of ours that was seen and then vanished failed (authentication, proposals, the peer
        said no): a rejection, reported at once rather than at the deadline.
        """
        done = asyncio.wrap_future(waiter)
        seen, pause = False, _EVENT_POLL if self._events.ready.is_set() else _FIRST_POLL
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TunnelTimeout(f"tunnel to {spec.destination} via {spec.remote_addr}: "
                                        f"no CHILD_SA within {timeout:g} s")
                await asyncio.wait((done,), timeout=min(pause, left))
                if done.done():
                    done.result()  # raises TunnelRejected if the IKE_SA went down
                    return
                pause = min(pause * 2, _LAST_POLL)
                ikes = await self._run(self._new_ike_sas, spec.name, old_ids)
                if any(child_installed(ike, spec.name) for ike in ikes):
                    return
                if ikes:
                    seen = True
                elif seen:
                    raise TunnelRejected(f"tunnel to {spec.destination} via {spec.remote_addr} "
                                         f"({spec.remote_id}): IKE_SA failed")
        finally:
            if not done.done():
                done.cancel()

    def _new_ike_sas(self, name: str, old_ids: set[str]) -> list[dict[str, Any]]:
        return [ike for ike in _ike_sas(self._session(), name)
                if text(ike.get("uniqueid", b"")) not in old_ids]

    def _remove(self, name: str, keep_conn: bool = False) -> None:
        s = self._session()
        with contextlib.suppress(vici.exception.CommandException):  # no SA: fine
            for _ in s.terminate({"ike": name, "force": "yes", "timeout": _TERMINATE_MS}):
                pass
        if keep_conn:
            return  # a pinned peer's conn stays (trap): the peer may initiate to us
        with self._cred_lock:
            if self._loaded.pop(name, None) is not None:
                self.keys_left = True
        with contextlib.suppress(vici.exception.CommandException):  # not loaded: fine
            s.unload_conn({"name": name})

    def _held(self) -> frozenset[HeldSa]:
        # list_sas is a lazy generator: collect everything before sending anything else.
        sas = list(self._session().list_sas())
        held = set()
        for sa in sas:
            for name, ike in sa.items():
                if not text(name).startswith(CONN_PREFIX) or \
                        text(ike.get("state", b"")) in _DYING_IKE:
                    continue
                for child in (ike.get("child-sas") or {}).values():
                    if text(child.get("state", b"")) in _HELD_CHILD:
                        held.add(HeldSa(text(child.get("name", b"")),
                                        text(ike.get("uniqueid", b"")),
                                        text(child.get("uniqueid", b""))))
        return frozenset(held)

    def _conn_names(self) -> list[str]:
        return [text(n) for n in self._session().get_conns().get("conns", [])]

    def _child_states(self) -> dict[str, str]:
        return {name: state for name, state in _children(self._session())
                if name.startswith(CONN_PREFIX)}

    def _ensure_key(self, s: vici.Session) -> None:
        """load-key once per charon lifetime (a restarted charon forgot it).

        Charon's start time (`stats`) is asked once per session, not per setup: a restarted
        charon closes every session, and a session is only opened anew after an error or in
        a new worker thread, so a session that has been checked talks to the charon that has
        our key (unless `_charon_since` was reset by an error).
        """
        if getattr(self._local, "checked", False) and self._charon_since is not None:
            return
        since = text(s.stats().get("uptime", {}).get("since", b""))
        with self._key_lock:
            if not (since and since == self._charon_since):
                s.load_key({"type": "any", "data": self._private_der})
                self._charon_since = since
                log.info("loaded our private key into charon (%s)", self.uri)
        self._local.checked = True

    def _session(self) -> vici.Session:
        """This worker's open session (connected on first use, again after an error)."""
        session: vici.Session | None = getattr(self._local, "session", None)
        if session is None:
            sock = connect(self.uri, self.connect_timeout)
            session = vici.Session(sock)
            self._local.session, self._local.sock = session, sock
            self._local.checked = False  # maybe another charon: `_ensure_key` asks
        return session

    def _drop_session(self) -> None:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        self._local.session = self._local.sock = None
        if sock is not None:
            sock.close()

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """fn in this worker; a session broken under us (charon restarted) is replaced once."""
        reused = getattr(self._local, "session", None) is not None
        try:
            return fn(*args)
        except SESSION_ERRORS:
            self._drop_session()
            if not reused:
                raise
        return fn(*args)

    # -- the boundary: run in a worker, translate foreign errors once ------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: self._call(fn, *args))
        except (TunnelTimeout, TunnelRejected, IkeDaemonUnreachable):
            raise
        except (OSError, vici.exception.SessionException,
                vici.exception.DeserializationException) as exc:
            self._charon_since = None
            raise IkeDaemonUnreachable(f"IKE daemon at {self.uri}: {exc}") from None
        except vici.exception.CommandException as exc:
            raise TunnelRejected(f"IKE daemon refused: {exc}") from None


def _children(s: vici.Session) -> Iterator[tuple[str, str]]:
    # list_sas is a lazy generator: collect everything before sending anything else.
    sas = list(s.list_sas())
    for sa in sas:
        for ike in sa.values():
            for child in (ike.get("child-sas") or {}).values():
                yield text(child.get("name", b"")), text(child.get("state", b""))


def _ike_sas(s: vici.Session, name: str) -> list[dict[str, Any]]:
    # list_sas is a lazy generator: collect everything before sending anything else.
    return [ike for sa in list(s.list_sas({"ike": name})) for ike in sa.values()]


def _ike_ids(s: vici.Session, name: str) -> set[str]:
    return {text(ike.get("uniqueid", b"")) for ike in _ike_sas(s, name)}


def _installed_child(s: vici.Session, name: str, exclude: set[str] | None = None) -> bool:
    """Whether a CHILD_SA `name` is INSTALLED (in an IKE_SA whose id is not in `exclude`)."""
    return any(child_installed(ike, name) for ike in _ike_sas(s, name)
               if not (exclude and text(ike.get("uniqueid", b"")) in exclude))


def _read(path: Path) -> bytes:
    # Refuses a key file that others can read, as ssh does (ConfigError names the file).
    return read_private_key_file(path)


