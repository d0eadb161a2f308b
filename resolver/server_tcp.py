"""One client TCP connection (RFC 7766) and the bounds that keep a peer from holding it.

Theory of operation: the transport callbacks move bytes only; `Server` (resolver/server.py)
turns query bytes into reply bytes, exactly as for UDP. This class frames them (2-byte
length), runs queries concurrently and answers them as they complete (pipelining), and
enforces the limits of [server] listed on `TcpConnection`, all of them by timers and
asyncio's flow control (pause_reading, pause_writing), never by reading the clock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from resolver.server import Server

trace = logging.getLogger("resolver.trace")
_PEEK = 4096  # a longer query waiting unread counts as an incomplete frame: it may give way


class TcpConnection(asyncio.Protocol):
    """One client TCP connection (RFC 7766): 2-byte length frames, pipelined queries.

    Every resource a peer can hold is bounded (issue 10: slow-loris and clients that never
    read), all from [server]:

    * a frame must arrive whole within `tcp_frame_timeout` of its first byte: trickling bytes
      does not keep a connection alive, and the idle timer counts only whole queries; a frame
      shorter than a DNS header ends the connection;
    * idle: no whole query, no query in progress and no reply for `tcp_idle_timeout`;
    * lifetime: after `tcp_max_lifetime` no further query is read; those in progress are
      answered (each bounded by query_timeout), then the connection closes;
    * queries in progress: at most `tcp_max_pipelined`; further frames wait unread;
    * output: the socket's kernel send buffer is set to `tcp_max_buffered` (the receive
      buffer too, on the listening socket); once more than half of `tcp_max_buffered` waits in
      our own buffer (the kernel's is full: the peer is not reading), we stop reading its
      queries; if our buffer does not drain within `tcp_frame_timeout`, or a reply would take
      it above `tcp_max_buffered`, the connection is aborted and the buffer discarded;
    * connections: at most `tcp_max_connections`. At the bound a new connection replaces one
      with no query in progress: first one trickling a frame (what a slow-loris holds), then
      one answered and idle, last one that has sent nothing yet (`Server.evict_tcp`), so
      trickling peers cannot keep real clients out; only when every connection has a query
      in progress is the newcomer refused.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.buffer = bytearray()
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.write_blocked = False  # our output is above the high-water mark
        self.draining = False  # lifetime over: answer what is in progress, then close
        self.idle: asyncio.TimerHandle | None = None
        self.frame: asyncio.TimerHandle | None = None
        self.stall: asyncio.TimerHandle | None = None
        self.lifetime: asyncio.TimerHandle | None = None
        self.served = False  # at least one whole query was read

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        conns = self.server.tcp_connections
        if len(conns) >= self.config.tcp_max_connections and not self.server.evict_tcp():
            transport.abort()  # every slot is answering a query: refuse rather than queue
            return
        conns[self] = None
        high = self.config.tcp_max_buffered // 2
        transport.set_write_buffer_limits(high=high, low=high // 4)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The kernel's share too: autotuning grows a send buffer up to tcp_wmem's 4 MiB
            # for a peer that never reads; a DNS reply is at most 64 KiB.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                self.config.tcp_max_buffered)
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.config.tcp_idle_timeout, self._idle_expired)
        self.lifetime = loop.call_later(self.config.tcp_max_lifetime, self._lifetime_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_connections.pop(self, None)
        for timer in (self.idle, self.frame, self.stall, self.lifetime):
            if timer is not None:
                timer.cancel()
        for task in self.tasks:
            task.cancel()

    def eviction_rank(self) -> int:
        """Who gives way at the connection bound: 0 first, 3 never (see `Server.evict_tcp`)."""
        if self.tasks:
            return 3
        if self.buffer:
            return 0  # a frame started and not whole: trickling (or the rest of a pipeline)
        if self.served:
            return 1
        # Nothing read from it yet. A connection is accepted in one turn of the loop and read
        # in a later one, so after a stall a whole backlog of newcomers is accepted before
        # any is read: look at what waits in the kernel for it instead of guessing by age.
        waiting = self._peek()
        if not waiting:
            return 2  # silent
        return 0 if _incomplete(waiting) else 3  # a frame trickles in / a query waits

    def _peek(self) -> bytes:
        """What the peer has sent that we have not read, up to a query's usual size."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return b""
        try:
            with sock.dup() as own:  # the transport's socket allows no recv; a dup does
                waiting: bytes = own.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                return waiting
        except OSError:  # nothing waiting (EAGAIN), or the connection is gone
            return b""

    def give_way(self, why: str) -> None:
        """Leave the connection bound now. Replies the kernel holds still go out; output
        still waiting in our buffer means the peer is not reading, and it is dropped (a
        graceful close would wait for that peer, outside the bound, for as long as it likes)."""
        self.server.tcp_connections.pop(self, None)
        self._finish(why)

    def close(self) -> None:
        """Close after the buffered output is sent (server shutdown)."""
        if self.transport is not None:
            self.transport.close()

    def abort(self, why: str) -> None:
        """Drop the connection and whatever output waits for it."""
        trace.debug("TCP connection aborted: %s", why)
        self.server.tcp_connections.pop(self, None)  # its slot is free from now on
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, why: str) -> None:
        # close() would wait for a peer that does not read, forever: output still buffered
        # after idle or lifetime means it stopped reading long ago.
        if self.transport is not None and self.transport.get_write_buffer_size():
            self.abort(f"{why}, output not read")
        else:
            trace.debug("TCP connection closed: %s", why)
            self.close()

    # --- timers ----------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(self.config.tcp_idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self.idle = None
        if self.tasks:  # still working for this client: not idle
            self._arm_idle()
        else:
            self._finish("idle")

    def _frame_expired(self) -> None:
        self.frame = None
        self.abort(f"frame not complete within {self.config.tcp_frame_timeout} s")

    def _stall_expired(self) -> None:
        self.stall = None
        self.abort(f"replies not read within {self.config.tcp_frame_timeout} s")

    def _lifetime_expired(self) -> None:
        self.lifetime = None
        self.draining = True
        self._flow()
        if not self.tasks:
            self._finish("lifetime over")

    # --- flow control ----------------------------------------------------------------------

    def pause_writing(self) -> None:
        """asyncio: our buffered output passed the high-water mark (the peer is not reading)."""
        self.write_blocked = True
        if self.stall is None:
            loop = asyncio.get_running_loop()
            self.stall = loop.call_later(self.config.tcp_frame_timeout, self._stall_expired)
        self._flow()

    def resume_writing(self) -> None:
        """asyncio: our buffered output drained below the low-water mark."""
        self.write_blocked = False
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None
        self._process()

    def _can_take(self) -> bool:
        return (not self.draining and not self.write_blocked
                and len(self.tasks) < self.config.tcp_max_pipelined)

    def _head_incomplete(self) -> bool:
        return _incomplete(self.buffer)

    def _flow(self) -> None:
        """Pause or resume reading; run the frame deadline only while we read."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        pause = not self._can_take()
        if pause and not self.reading_paused:
            transport.pause_reading()
            self.reading_paused = True
        elif not pause and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False
        # The deadline runs from a frame's first byte while we are reading: a frame we keep
        # waiting (our own pause) is not the peer's fault.
        if self.reading_paused or not self._head_incomplete():
            if self.frame is not None:
                self.frame.cancel()
                self.frame = None
        elif self.frame is None:
            loop = asyncio.get_running_loop()
            self.frame = loop.call_later(self.config.tcp_frame_timeout, self._frame_expired)

    # --- frames in, replies out ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        """Take every whole frame we may take now; the rest waits in the buffer."""
        buf = self.buffer
        while len(buf) >= 2 and self._can_take():
            length = buf[0] << 8 | buf[1]
            if len(buf) < 2 + length:
                break
            if length < 12:
                # No DNS message is shorter than its header: whoever sends this is not a DNS
                # client (e.g. a trickle of zero bytes, which would otherwise pass as a
                # stream of empty frames, each one "progress" for the timers below).
                self.abort(f"a {length}-byte frame is not a DNS message")
                return
            wire = bytes(buf[2:2 + length])
            del buf[:2 + length]
            self._whole_frame()
            self._query(wire)
            if self.transport is None or self.transport.is_closing():
                return
        self._flow()

    def _whole_frame(self) -> None:
        # A whole query is progress: the idle timer restarts, the frame deadline ends, and
        # the connection becomes the last one evicted at the connection bound.
        if self.frame is not None:
            self.frame.cancel()
            self.frame = None
        self._arm_idle()
        self.served = True
        conns = self.server.tcp_connections
        if self in conns:  # move to the end: dicts keep insertion order
            del conns[self]
            conns[self] = None

    def _query(self, wire: bytes) -> None:
        server = self.server
        now = server.clock()
        reply = server.fast_reply(wire, now, udp=False)
        if reply is not None:
            self._send(reply)
            return
        task = asyncio.get_running_loop().create_task(self._answer(wire, now))
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.transport is None or self.transport.is_closing():
            return
        self._arm_idle()  # a reply just went out: idle counts from here
        if self.draining and not self.tasks:
            self._finish("lifetime over")
        else:
            self._process()

    async def _answer(self, wire: bytes, now: float) -> None:
        reply = await self.server.slow_reply(wire, now, udp=False)
        if reply is not None:
            self._send(reply)

    def _send(self, reply: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        frame = len(reply).to_bytes(2, "big") + reply
        if transport.get_write_buffer_size() + len(frame) > self.config.tcp_max_buffered:
            self.abort(f"more than {self.config.tcp_max_buffered} bytes of replies unread")
            return
        transport.write(frame)


def _incomplete(buf: bytes | bytearray) -> bool:
    """Bytes that start a frame and do not hold all of it (2-byte length, then the message)."""
    return bool(buf) and (len(buf) < 2 or len(buf) < 2 + (buf[0] << 8 | buf[1]))
