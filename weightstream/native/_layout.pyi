"""weightstream.native._layout (_layout.c): "the same layout as last time?" in one pass. Positional arguments only."""

from collections.abc import Iterator
from typing import Any

def unchanged_arrays(
    items: list[Any],
    ndarray: type,
    code_of: dict[Any, int],
    names: list[str],
    codes: list[int],
    shapes: list[tuple[int, ...]],
    tensor_types: tuple[type, ...] = ...,
    /,
) -> tuple[Any, ...] | None: ...
def same_items(mapping: dict[Any, Any], keys: list[Any], values: list[Any], /) -> bool: ...
def dict_version(mapping: dict[Any, Any], /) -> int | None: ...
def kept_views(rows: Any, kept: list[Any], /) -> Iterator[Any] | None: ...
