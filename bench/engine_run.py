"""A rank as engines use weightstream: a plain ``load_weights(iterator)`` that copies each view.

vLLM, SGLang and FastDeploy cannot hand weightstream their parameters' memory: their
``load_weights`` fuses, slices and converts per tensor, so it takes each yielded view and
copies it into its own parameter. ``mode`` picks what the rank runs:

- ``numpy``: ``load_weights`` gets NumPy views and ``np.copyto``s each into the model;
- ``torch``: the same with torch views (``framework="torch"``) and ``Tensor.copy_``;
- ``paddle``: the same with Paddle views and ``Tensor.copy_`` (FastDeploy-style ranks);
- ``direct``: the direct-copy sink (:class:`NumpySink`), for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from weightstream import ReceiverDaemon
from weightstream.receiver.sinks import NumpySink

from .ws_run import serve


def numpy_loader(model: dict[str, np.ndarray]) -> Callable[[Iterable[tuple[str, Any]]], None]:
    def load_weights(weights: Iterable[tuple[str, Any]]) -> None:
        for name, view in weights:
            np.copyto(model[name], view)

    return load_weights


def as_framework(framework: str, arrays: Iterable[tuple[str, np.ndarray]]) -> list[tuple[str, Any]]:
    """Each NumPy array as a ``framework`` tensor over the same memory, in the dtype weightstream yields."""
    from weightstream.frameworks import module
    from weightstream.frameworks import numpy as numpy_frames

    fw = module(framework)  # type: ignore[arg-type]
    return [(name, fw.view(numpy_frames.host_bytes(a), numpy_frames.dtype_of(a), a.shape)) for name, a in arrays]


def tensor_loader(framework: str) -> Callable[[dict[str, np.ndarray]], Callable[[Iterable[tuple[str, Any]]], None]]:
    """A ``load_weights`` that ``copy_``s each view into the model's parameter as a ``framework``
    tensor (torch's and Paddle's ``copy_(src, False)``: a blocking copy in both)."""

    def loader(model: dict[str, np.ndarray]) -> Callable[[Iterable[tuple[str, Any]]], None]:
        params = dict(as_framework(framework, model.items()))

        def load_weights(weights: Iterable[tuple[str, Any]]) -> None:
            for name, view in weights:
                params[name].copy_(view, False)

        return load_weights

    return loader


LOADERS = {"numpy": numpy_loader, "torch": tensor_loader("torch"), "paddle": tensor_loader("paddle")}


def receive(workdir: str, rank: int, model: dict[str, np.ndarray], options: dict[str, Any], versions: int,
            report: Any, ready: Any) -> None:
    mode = options.get("mode", "numpy")
    endpoint = f"ipc://{workdir}/ws/s.sock"
    prefetch = int(options.get("prefetch", 2))
    if mode == "direct":
        daemon = ReceiverDaemon(endpoint, NumpySink(model), rank=rank, prefetch=prefetch)
    else:
        daemon = ReceiverDaemon(endpoint, LOADERS[mode](model), rank=rank, prefetch=prefetch, framework=mode)
    serve(daemon, versions, report, ready)
