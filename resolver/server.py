"""asyncio DNS transport: UDP and TCP listeners, the wire-cache fast path, and task lifetimes.

Theory of operation (modelled on aioquic's protocol classes: the transport callbacks only move
bytes, `Server` decides what to send):

1. A datagram (or a TCP frame) arrives. `Server.fast_reply` peeks at the header and question
   by slicing (answer.peek_query). If a final reply for the same question and client flags is
   in the wire cache, it is sent at once: ID, RD and question case patched, TTLs aged. No
   parse, no task, no validator.
2. Otherwise `Server.slow_reply` runs as a task: a full parse (MalformedMessage territory:
   FORMERR when the header can be read, otherwise the packet is dropped; a response, QR=1, is
   always dropped), NOTIMP for opcodes other than QUERY, FORMERR unless exactly one question,
   BADVERS for EDNS versions above 0; question types a resolver never forwards are answered
   here (answer.local_reply: qtype 0 and meta-types FORMERR, AXFR/IXFR REFUSED, ANY the RFC
   8482 HINFO); then the QueryHandler builds the reply. A reply with NOERROR/NXDOMAIN and a
   positive TTL goes into the wire cache for step 1.
3. UDP replies larger than the client's size (512 without EDNS, else its payload, at most
   ours) are truncated with TC set; the client retries over TCP. TCP connections
   (resolver/server_tcp.py) carry any number of queries, answered as they complete
   (pipelining), with every resource a peer can hold bounded: time to send a frame, idle
   time, lifetime, queries in progress, unread output, and the number of connections (at the
   bound the stalest idle connection gives way).

The server reads the clock (time.time(), POSIX seconds, because RRSIG validity is POSIX) and
passes `now` down; nothing below it reads the clock. Whatever bytes arrive, the server either
replies or drops: an exception escaping a handler is logged as a bug and becomes SERVFAIL.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, Final

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode

from resolver import answer as replies
from resolver.cache import WireCache, WireEntry
from resolver.config import HostPort, ServerConfig
from resolver.errors import ConfigError
from resolver.resolve import QueryHandler
from resolver.server_tcp import TcpConnection
from resolver.validator.response import Security, Verdict
from resolver.wire.parse import parse_response

log = logging.getLogger(__name__)
trace = logging.getLogger("resolver.trace")

MAX_TCP_MESSAGE: Final = 65535
MAX_UDP_TASKS: Final = 4096  # slow-path UDP queries in progress; beyond that we drop (shed load)


class Server:
    """Turns query bytes into reply bytes; shared by all UDP and TCP listeners.

    Args:
        handler: builds replies for well-formed queries.
        config: the [server] settings.
        cache: the final-answer wire cache (None: no fast path).
        clock: returns POSIX seconds (a parameter so tests can pin time).
    """

    def __init__(self, handler: QueryHandler, config: ServerConfig | None = None, *,
                 cache: WireCache | None = None, clock: Callable[[], float] = time.time) -> None:
        self.handler = handler
        self.config = config if config is not None else ServerConfig()
        self.cache = cache
        self.clock = clock
        self.payload = self.config.edns_payload
        # Ordered stalest first (longest without a whole query): the eviction order.
        self.tcp_connections: dict[TcpConnection, None] = {}
        self.udp_tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._udp: list[_UdpListener] = []
        self.bound: list[tuple[str, int]] = []  # actual addresses (port 0 resolved)
        self.fast_counts: dict[tuple[int, int], int] | None = None  # see fast_reply

    # --- bytes in, bytes out ---------------------------------------------------------------

    def fast_reply(self, wire: bytes, now: float, udp: bool) -> bytes | None:
        """The cached reply for this query, or None (then the slow path runs).

        Counts the reply in `fast_counts` by (qtype, rcode) when that is a dict (the metered
        server's; a dict update here is cheaper than a metering wrapper around the call).
        """
        if self.cache is None:
            return None
        peek = replies.peek_query(wire)
        if peek is None:
            return None
        entry = self.cache.get(peek.key, now)
        if entry is None:
            return None
        if udp and len(entry.wire) > min(peek.udp_size, self.payload):
            return None  # the slow path truncates properly
        reply = entry.render(wire, now)
        counts = self.fast_counts
        if counts is not None:
            key = (peek.key[1], reply[3] & 0x0F)
            counts[key] = counts.get(key, 0) + 1
        return reply

    async def slow_reply(self, wire: bytes, now: float, udp: bool) -> bytes | None:
        """Parse, check, handle and render one query; None means drop it."""
        if len(wire) < 12 or wire[2] & 0x80:
            return None  # no header, or a response sent to us: drop
        opcode = (wire[2] >> 3) & 0x0F
        if opcode != dns.opcode.QUERY:
            return replies.header_error(wire, dns.rcode.NOTIMP)
        peek = replies.peek_query(wire)
        try:
            # A plain query (what peek_query accepts: one question, at most an OPT, nothing
            # after it) is read by wire/parse, which gives from_wire's message for a third
            # of the cost; anything else by dnspython, whose errors decide FORMERR.
            query = parse_response(wire) if peek is not None else dns.message.from_wire(wire)
        except dns.message.UnknownTSIGKey:
            return replies.header_error(wire, dns.rcode.REFUSED)
        except Exception:  # dnspython raises a dozen exception types on bad input
            return replies.header_error(wire, dns.rcode.FORMERR)
        if len(query.question) != 1:
            return replies.header_error(wire, dns.rcode.FORMERR)
        if query.edns > 0:
            reply = replies.error_reply(query, dns.rcode.BADVERS, self.payload)
            return replies.to_wire(reply, self._limit(query, udp))
        local = replies.local_reply(query, self.payload)
        if local is not None:  # qtype 0, meta-types, AXFR/IXFR, ANY: never sent upstream
            trace.debug("%s: answered locally, %s", query.question[0],
                        dns.rcode.to_text(local.rcode()))
            full = replies.to_wire(local, MAX_TCP_MESSAGE)
            self._store(peek, local, full, now)
            return replies.to_wire(local, self._limit(query, udp))
        generation = self.cache.generation if self.cache is not None else 0
        try:
            # asyncio.timeout, not wait_for: wait_for runs the handler in a task of its own
            # (5 us more per cold query), and the slow path is a task already.
            async with asyncio.timeout(self.config.query_timeout):
                reply = await self.handler.handle(query, now)
        except TimeoutError:
            verdict = Verdict(Security.INDETERMINATE, "resolution timed out",
                              dns.edns.EDECode.NO_REACHABLE_AUTHORITY)
            reply = replies.servfail(query, verdict, self.payload)
        except Exception:
            log.exception("bug: handler failed on %s", query.question[0])
            verdict = Verdict(Security.INDETERMINATE, "internal error", dns.edns.EDECode.OTHER)
            reply = replies.servfail(query, verdict, self.payload)
        full = replies.to_wire(reply, MAX_TCP_MESSAGE)
        self._store(peek, reply, full, now, generation)
        limit = self._limit(query, udp)
        if len(full) <= limit:
            return full
        trace.debug("reply %d bytes > %d: truncated", len(full), limit)
        return replies.to_wire(reply, limit)

    def _limit(self, query: dns.message.Message, udp: bool) -> int:
        if not udp:
            return MAX_TCP_MESSAGE
        if query.edns < 0:
            return 512
        return min(max(512, query.payload), self.payload)

    def _store(self, peek: replies.QueryPeek | None, reply: dns.message.Message, full: bytes,
               now: float, generation: int | None = None) -> None:
        if self.cache is None or peek is None or \
                reply.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return
        if full[2] & 0x02:  # TC even over TCP (> 64 KiB): never cache a partial answer
            return
        ttl = replies.min_ttl(reply)
        if ttl is None or ttl <= 0:
            return
        entry = WireEntry(full, now, replies.ttl_offsets(full), peek.qname_len)
        self.cache.put(peek.key, entry, now + ttl, generation)

    # --- listeners -------------------------------------------------------------------------

    async def start(self, listen: tuple[HostPort, ...]) -> None:
        """Bind UDP and TCP on every address.

        Raises:
            ConfigError: an address cannot be bound (in use, not ours, no permission).
        """
        loop = asyncio.get_running_loop()
        for ep in listen:
            # Port 0 (tests, benchmarks): the kernel picks the UDP port, and TCP may find that
            # port taken by someone else's TCP socket; pick again rather than fail.
            tries = 8 if ep.port == 0 else 1
            for attempt in range(tries):
                try:
                    port, srv = await self._bind(loop, ep)
                    break
                except OSError as e:
                    if attempt + 1 < tries and e.errno == errno.EADDRINUSE:
                        continue
                    await self.stop()
                    raise ConfigError(f"cannot listen on {ep}: {e.strerror or e}") from None
            self._servers.append(srv)
            self.bound.append((ep.host, port))
            log.info("listening on %s (UDP+TCP)", HostPort(ep.host, port))

    async def _bind(self, loop: asyncio.AbstractEventLoop,
                    ep: HostPort) -> tuple[int, asyncio.Server]:
        """Bind one listen address for UDP and TCP (the same port); returns it and the server.

        Raises:
            OSError: either bind failed; nothing stays bound then.
        """
        family = socket.AF_INET6 if ep.family == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind((ep.host, ep.port))
            port = sock.getsockname()[1]
            # The accept queue holds at least as many as we serve: under a connection
            # flood a client's SYN should wait for the eviction rule, not be dropped.
            backlog = max(128, self.config.tcp_max_connections)
            srv = await loop.create_server(lambda: TcpConnection(self), ep.host, port,
                                           reuse_address=True, backlog=backlog)
        except OSError:
            sock.close()
            raise
        for listener in srv.sockets:
            # Accepted sockets inherit it: queries a peer sends while we do not read
            # (pipelining bound, unread replies) wait in at most this much kernel
            # memory, instead of a receive buffer autotuned up to tcp_rmem's maximum.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                self.config.tcp_max_buffered)
        self._udp.append(_UdpListener(self, sock))
        return port, srv

    def evict_tcp(self) -> bool:
        """Free a TCP slot for a newcomer, taking it from whoever holds one for the least.

        Only connections without a query in progress may give way, in this order: one that
        is trickling a frame (what a slow-loris holds), then one already answered and idle
        (closed gracefully, its replies still go out), and only then one that has sent
        nothing at all. One not read yet is judged by what waits for it in the kernel
        (`TcpConnection.eviction_rank`): a connection is accepted in one turn of the loop and
        read in a later one, and after a stall a whole backlog of newcomers is accepted before
        any is read; judged by age alone, real clients among them were cut (1 in 15 on a
        loaded CI runner). Within a rank, the one that has gone longest without a whole query
        goes first (the dict keeps that order).

        Returns:
            False if every connection has a query in progress (then nothing is evicted).
        """
        best: TcpConnection | None = None
        best_rank = 3
        for conn in self.tcp_connections:
            rank = conn.eviction_rank()
            if rank < best_rank:
                best, best_rank = conn, rank
                if rank == 0:
                    break
        if best is None:
            return False
        why = "connection bound reached: the stalest connection gives way"
        if best_rank == 1:
            best.give_way(why)
        else:
            best.abort(why)
        return True

    async def stop(self) -> None:
        """Close listeners and connections; cancel queries in progress."""
        for u in self._udp:
            u.close()
        for s in self._servers:
            s.close()
        for conn in list(self.tcp_connections):
            conn.close()
        tasks = list(self.udp_tasks)
        for conn in self.tcp_connections:
            tasks.extend(conn.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in self._servers:
            await s.wait_closed()
        self._udp.clear()
        self._servers.clear()


class _UdpListener:
    """One UDP socket, read directly from the event loop's selector.

    Why not asyncio's DatagramProtocol: its transport reads one datagram per readiness event,
    so every query pays a full event-loop iteration (an epoll call and a scheduling round)
    before it is even looked at. Draining the socket in batches from `add_reader` more than
    doubles the cached-answer rate. Replies are sent with a non-blocking sendto; if the
    kernel's send buffer is full the reply is dropped, as a loaded DNS server drops, and the
    client retries (asyncio would buffer it without bound instead).
    """

    BATCH: Final = 64  # datagrams per wake-up: bounded so TCP and timers are not starved

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        server = self.server
        recvfrom, sendto = self.sock.recvfrom, self.sock.sendto
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ICMP errors reported for earlier replies
            now = server.clock()
            reply = server.fast_reply(data, now, True)
            if reply is not None:
                try:
                    sendto(reply, addr)
                except OSError:
                    pass  # as in send(): buffer full or client gone
            elif len(server.udp_tasks) < MAX_UDP_TASKS:
                task = self.loop.create_task(self._answer(data, addr, now))
                server.udp_tasks.add(task)
                task.add_done_callback(server.udp_tasks.discard)

    def send(self, reply: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(reply, addr)
        except OSError:
            pass  # buffer full or client gone: UDP replies are best effort

    async def _answer(self, data: bytes, addr: Any, now: float) -> None:
        reply = await self.server.slow_reply(data, now, udp=True)
        if reply is not None and self.sock.fileno() >= 0:
            self.send(reply, addr)
