"""The tests' frame transport with a bug on the rank's side: reading a slot raises a plain
RuntimeError, as a third-party transport's defect would (not a WeightstreamError)."""

from __future__ import annotations

from typing import Any

import numpy as np
from frame_transport import FrameImportedSlot, FrameTransport

from weightstream.protocol.transports import register

NAME = "buggy-frames"


class BuggyImportedSlot(FrameImportedSlot):
    def raw(self, offset: int, nbytes: int) -> np.ndarray:
        raise RuntimeError("a defect in this transport's raw()")


class BuggyTransport(FrameTransport):
    name = NAME

    def open_slot(
        self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False
    ) -> BuggyImportedSlot:
        return BuggyImportedSlot(descriptor)


TRANSPORT = BuggyTransport()

register(NAME, __name__)
