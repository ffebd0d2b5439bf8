"""Only the optional C modules live here; everything else is in pyproject.toml.

``optional=True``: where no C compiler is available the install still succeeds and
weightstream copies small tensors with its pure-Python loops (slower per tensor, same bytes).
"""

from setuptools import Extension, setup

NATIVE = "weightstream/native"


def native(name: str) -> Extension:
    """``weightstream.native.<name>`` from ``weightstream/native/<name>.c``, skipped where it does not build."""
    return Extension(
        f"weightstream.native.{name}",
        [f"{NATIVE}/{name}.c"],
        depends=[f"{NATIVE}/_shared.h"],
        optional=True,
        extra_compile_args=["-O2"],
    )


setup(
    ext_modules=[
        native("_spans"),  # gather, scatter, copy, destinations: the per-tensor copy loops
        native("_layout"),  # unchanged_arrays, same_items, dict_version: "same as last time?"
        native("_ring"),  # the futex ring; Linux only (futexes, MAP_FIXED): elsewhere slots stay plain
    ]
)
