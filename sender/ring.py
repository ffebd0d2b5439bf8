"""A ring of reusable bucket slots: a slot is handed out again only once freed.

The publisher frees a slot when every receiver of the round acked the bucket in
it; the packer waits here, with a timeout, for a free slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from ..deadline import Deadline, wait_until
from ..protocol.errors import PeerTimeout


class SlotRing:
    def __init__(self, count: int, cond: threading.Condition) -> None:
        self.count = count
        self._cond = cond  # shared with the publisher so one lock guards round state
        self._free: deque[int] = deque(range(count))
        self.waited = 0.0  # seconds the packer waited for a free slot since the last reset

    def acquire(self, timeout: float, check: Callable[[], None]) -> int:
        """Wait for a free slot; ``check`` raises if the round failed meanwhile."""
        deadline = Deadline(timeout)

        def free() -> bool:
            check()
            return bool(self._free)

        with self._cond:
            if not self._free:  # the ranks have not acked a slot yet: the wait is timed
                started = time.perf_counter()
                try:
                    if not wait_until(self._cond, free, deadline):
                        raise PeerTimeout(
                            f"no bucket slot was freed within {timeout:.1f}s: receivers did not ack; "
                            "check the receivers' load_weights, or raise timeout="
                        )
                finally:
                    self.waited += time.perf_counter() - started
            else:
                check()
            return self._free.popleft()

    def release(self, slot: int) -> None:
        """Caller holds the condition's lock."""
        self._free.append(slot)
        self._cond.notify_all()

    def reset(self) -> None:
        with self._cond:
            self._free = deque(range(self.count))
            self.waited = 0.0
            self._cond.notify_all()
