"""Pure manifest check: does a version's manifest match the model? No I/O."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ..protocol.dtypes import DTYPES, by_name
from ..protocol.errors import ConfigError, ManifestMismatch

ParamSpecs = Mapping[str, tuple[str, Sequence[int]]]

MAX_LISTED = 5
_DTYPE_NAMES = tuple(d.name for d in DTYPES)


def check_manifest(
    names: Sequence[str],
    dtype_codes: Sequence[int],
    shapes: Sequence[Sequence[int]],
    expected: ParamSpecs,
    *,
    allow_missing: bool = False,
    tied: Mapping[str, Hashable] | None = None,
    optional: Collection[str] = (),
    unmaterialised: Collection[str] = (),
) -> None:
    """Raise :class:`ManifestMismatch` listing the first offenders of each kind.

    ``tied``: the model's names that share one tensor, each mapped to its group's key; a name not
    sent is filled when another of its group is. ``optional``: names a push need not fill (a
    model's own buffers, say). ``unmaterialised``: names on the meta device, named apart when
    missing (the model cannot run without them)."""
    unexpected: list[str] = []
    wrong: list[str] = []
    matched = 0
    dtype_names = _DTYPE_NAMES
    for name, code, shape in zip(names, dtype_codes, shapes):
        spec = expected.get(name)
        if spec is None:
            unexpected.append(name)
            continue
        matched += 1
        if spec[0] == dtype_names[code] and tuple(spec[1]) == tuple(shape):
            continue  # the common case: no per-entry lookups beyond this
        want_dtype, want_shape = by_name(spec[0]), tuple(int(d) for d in spec[1])
        if want_dtype.code != code or want_shape != tuple(shape):
            wrong.append(f"{name}: expected {want_dtype.name}{list(want_shape)}, got {DTYPES[code].name}{list(shape)}")
    missing: list[str] = []
    if not allow_missing and matched != len(expected):  # manifest names are unique, so counts suffice
        sent = set(names)
        missing = [n for n in expected if n not in sent]
        if tied and missing:  # filled through another name of the same tensor
            filled = {tied[n] for n in sent if n in tied}
            missing = [n for n in missing if n not in tied or tied[n] not in filled]
        if optional and missing:
            missing = [n for n in missing if n not in optional]
    if not (unexpected or wrong or missing):
        return
    parts = []
    if missing:
        on_meta = [n for n in missing if n in unmaterialised]
        hint = "" if len(on_meta) == len(missing) else (
            " (a trainer with tied weights lists each once in torch's named_parameters(): push "
            "named_parameters(remove_duplicate=False) or state_dict() to send every name)"
        )
        parts.append(f"{len(missing)} missing (in the model, not sent): {_first(missing)}{hint}")
        if on_meta:
            parts.append(
                f"{len(on_meta)} of them still on the meta device, so the model cannot run without them: "
                f"{_first(on_meta)} (push them too, e.g. the trainer's named_buffers() beside named_parameters(), "
                "or build the model with only its parameters on the meta device)"
            )
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (sent, not in the model): {_first(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} with wrong dtype/shape: {_first(wrong)}")
    raise ManifestMismatch(
        "manifest does not match the model; " + "; ".join(parts)
        + ". Fix the trainer's names/dtypes/shapes (or the model config); the model was not touched"
    )


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", … (+{len(items) - MAX_LISTED})" if len(items) > MAX_LISTED else "")


def check_specs(specs: Any, where: str) -> None:
    """Refuse malformed ``{name: (dtype name, shape)}`` specs where they are given (``where``:
    the argument), naming the tensor, instead of at the first push from inside the rank."""
    if not isinstance(specs, Mapping):
        raise ConfigError(f"{where}: expected a mapping {{name: (dtype, shape)}}, got {type(specs).__qualname__}")
    for name, spec in specs.items():
        fix = f"fix: e.g. {where}{{{name!r}: ('float32', (4096, 4096))}} (dtype names: 'float32', 'bfloat16', ...)"
        if not isinstance(name, str):
            raise ConfigError(f"{where}: expected tensor names as str, got {name!r}; {fix}")
        if not isinstance(spec, (tuple, list)) or len(spec) != 2:
            raise ConfigError(f"{where}: tensor {name!r}: expected a (dtype, shape) pair, got {spec!r}; {fix}")
        dtype, shape = spec
        if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
            raise ConfigError(
                f"{where}: tensor {name!r}: expected a dtype name (one of {', '.join(_DTYPE_NAMES)}), got {dtype!r}; {fix}"
            )
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ConfigError(f"{where}: tensor {name!r}: expected a shape as a sequence of ints >= 0, got {shape!r}; {fix}")
