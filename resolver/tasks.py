"""Small asyncio task helpers shared by the daemon's long-running parts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has finished, so a stopping component never leaves a
    task running behind it (a task's own CancelledError is its normal end, not an error)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
