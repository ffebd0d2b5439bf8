"""What a sink is, and the helpers every sink shares."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...frameworks import Framework
from ...frameworks import paddle as paddle_fw
from ...frameworks import torch as torch_fw
from ...protocol.errors import ConfigError, ManifestMismatch

#: name -> (canonical dtype name from protocol.dtypes.DTYPES, shape)
ParamSpecs = dict[str, tuple[str, tuple[int, ...]]]


@runtime_checkable
class Sink(Protocol):
    """Receives one version's tensors. Views are only valid during the call that gets
    them, so a sink copies and never keeps a view."""

    framework: Framework

    def param_specs(self) -> ParamSpecs: ...

    def load_one(self, name: str, tensor: Any) -> None: ...

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None: ...

    def destination(self, name: str) -> np.ndarray | None: ...


_dtype, _shape = attrgetter("dtype"), attrgetter("shape")


class SpecsCache:
    """A framework sink's specs, made again only when a tensor moved or changed.

    ``get`` returns the same dict object while names, where each tensor's memory is,
    dtypes and shapes are all unchanged, so the daemon keeps its manifest check and
    its direct-copy destinations. Compared with C-level maps: at 100k params,
    rebuilding costs more than moving the bytes.
    """

    def __init__(self) -> None:
        self._key: tuple[list[Any], ...] | None = None
        self._specs: ParamSpecs = {}

    def get(self, names: list[str], tensors: list[Any], data_ptr: Callable[[Any], int], make: Callable[[], ParamSpecs]) -> ParamSpecs:
        key = (names, list(map(data_ptr, tensors)), list(map(_dtype, tensors)), list(map(_shape, tensors)))
        if self._key is None or self._key != key:
            self._specs, self._key = make(), key
        return self._specs


def unknown_name(name: str, known: Iterable[str], what: str) -> ManifestMismatch:
    """ManifestMismatch for a tensor name the model does not have, with near misses."""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ManifestMismatch(
        f"tensor {name!r}: expected a name of {what}, got one it does not have{hint}; "
        "fix: rename on the sender side or route it with PrefixRouter"
    )


def spec_mismatch(name: str, want: tuple[str, tuple[int, ...]], got: tuple[str, tuple[int, ...]]) -> ManifestMismatch:
    return ManifestMismatch(
        f"tensor {name!r}: expected {want[0]}{list(want[1])}, got {got[0]}{list(got[1])}; "
        "fix: send the tensor in the model's dtype and shape (cast/reshape on the sender side)"
    )


NameGroups = tuple[dict[str, Any], frozenset[str], frozenset[str]]
NO_GROUPS: NameGroups = ({}, frozenset(), frozenset())


def name_groups_of(sink: Any) -> NameGroups:
    """A sink's (tied, optional, unmaterialised) names for the manifest check; none for a sink
    that does not say (see TorchModuleSink.name_groups)."""
    groups = getattr(sink, "name_groups", None)
    if not callable(groups):
        return NO_GROUPS
    found: NameGroups = groups()
    return found


def check_tied(first: str, second: str, equal: bool) -> None:
    """``second`` is the same tensor as ``first`` in the model; it was sent apart: one write is
    enough when the values agree, and different values cannot both be served."""
    if not equal:
        raise ManifestMismatch(
            f"tensors {first!r} and {second!r} are one tensor in this model (tied weights) but were sent with "
            "different values; fix: tie them in the trainer too (send one, or the same tensor under both names), "
            "or untie them in the inference model"
        )


def as_sink(obj: Any) -> Any:
    """``obj`` if it already is a sink, else the ready-made adapter for it.

    A sink has ``load_weights``, ``param_specs`` and ``framework``. torch modules get
    :class:`TorchModuleSink`, paddle layers :class:`PaddleLayerSink`, dicts
    :class:`NumpySink`. torch/paddle are only looked at if already imported (an
    object of theirs cannot exist otherwise).
    """
    if all(hasattr(obj, a) for a in ("load_weights", "param_specs", "framework")):
        return obj
    if torch_fw.is_model(obj):
        from .torch_sink import TorchModuleSink

        return TorchModuleSink(obj)
    if paddle_fw.is_model(obj):
        from .paddle_sink import PaddleLayerSink

        return PaddleLayerSink(obj)
    if isinstance(obj, dict):
        from .numpy_sink import NumpySink

        return NumpySink(obj)
    raise ConfigError(
        f"sink: expected a torch.nn.Module, paddle.nn.Layer, dict of numpy arrays or an object with "
        f"load_weights/param_specs/framework, got {type(obj).__qualname__}; "
        "fix: pass one of those, or a plain load_weights callable to ReceiverDaemon"
    )
