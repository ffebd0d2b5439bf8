"""Sinks: where a receiver puts a version's tensors.

A sink has ``framework`` (which views it wants), ``param_specs()`` (for the manifest
check), ``load_one(name, tensor)``, ``load_weights(iterable)`` (the engine convention,
once per version) and ``destination(name)`` (a writable byte view for in-place chunked
writes, or None). Every sink copies: the views it gets die when the iterator advances.
A sink whose loading of a tensor is exactly a byte copy into ``destination(name)`` sets
``direct_copy = True``: the daemon then copies whole tensors there itself, without
making views or calling ``load_weights`` for them (the ready-made sinks all do; a
wrapper that also records or transforms tensors must not). Such a sink may return the
same ``param_specs()`` object again only while every destination is unchanged: the
daemon then reuses its manifest check and its per-tensor destinations.
Importing this package never imports torch or paddle (the sink modules import their
framework inside methods only).
"""

from __future__ import annotations

from .base import ParamSpecs, Sink, as_sink
from .numpy_sink import NumpySink
from .paddle_sink import PaddleLayerSink
from .router import PrefixRouter
from .torch_sink import TorchModuleSink

__all__ = ["NumpySink", "PaddleLayerSink", "ParamSpecs", "PrefixRouter", "Sink", "TorchModuleSink", "as_sink"]
