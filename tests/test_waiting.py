"""The daemon's bounded waits keep a cancellation that lands as the awaited future finishes."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from weightstream.receiver.waiting import cancel_and_wait, wait_bounded

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=sorted(RUNNERS))
def run(request: pytest.FixtureRequest) -> Runner:
    return RUNNERS[request.param]


async def _cancel_as_it_finishes(wait: Callable[[asyncio.Future[int]], Coroutine[Any, Any, Any]]) -> str:
    """Finish the awaited future and cancel its waiter in the same loop iteration."""
    inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waiter() -> str:
        await wait(inner)
        return "went on"

    task = asyncio.create_task(waiter())
    for _ in range(3):
        await asyncio.sleep(0)  # the waiter is now parked on inner
    inner.set_result(1)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancel from 3.12 on")
def test_the_race_is_real_on_this_python(run: Runner) -> None:
    """The scenario below does lose the cancel through wait_for, so the next test means something."""
    assert run(_cancel_as_it_finishes(lambda f: asyncio.wait_for(asyncio.shield(f), 100))) == "went on"


def test_wait_bounded_keeps_the_cancel(run: Runner) -> None:
    assert run(_cancel_as_it_finishes(lambda f: wait_bounded(f, 100))) == "cancelled"


def test_wait_bounded_times_out_without_cancelling(run: Runner) -> None:
    async def main() -> tuple[bool, bool, bool]:
        inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        finished = await wait_bounded(inner, 0.01)
        cancelled = inner.cancelled()
        inner.set_result(2)
        return finished, cancelled, await wait_bounded(inner, 1)

    assert run(main()) == (False, False, True)


def test_cancel_and_wait_cancels_again_a_task_that_carried_on(run: Runner) -> None:
    """A task that swallows its first cancel (as wait_for could) is cancelled again, not waited for forever."""

    async def main() -> tuple[list[asyncio.Task[Any]], int]:
        swallowed = 0

        async def stubborn_once() -> None:
            nonlocal swallowed
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
            await asyncio.sleep(3600)

        task = asyncio.create_task(stubborn_once(), name="stubborn")
        await asyncio.sleep(0)
        left = await cancel_and_wait([task], grace=0.05, attempts=3)
        return left, swallowed

    left, swallowed = run(main())
    assert left == [] and swallowed == 1


def test_cancel_and_wait_returns_what_never_stops(run: Runner) -> None:
    async def main() -> tuple[list[str], int]:
        cancels = 0
        release = asyncio.Event()

        async def deaf() -> None:
            nonlocal cancels
            while not release.is_set():
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    cancels += 1

        quick = asyncio.create_task(asyncio.sleep(3600), name="quick")
        task = asyncio.create_task(deaf(), name="deaf")
        await asyncio.sleep(0)
        left = await cancel_and_wait([task, quick], grace=0.01, attempts=3)
        release.set()
        task.cancel()  # wakes it; it sees release and returns
        await task
        return [t.get_name() for t in left], cancels

    assert run(main()) == (["deaf"], 4)
