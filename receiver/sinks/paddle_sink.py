"""A sink that loads into a paddle ``nn.Layer`` by state-dict name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...frameworks import Framework
from ...frameworks import paddle as paddle_fw
from ...gc_pause import gc_paused
from ...protocol.errors import ConfigError, WeightstreamError
from .base import ParamSpecs, SpecsCache, spec_mismatch, unknown_name

if TYPE_CHECKING:
    import paddle


class PaddleLayerSink:
    """Loads tensors into ``layer`` by ``state_dict`` name (parameters and persistable buffers).

    Initialised tensors are overwritten in place with ``Tensor.copy_(src, True)``: same
    object, same data pointer, ``stop_gradient`` kept. A parameter that has no data yet
    (``_is_initialized()`` False, e.g. built under ``paddle.LazyGuard()``) is filled with
    ``Tensor.set_value(src)``, which allocates it once and copies the received data in,
    without running its initializer; the parameter object stays the same. It lands on
    ``paddle.get_device()``, where its initializer would have put it (host views are
    moved there first: one extra device copy, only for uninitialised parameters).
    """

    framework: Framework = "paddle"
    direct_copy = True  # loading a tensor = copying its bytes into destination(name)

    def __init__(self, layer: paddle.nn.Layer) -> None:
        import paddle

        if not isinstance(layer, paddle.nn.Layer):
            raise ConfigError(
                f"PaddleLayerSink: expected a paddle.nn.Layer, got {type(layer).__qualname__}; fix: pass the model"
            )
        self.layer = layer
        self._specs = SpecsCache()

    def param_specs(self) -> ParamSpecs:
        """The layer's specs: the same object while no tensor moved (a new parameter moves one)."""
        with gc_paused():  # as for torch: a big layer's walk would otherwise trigger full collections
            state = self.layer.state_dict()
            return self._specs.get(
                list(state), list(state.values()), _data_ptr,
                lambda: {name: (paddle_fw.dtype_of(t).name, paddle_fw.shape_of(t)) for name, t in state.items()},
            )

    def _target(self, name: str) -> Any:
        # Walk the structured name through _sub_layers (O(depth)); fall back to state_dict().
        *path, key = name.split(".")
        owner: Any = self.layer  # a sublayer, or None where the path leaves the tree
        for part in path:
            owner = owner._sub_layers.get(part)
            if owner is None:
                break
        if owner is not None:
            found = owner._parameters.get(key)
            if found is None and key not in owner._non_persistable_buffer_names_set:
                found = owner._buffers.get(key)
            if found is not None:
                return found
        state = self.layer.state_dict()
        found = state.get(name)
        if found is None:
            raise unknown_name(name, state, f"the {type(self.layer).__name__} layer's state_dict")
        return found

    def load_one(self, name: str, tensor: paddle.Tensor) -> None:
        import paddle

        target = self._target(name)
        if target.dtype != tensor.dtype or list(target.shape) != list(tensor.shape):
            want = (paddle_fw.dtype_of(target).name, paddle_fw.shape_of(target))
            raise spec_mismatch(name, want, (paddle_fw.dtype_of(tensor).name, paddle_fw.shape_of(tensor)))
        if not paddle_fw.is_materialised(target):
            # Put it where LazyGuard's initialize() would have (e.g. gpu:0 while views come
            # from host shm); set_value then allocates it on the source's place and copies.
            device = paddle.get_device()
            src = tensor if paddle_fw.device_of(tensor) == device else tensor.to(device)
            target.set_value(src)  # a copy: never aliases the bucket view
            return
        with paddle.no_grad():
            target.copy_(tensor, True)  # blocking: the view dies when the iterator advances

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        for name, tensor in weights:
            self.load_one(name, tensor)

    def destination(self, name: str) -> np.ndarray | None:
        try:
            target = self._target(name)
        except WeightstreamError:
            return None
        return paddle_fw.bytes_view(target)



def _data_ptr(t: Any) -> int:
    """Where a tensor's memory is; 0 for one not allocated yet (LazyGuard)."""
    return paddle_fw.data_ptr(t) if paddle_fw.is_materialised(t) else 0
