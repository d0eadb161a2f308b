"""The optional Prometheus listener: `[metrics] listen = "127.0.0.1:9153"`.

A minimal HTTP/1.0 responder on asyncio: `GET /metrics` answers the registry in the text
format, anything else 404 (405 for other methods). One request per connection; the request
head is bounded in size and time, so a slow or hostile client costs one task for a few
seconds and nothing else. There is no authentication: bind it to loopback (the default
address is 127.0.0.1) or to an address only the scraper reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from resolver.config import HostPort
from resolver.errors import ConfigError
from resolver.metrics.registry import CONTENT_TYPE, Registry

__all__ = ["MetricsListener"]

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8192
READ_TIMEOUT: Final = 5.0


class MetricsListener:
    """Serves `registry` over HTTP at `endpoint` until closed."""

    def __init__(self, registry: Registry, endpoint: HostPort) -> None:
        self.registry = registry
        self.endpoint = endpoint
        self.server: asyncio.Server | None = None
        self.bound: tuple[str, int] | None = None

    async def start(self) -> None:
        """Bind and listen.

        Raises:
            ConfigError: the address cannot be bound (in use, not ours, no permission).
        """
        try:
            self.server = await asyncio.start_server(self._client, self.endpoint.host,
                                                     self.endpoint.port, reuse_address=True,
                                                     limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"[metrics] cannot listen on {self.endpoint}: "
                              f"{exc.strerror or exc}") from None
        sock = self.server.sockets[0].getsockname()
        self.bound = (str(sock[0]), int(sock[1]))
        log.info("event=metrics-listening address=%s", HostPort(self.bound[0], self.bound[1]))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, body, ctype = self._answer(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
        except (TimeoutError, OSError):
            writer.close()
            return
        head_out = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError, TimeoutError):
            writer.write(head_out.encode() + body)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        words = head.split(b"\r\n", 1)[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target = words[0], words[1].split(b"?", 1)[0]
        if target != b"/metrics":
            return "404 Not Found", b"only /metrics is here\n", "text/plain"
        if method != b"GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        return "200 OK", self.registry.render().encode(), CONTENT_TYPE
