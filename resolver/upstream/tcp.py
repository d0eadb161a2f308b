"""One DNS exchange over one TCP connection (RFC 7766 framing), for the forwarder and the
iterator alike: connect, send the length-prefixed query, read one length-prefixed reply, parse.

Failures come back as a sentence (`TcpFailed`), which each caller wraps in its own error type
with the server's name in front.
"""

from __future__ import annotations

import asyncio

import dns.message


class TcpFailed(Exception):
    """The exchange did not yield a DNS message (timeout, network error, not DNS)."""


async def exchange(host: str, port: int, wire: bytes, timeout: float) -> dns.message.Message:
    """Send `wire` to host:port over TCP and return the parsed reply (not checked against the
    question: that is the caller's rule).

    Raises:
        TcpFailed: "TCP timeout after N s", "TCP: <error>", "TCP reply is not DNS: <error>".
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
                length = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(length)
            finally:
                writer.close()
    except TimeoutError:
        raise TcpFailed(f"TCP timeout after {timeout} s") from None
    except (OSError, asyncio.IncompleteReadError) as e:
        raise TcpFailed(f"TCP: {e}") from None
    try:
        return dns.message.from_wire(data)
    except Exception as e:  # dnspython raises a dozen types on garbage
        raise TcpFailed(f"TCP reply is not DNS: {e}") from None
