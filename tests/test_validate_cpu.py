"""CpuTurn: at most `max_validating` validations compute at once; waits for the network and
pauses hand the turn on; a cancelled validation never leaks a turn."""

from __future__ import annotations

import asyncio

from resolver.validator.types import CpuTurn
from tests.helpers import aio


@aio
async def test_at_most_n_hold_a_turn_and_pauses_interleave_them() -> None:
    sem = asyncio.Semaphore(2)
    inside, most, order = 0, 0, []

    async def validation(i: int) -> None:
        nonlocal inside, most
        turn = CpuTurn(sem)
        await turn.acquire()
        try:
            for _ in range(3):
                inside += 1
                most = max(most, inside)
                order.append(i)
                inside -= 1
                await turn.pause()
        finally:
            turn.release()

    await asyncio.gather(*(validation(i) for i in range(5)))
    assert most <= 2
    assert len(order) == 15
    # Pauses let the waiting validations in: validation 4 does not wait for 0 to finish.
    assert order.index(4) < len(order) - 3


@aio
async def test_a_validation_waiting_for_the_network_lets_another_compute() -> None:
    sem = asyncio.Semaphore(1)
    upstream = asyncio.Event()
    computed = asyncio.Event()

    async def waiting() -> None:
        turn = CpuTurn(sem)
        await turn.acquire()
        async with turn.released():
            await upstream.wait()
        turn.release()

    async def computing() -> None:
        turn = CpuTurn(sem)
        await turn.acquire()
        computed.set()
        turn.release()

    w = asyncio.create_task(waiting())
    await asyncio.sleep(0)
    await asyncio.wait_for(computing(), 1)  # would hang if the fetch kept the turn
    assert computed.is_set()
    upstream.set()
    await asyncio.wait_for(w, 1)
    assert not sem.locked()


@aio
async def test_cancelled_while_waiting_for_a_turn_leaks_nothing() -> None:
    sem = asyncio.Semaphore(1)
    holder = CpuTurn(sem)
    await holder.acquire()

    async def victim() -> None:
        turn = CpuTurn(sem)
        await turn.acquire()
        try:
            async with turn.released():
                await asyncio.sleep(0)
        finally:
            turn.release()

    task = asyncio.create_task(victim())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    holder.release()
    holder.release()  # a second release is harmless
    assert sem._value == 1  # exactly one turn, none leaked or invented
