"""Helpers shared by the test files: running coroutines, reading replies, checking the wire.

One copy of each thing several test files do. What is about the lab itself (pinging from a
host, dig, captures, charon's conns, DNS updates) is a method of `lab.Lab`; what is here
asserts on the lab's results (ESP only, fail closed) or on DNS replies, or runs async code.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import dns.message

T = TypeVar("T")


# --- async ------------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on a fresh event loop, failing it after `timeout` seconds (None: never)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def aio(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (the project has no pytest-asyncio)."""

    @functools.wraps(fn)
    def runner(*args: Any, **kwargs: Any) -> None:
        run(fn(*args, **kwargs))

    return runner


# --- DNS replies ------------------------------------------------------------------------------


def edes(reply: dns.message.Message) -> list[tuple[int, str]]:
    """Every Extended DNS Error in a reply, as (INFO-CODE, EXTRA-TEXT)."""
    return [(int(e.code), e.text or "") for e in reply.extended_errors()]


def ede(reply: dns.message.Message) -> tuple[int, str]:
    """The reply's one Extended DNS Error; fails the test when it has none or several."""
    found = edes(reply)
    assert len(found) == 1, f"{len(found)} EDE options in\n{reply}"
    return found[0]
