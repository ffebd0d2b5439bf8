"""Bounded waits for the daemon's tasks that never swallow a cancellation.

Python 3.11's ``asyncio.wait_for`` returns the awaited result when that future finishes
in the same loop iteration that cancels the waiter, and the CancelledError is lost
(CPython gh-86296, fixed in 3.12). A daemon task that loses its cancel runs on, and
``stop()`` waits for it in vain; so every bounded wait here goes through
``asyncio.wait``, which re-raises the cancellation and never cancels what it waits for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


async def wait_bounded(future: asyncio.Future[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``future`` without cancelling it; True if it finished."""
    done, _ = await asyncio.wait({future}, timeout=timeout)
    return bool(done)


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, grace: float, attempts: int) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks``, again each ``grace`` seconds for those still running; return any left after ``attempts``."""
    pending = {task for task in tasks if not task.done()}
    for _ in range(attempts):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=grace)
    return sorted(pending, key=lambda task: task.get_name())
