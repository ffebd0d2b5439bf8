"""The packages and the optional C modules; everything else is in pyproject.toml.

Packages are found, not listed: every directory with an ``__init__.py`` under a root of
``PACKAGE_DIRS`` is a package, named by its path below that root, so a new subpackage (a new
``protocol/transports/tcp/``) cannot be left out of the wheel; ``EXCLUDED`` names the few that
stay out on purpose.

The C modules are ``optional``: where no C compiler is available the install still succeeds
and weightstream runs its pure-Python loops (slower per tensor, same bytes) and plain slots.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

# Import name -> directory. sender/, receiver/ and protocol/ sit beside weightstream/ in the
# checkout and install as its subpackages (the design brief's layout: docs/design.md); so does
# bench/, so that an installed ``weightstream bench`` can run the benches.
PACKAGE_DIRS = {
    "weightstream": "weightstream",
    "weightstream.protocol": "protocol",
    "weightstream.sender": "sender",
    "weightstream.receiver": "receiver",
    "weightstream.bench": "bench",
}

# Packages of the tree left out of the wheel, with everything below them, and why.
EXCLUDED = {
    "weightstream.bench.micro": "bench/micro holds pytest-benchmark files: tests, run from a checkout",
}

NATIVE = "weightstream/native"


def find_packages(root: str = os.path.dirname(os.path.abspath(__file__))) -> list[str]:
    """Every package under ``PACKAGE_DIRS`` but ``EXCLUDED``, sorted. Symlinked directories are not
    walked: ``weightstream/protocol`` and its siblings are links that let mypy see the installed
    layout (pyproject's ``[tool.mypy]``); their code is found, once, under its own root."""
    found = []
    for name, directory in PACKAGE_DIRS.items():
        top = os.path.join(root, directory)
        for path, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(path, d)) and d != "__pycache__"]
            below = os.path.relpath(path, top)
            package = name if below == "." else ".".join([name, *below.split(os.sep)])
            if package in EXCLUDED:
                dirs[:] = []  # nor anything below it
                continue
            if "__init__.py" in files:
                found.append(package)
    return sorted(found)


def native(name: str) -> Extension:
    """``weightstream.native.<name>`` from ``weightstream/native/<name>.c``, skipped where it does not build."""
    return Extension(
        f"weightstream.native.{name}",
        [f"{NATIVE}/{name}.c"],
        depends=[f"{NATIVE}/_shared.h"],
        optional=True,
        extra_compile_args=["-O2"],
    )


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for find_packages
    setup(
        packages=find_packages(),
        package_dir=PACKAGE_DIRS,
        ext_modules=[
            native("_spans"),  # gather, scatter, copy, destinations: the per-tensor copy loops
            native("_layout"),  # unchanged_arrays, same_items, dict_version: "same as last time?"
            native("_ring"),  # the futex ring; Linux only (futexes, MAP_FIXED): elsewhere slots stay plain
        ],
    )
