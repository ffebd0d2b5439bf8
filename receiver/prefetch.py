"""A bounded bridge from the daemon's event loop to the thread running load_weights.

The loop side ``await put()``s prepared buckets, at most ``depth`` ahead of the
consumer; the consumer thread blocks in ``get(timeout)``. ``abort`` wakes the
consumer at once, whatever the depth, so a dead sender never strands it.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

from ..protocol.errors import ConfigError, PeerTimeout, WeightstreamError


class _Abort:
    def __init__(self, error: WeightstreamError) -> None:
        self.error = error


class PrefetchQueue:
    def __init__(self, depth: int, loop: asyncio.AbstractEventLoop) -> None:
        if depth < 1:
            raise ConfigError(f"prefetch depth must be >= 1, got {depth}")
        self._loop = loop
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._space = asyncio.Semaphore(depth)
        self._error: WeightstreamError | None = None

    async def put(self, item: Any) -> None:
        await self._space.acquire()
        self._items.put(item)

    def abort(self, error: WeightstreamError) -> None:
        self._error = error
        self._items.put(_Abort(error))

    def check(self) -> None:
        """Consumer side, between the waits of a long copy: raise the abort error, if any."""
        if self._error is not None:
            raise self._error

    def get(self, timeout: float) -> Any:
        """Consumer side (any thread): next item, or raise the abort error / PeerTimeout."""
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            raise PeerTimeout(
                f"no bucket arrived within {timeout:.1f}s; the sender stalled. Raise apply_timeout= if that is expected"
            ) from None
        if isinstance(item, _Abort):
            self._items.put(item)  # stay aborted for any later get
            raise item.error
        self._loop.call_soon_threadsafe(self._space.release)
        return item
