"""What a user may pass as ``load_weights``, and how the daemon calls it.

A plain callable taking an iterator of ``(name, tensor)`` (the engine
convention), a sink (it also knows ``param_specs`` and its framework), a bound
``load_weights`` of a sink, or a model (torch ``nn.Module``, Paddle ``Layer``,
dict of NumPy arrays) that gets wrapped in the matching sink.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# detached_copy: a private copy of a slot view in its own framework (staged mode); imported from here by the daemon
from ..frameworks import detached_copy as detached_copy
from ..frameworks import is_model


def resolve_target(target: Any) -> tuple[Callable[[Any], Any], Any]:
    """Return (load_weights callable, sink or None) for what the user passed."""
    if hasattr(target, "param_specs") and hasattr(target, "load_weights"):
        return target.load_weights, target
    if is_model(target):  # modules are callable too: wrap them, never call forward()
        from .sinks import as_sink

        sink = as_sink(target)
        return sink.load_weights, sink
    owner = getattr(target, "__self__", None)
    if callable(target):
        sink = owner if owner is not None and hasattr(owner, "param_specs") and hasattr(owner, "framework") else None
        return target, sink
    from .sinks import as_sink

    sink = as_sink(target)
    return sink.load_weights, sink
