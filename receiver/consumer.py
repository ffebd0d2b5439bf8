"""What a rank applies versions into, and how: the same for a live version and a restore."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..frameworks import Framework
from .state import RankState

log = logging.getLogger("weightstream.receiver")

ParamSpecs = Mapping[str, tuple[str, Sequence[int]]]


@dataclass(frozen=True)
class Consumer:
    rank: int
    load: Callable[[Any], Any]  # the user's load_weights (a sink's, or a plain callable)
    sink: Any  # the sink behind it, or None for a plain callable
    framework: Framework  # what the views load_weights gets are
    expected: ParamSpecs | None  # the model's specs given by the user (else the sink's)
    allow_missing: bool
    prefetch: int
    apply_timeout: float
    staged: bool

    def specs(self) -> tuple[Any, bool]:
        """(the specs a manifest is checked against or None, whether the sink gave them)."""
        if self.expected is None and self.sink is not None:
            return self.sink.param_specs(), True
        return self.expected, False

    @property
    def destination(self) -> Callable[[str], Any] | None:
        """The sink's ``destination(name)``: where a tensor's bytes live, for a direct copy."""
        return getattr(self.sink, "destination", None)

    @property
    def direct_copy(self) -> bool:
        return getattr(self.sink, "direct_copy", False) is True

    def unmaterialised(self) -> list[str]:
        check = getattr(self.sink, "unmaterialised", None)
        return list(check()) if callable(check) else []

    def has_hook(self, name: str) -> bool:
        return callable(getattr(self.sink, name, None))

    def run_hook(self, name: str, state: RankState, *args: Any) -> None:
        """The sink's ``name`` hook (on_commit, on_abort), if it has one. Sink hooks never fail a
        version: the model is already fine; record and go on."""
        hook = getattr(self.sink, name, None)
        if not callable(hook):
            return
        try:
            hook(*args)
        except Exception as exc:
            log.warning("rank %d: sink hook %s failed: %s", self.rank, getattr(hook, "__name__", hook), exc)
            state.hook_failed(f"{type(exc).__name__}: {exc}")
