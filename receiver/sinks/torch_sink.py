"""A sink that loads into a torch ``nn.Module`` by state-dict name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ...frameworks import Framework
from ...frameworks import torch as torch_fw
from ...gc_pause import gc_paused
from ...protocol.errors import ConfigError, WeightstreamError
from .base import ParamSpecs, SpecsCache, check_tied, spec_mismatch, unknown_name

if TYPE_CHECKING:
    import torch

# (owning module's _parameters or _buffers dict, key in it)
_Slot = tuple[dict[str, Any], str]


class TorchModuleSink:
    """Loads tensors into ``module`` by ``state_dict`` name: parameters and buffers, non-persistent
    ones (rotary ``inv_freq``) included. A push need not fill a buffer the module already has;
    a tensor still on the ``meta`` device must be pushed.

    Tied weights (one tensor under two names, ``lm_head.weight`` and ``embed_tokens.weight``)
    are filled by either name. Sent under both names with different values, the version fails
    naming both.

    Materialised tensors are overwritten in place (``copy_`` under ``no_grad``), so
    their identity, device and storage stay. A tensor on the ``meta`` device has no
    storage: it is replaced by a clone of the received data (on the device the data
    arrives on, same ``requires_grad``, a ``Parameter`` for parameters, with the old
    parameter's attributes such as ``weight_loader`` carried over), everywhere the
    module references it (tied weights included).
    """

    framework: Framework = "torch"
    direct_copy = True  # loading a tensor = copying its bytes into destination(name)

    def __init__(self, module: torch.nn.Module) -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise ConfigError(
                f"TorchModuleSink: expected a torch.nn.Module, got {type(module).__qualname__}; fix: pass the model"
            )
        self.module = module
        # name -> tensor from the state_dict walk param_specs() does at every BEGIN, so it is
        # fresh per version; a miss or a meta entry falls back to the exact lookup.
        self._by_name: dict[str, Any] = {}
        # id(meta tensor) -> (tensor, slots referencing it); built when first needed.
        self._meta_index: dict[int, tuple[Any, list[_Slot]]] | None = None
        self._specs = SpecsCache()
        # non-persistent buffers are not in state_dict; their names, found once (the module's
        # structure does not change, only its tensors)
        persistent = module.state_dict(keep_vars=True)
        self._extra_buffers = [name for name, _ in module.named_buffers(remove_duplicate=False) if name not in persistent]
        self._maybe_meta = True  # until a walk finds no meta tensor

    def param_specs(self) -> ParamSpecs:
        """The module's specs: the same object while no tensor moved (``.data = ...`` moves one)."""
        import torch

        with gc_paused():  # 100k params: the walk's small objects would trigger collections of the whole heap
            state = self.module.state_dict(keep_vars=True)
            if set(map(type, state.values())) <= {torch.Tensor, torch.nn.Parameter}:
                tensors = state
            else:  # skip extra-state payloads; isinstance is slower, so only here
                tensors = {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}
            for name in self._extra_buffers:
                found = self._slot(name)
                if found is not None:
                    tensors[name] = found[0][found[1]]
            self._by_name = tensors
            return self._specs.get(
                list(tensors), list(tensors.values()), torch.Tensor.data_ptr,
                lambda: {name: (torch_fw.dtype_of(t).name, tuple(t.shape)) for name, t in tensors.items()},
            )

    def _slot(self, name: str) -> _Slot | None:
        """Where ``name`` lives, found by walking the module path (O(depth), no state_dict)."""
        prefix, _, key = name.rpartition(".")
        try:
            owner = self.module.get_submodule(prefix) if prefix else self.module
        except AttributeError:
            return None
        if owner._parameters.get(key) is not None:
            return owner._parameters, key
        if owner._buffers.get(key) is not None:
            return owner._buffers, key
        return None

    def _target(self, name: str) -> tuple[Any, _Slot | None]:
        slot = self._slot(name)
        if slot is not None:
            return slot[0][slot[1]], slot
        # Slow path for modules whose state_dict names differ from attribute paths.
        state = self.module.state_dict(keep_vars=True)
        found = state.get(name)
        if found is None:
            raise unknown_name(name, state, f"the {type(self.module).__name__} module's state_dict")
        return found, None

    def load_one(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        target = self._by_name.get(name)
        if target is None or target.is_meta:
            target, slot = self._target(name)
        else:
            slot = None
        if target.dtype != tensor.dtype or tuple(target.shape) != tuple(tensor.shape):
            want = (torch_fw.dtype_of(target).name, tuple(target.shape))
            raise spec_mismatch(name, want, (torch_fw.dtype_of(tensor).name, tuple(tensor.shape)))
        if target.is_meta:
            if slot is None:
                raise WeightstreamError(
                    f"tensor {name!r}: expected a materialised tensor or one reachable by attribute path, "
                    "got a meta tensor only its state_dict hooks know; fix: materialise it (module.to_empty) first"
                )
            self._materialise(target, tensor)
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                target.copy_(tensor)  # blocking: the view dies when the iterator advances
        else:
            target.copy_(tensor)

    def _materialise(self, old: torch.Tensor, tensor: torch.Tensor) -> None:
        import torch

        data = tensor.detach().clone()  # own memory: the view is only valid for this call
        if isinstance(old, torch.nn.Parameter):
            new: torch.Tensor = torch.nn.Parameter(data, requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)  # e.g. vLLM's weight_loader attribute
        else:
            new = data.requires_grad_(old.requires_grad)
        index = self._meta_index
        entry = index.get(id(old)) if index is not None else None
        if index is None or entry is None or entry[0] is not old:
            index = self._meta_index = self._build_meta_index()
            entry = index.get(id(old), (old, []))
        for table, key in entry[1]:
            if table.get(key) is old:
                table[key] = new
        index.pop(id(old), None)

    def _build_meta_index(self) -> dict[int, tuple[Any, list[_Slot]]]:
        index: dict[int, tuple[Any, list[_Slot]]] = {}
        for mod in self.module.modules():
            for table in (mod._parameters, mod._buffers):
                for key, t in table.items():
                    if t is not None and t.is_meta:
                        index.setdefault(id(t), (t, []))[1].append((table, key))
        return index

    def name_groups(self) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
        """(tied, optional, unmaterialised) for the manifest check, from the last ``param_specs``:
        names sharing one tensor mapped to a common key; buffers the module already holds (a
        push need not fill them); names still on the meta device (a push must fill them)."""
        tensors = self._by_name
        groups: dict[Any, list[str]] = {}
        for name, t in tensors.items():
            groups.setdefault(_memory_key(t), []).append(name)
        tied = {name: key for key, names in groups.items() if len(names) > 1 for name in names}
        meta = frozenset(name for name, t in tensors.items() if t.is_meta)
        optional = frozenset(name for name in self._extra_buffers if name in tensors and name not in meta)
        return tied, optional, meta

    def unmaterialised(self) -> list[str]:
        """Parameters and buffers still on the meta device: the model cannot run yet. A tensor never
        goes back to meta, so once none is left this costs nothing."""
        if not self._maybe_meta:
            return []
        found = [name for name, t in self._all_tensors() if t.is_meta]
        self._maybe_meta = bool(found)
        return found

    def _all_tensors(self) -> Iterable[tuple[str, Any]]:
        yield from self.module.named_parameters(remove_duplicate=False)
        yield from self.module.named_buffers(remove_duplicate=False)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        import torch

        written: dict[Any, str] = {}  # memory written in this version -> the name that wrote it
        with torch.no_grad():  # once per version, not once per tensor
            for name, tensor in weights:
                target = self._by_name.get(name)
                if target is not None and not target.is_meta:
                    key = _memory_key(target)
                    first = written.setdefault(key, name)
                    if first != name:  # tied here: the same tensor under a second name
                        check_tied(first, name, torch.equal(target, tensor.to(target.device)))
                        continue
                self.load_one(name, tensor)

    def destination(self, name: str) -> np.ndarray | None:
        try:
            target, _ = self._target(name)
        except WeightstreamError:
            return None
        return None if target.is_meta else torch_fw.bytes_view(target)


def _memory_key(t: Any) -> Any:
    """Tensors with one key are one tensor: the same object, or the same memory, dtype, shape and strides."""
    key = torch_fw.memory_key(t)
    return id(t) if key is None else key  # meta or empty: only the object itself
