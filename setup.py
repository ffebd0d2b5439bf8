"""Only the optional C accelerator lives here; everything else is in pyproject.toml.

``optional=True``: where no C compiler is available the install still succeeds and
weightstream copies small tensors with its pure-Python loops (slower per tensor, same bytes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("weightstream._speedups", ["weightstream/_speedups.c"], optional=True, extra_compile_args=["-O2"]),
        # Linux only (futexes, MAP_FIXED): elsewhere slots are plain and it is not needed
        Extension("weightstream._ring", ["weightstream/_ring.c"], optional=True, extra_compile_args=["-O2"]),
    ]
)
