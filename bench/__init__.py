"""Throughput benchmarks for weightstream and the peer baselines it is measured against.

From a checkout, ``python -m bench.<name>``; from an install (the wheel ships this package as
``weightstream.bench``), ``weightstream bench <name>``. Either way the benches' modules refer to
each other by relative imports and to their spawned ranks by ``module.__name__``, so both names work.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS_ENV = "WEIGHTSTREAM_BENCH_RESULTS"


def results_dir() -> Path:
    """Where a bench writes its results: ``$WEIGHTSTREAM_BENCH_RESULTS`` if set; else bench/results
    in a checkout (run as ``bench`` or, editable, as ``weightstream.bench``); else ``./bench-results``,
    never into an installed package's directory."""
    chosen = os.environ.get(RESULTS_ENV)
    if chosen:
        return Path(chosen)
    here = Path(__file__).resolve().parent
    in_checkout = (here.parent / "pyproject.toml").is_file() and (here.parent / "weightstream").is_dir()
    return here / "results" if in_checkout else Path.cwd() / "bench-results"
