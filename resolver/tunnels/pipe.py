"""Frames between the daemon and its tunnel worker process (resolver/tunnels/process.py and
resolver/tunnels/worker.py): a 4-byte big-endian length, then a pickle.

Pickle because both ends are this program, started by it over a socketpair nobody else holds
(never a socket on the file system), and the values are the intents, events and errors the
backends already speak (frozen dataclasses, ProvisioningError subclasses): no second encoding
to keep in step. Each frame goes out in one `write`, so concurrent senders never interleave.

Messages (tuples, first item the kind):
  daemon -> worker   ("init", ProvisionConfig, Identity | None, log level)
                     ("call", id, method, args)   method: apply, installed, live, child_states
                     ("watch",)                   start reporting events
  worker -> daemon   ("ready", watchable) | ("failed", why)     after "init"
                     ("result", id, value) | ("error", id, ProvisioningError)
                     ("event", BackendEvent)
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any, Final

_LEN: Final = struct.Struct("!I")
MAX_FRAME: Final = 256 << 20  # a list of 10,000s of SAs fits; a corrupt length does not pass


def frame(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def send(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    """Queue one frame (one write: frames never interleave)."""
    writer.write(frame(message))


class Outbox:
    """Frames sent within one turn of the event loop go out in one write.

    Why: each write wakes the other process, and on a busy machine the woken process often
    takes our CPU at once (measured in the 200-peer burst: a send on the pipe cost 0.1-0.3 ms,
    most of it waiting to be scheduled again). A burst of intents or results is one wake-up.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._frames: list[bytes] = []

    def send(self, message: tuple[Any, ...]) -> None:
        self.put(frame(message))

    def put(self, data: bytes) -> None:
        """Queue an encoded frame."""
        if not self._frames:
            asyncio.get_running_loop().call_soon(self.flush)
        self._frames.append(data)

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        if frames and not self.writer.is_closing():
            self.writer.write(b"".join(frames))


async def receive(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at the end of the stream.

    Raises:
        ValueError: a frame longer than MAX_FRAME or not a tuple (a bug on the other side).
    """
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError:
        return None
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME:
        raise ValueError(f"tunnel worker frame of {length} bytes")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None
    message = pickle.loads(body)  # noqa: S301 - our own child, over a private socketpair
    if not isinstance(message, tuple) or not message:
        raise ValueError(f"tunnel worker sent {type(message).__name__}, not a message")
    return message
