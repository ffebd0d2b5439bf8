"""The bench's two-copy ceiling runs for any model size, not only whole 256 MiB pieces."""

from __future__ import annotations

import pytest

from bench import pipeline_limit

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("nbytes", [(3 << 20) + 1000, (70 << 20) + 1000])
def test_pipeline_limit_measures_and_verifies(nbytes: int) -> None:
    """70 MiB: a model below one piece whose 4 pieces' total is above it (the copiers once
    sized their pieces from that total and failed on the slot)."""
    times, ok = pipeline_limit.measure(nbytes, repeats=1)
    assert ok and len(times) == 1 and times[0] > 0
