"""One deadline for a bounded wait: every wait in weightstream has a timeout, counted from
when the wait began however often it wakes (a spurious wake-up must not restart the clock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Deadline:
    """``timeout`` seconds from now, on the monotonic clock."""

    __slots__ = ("end", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        """Seconds left; zero or less once it passed."""
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0


def wait_until(cond: threading.Condition, predicate: Callable[[], bool], deadline: Deadline) -> bool:
    """Wait on ``cond``, whose lock the caller holds, until ``predicate()`` holds: True, or False once
    ``deadline`` passed first. ``predicate`` runs at once and after every wake-up, under the lock;
    it may raise to end the wait (a failed round, say)."""
    while not predicate():
        left = deadline.left()
        if left <= 0:
            return False
        cond.wait(left)
    return True
