"""Packaging from a checkout: setup's package list holds every package directory of the tree (a
new subpackage cannot be left out of the wheel), every module imports, each C module has its
stub and the stub says what the C module takes, and without the C modules weightstream still
imports and takes its pure-Python paths. Building, installing and importing the wheel itself is
.ci/run's job (it takes longer than a unit test should)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from weightstream import native

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = ROOT / "weightstream" / "native"
# DESIGN.md's layout: sender/, receiver/ and protocol/ install as subpackages of weightstream
LAYOUT = {
    "weightstream": "weightstream",
    "weightstream.protocol": "protocol",
    "weightstream.sender": "sender",
    "weightstream.receiver": "receiver",
}
# Modules that need an optional dependency to import, and the module that brings it
NEEDS = {
    "weightstream.protocol.transports.cuda_ipc.slots": "cuda.bindings",
    "weightstream.protocol.transports.nccl": "cuda.bindings",  # and torch, imported when a group is made
}


@pytest.fixture(scope="module")
def dist() -> Any:
    """The distribution as setuptools configures it from setup.py and pyproject.toml."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a checkout: no setup.py beside tests/")
    import setuptools  # noqa: F401  (first: its distutils, not the standard library's)

    run_setup = importlib.import_module("distutils.core").run_setup

    cwd = os.getcwd()
    os.chdir(ROOT)  # setup.py's paths are relative to the project root
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools' deprecation notices are not this test's subject
            return run_setup("setup.py", stop_after="config")
    finally:
        os.chdir(cwd)


def package_directories() -> dict[str, Path]:
    """Every directory with an ``__init__.py`` under a root of the layout, by import name."""
    found = {}
    for name, directory in LAYOUT.items():
        top = ROOT / directory
        for init in top.rglob("__init__.py"):  # rglob does not enter symlinked directories
            if "__pycache__" in init.parts or init.parent.is_symlink():
                continue
            below = init.parent.relative_to(top).parts
            found[".".join((name, *below))] = init.parent
    return found


def test_setup_maps_the_layout_of_the_design(dist: Any) -> None:
    assert dist.package_dir == LAYOUT


def test_every_package_directory_is_in_setups_package_list(dist: Any) -> None:
    tree = package_directories()
    assert {"weightstream.protocol.transports.shm", "weightstream.native"} <= set(tree), tree
    missing = sorted(set(tree) - set(dist.packages))
    assert not missing, f"packages in the tree but not in setup's list (the wheel would leave them out): {missing}"
    extra = sorted(set(dist.packages) - set(tree))
    assert not extra, f"packages in setup's list with no directory in the tree: {extra}"
    assert len(dist.packages) == len(set(dist.packages)), f"a package listed twice: {dist.packages}"


def test_the_mypy_links_point_at_their_package_roots() -> None:
    """weightstream/protocol etc. let mypy see the installed names; packaging must skip them."""
    for name, directory in LAYOUT.items():
        if name == "weightstream":
            continue
        link = ROOT / "weightstream" / name.rpartition(".")[2]
        assert link.is_symlink(), f"{link}: expected a symlink to ../{directory} (pyproject's [tool.mypy])"
        target = link.resolve()
        assert target == (ROOT / directory).resolve(), f"{link} points at {target}, expected {directory}/"


def test_every_c_module_has_a_stub_and_an_extension(dist: Any) -> None:
    sources = {p.stem for p in NATIVE_DIR.glob("_*.c")}
    stubs = {p.stem for p in NATIVE_DIR.glob("_*.pyi")}
    assert sources, f"expected the C sources in {NATIVE_DIR}"
    assert sources == stubs, f"C modules {sorted(sources)}, stubs {sorted(stubs)}: expected one .pyi per .c"
    assert {e.name for e in dist.ext_modules} == {f"weightstream.native.{s}" for s in sources}
    assert all(e.optional for e in dist.ext_modules), "a C module that is not optional fails installs with no compiler"
    assert "*.pyi" in dist.package_data.get("weightstream.native", []), "the stubs must ship in the wheel"
    assert "py.typed" in dist.package_data.get("weightstream", [])
    assert (ROOT / "weightstream" / "py.typed").is_file()


def test_every_module_imports() -> None:
    """In a fresh interpreter, every module of every package of the tree, as pkgutil lists each
    package's modules (entry scripts, ``__main__``, excepted): a module that imports only after
    some other, or not at all, fails. Package by package: an editable install maps protocol/
    etc. into the package, where a walk from ``weightstream`` alone cannot see them."""
    script = r"""
import importlib, json, pkgutil, sys
names, failed = [], {}
for package in json.loads(sys.argv[1]):
    names.append(package)
    found = pkgutil.iter_modules(importlib.import_module(package).__path__, package + ".")
    names += [m.name for m in found if not m.ispkg and m.name.rpartition(".")[2] != "__main__"]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"names": names, "failed": failed}))
"""
    packages = sorted(package_directories())
    done = subprocess.run([sys.executable, "-c", script, json.dumps(packages)], capture_output=True, text=True,
                          timeout=50, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    names, failed = report["names"], report["failed"]
    want = {".".join((pkg, p.stem)) for pkg, where in package_directories().items() for p in where.glob("*.py")}
    assert want - {f"{pkg}.__init__" for pkg in packages} - {"weightstream.__main__"} <= set(names), names
    if native.BUILT:  # extension modules are listed as well
        assert {f"weightstream.native.{p.stem}" for p in NATIVE_DIR.glob("_*.c")} <= set(names), names
    for name, needed in NEEDS.items():
        if name in failed and importlib.util.find_spec(needed.partition(".")[0]) is None:
            assert "ImportError" in failed.pop(name), f"{name} failed for another reason than {needed} missing"
    assert not failed, f"modules that do not import: {failed}"


# --- the stubs against the C modules ------------------------------------------------

def _doc_signature(doc: str | None, name: str) -> tuple[list[str], list[str], str | None] | None:
    """``name(a, b[, c[, d]]) -> ret`` on the first line of a C docstring: (required, optional, ret)."""
    match = re.match(rf"{re.escape(name)}\(([^)]*)\)(?:\s*->\s*([\w |]+))?", (doc or "").splitlines()[0] if doc else "")
    if match is None:
        return None
    head, _, tail = match.group(1).partition("[")
    return _words(head), _words(tail), (match.group(2) or "").strip() or None


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,\[\]]+", text) if w]


def _stub_parameters(node: ast.FunctionDef, method: bool) -> tuple[list[str], list[str]]:
    params = [a.arg for a in (*node.args.posonlyargs, *node.args.args)][1 if method else 0:]
    optional = len(node.args.defaults)
    return params[: len(params) - optional], params[len(params) - optional:]


def _bare(annotation: str) -> str:
    """``tuple[Any, ...] | None`` -> ``tuple | None``: the C docstrings name types without parameters."""
    while (stripped := re.sub(r"\[[^\[\]]*\]", "", annotation)) != annotation:
        annotation = stripped
    return annotation


def _c_module(stem: str) -> ModuleType:
    try:
        return importlib.import_module(f"weightstream.native.{stem}")
    except ImportError:
        pytest.skip(f"weightstream.native.{stem} is not built")


@pytest.mark.parametrize("stem", sorted(p.stem for p in NATIVE_DIR.glob("_*.pyi")))
def test_each_stub_says_what_its_c_module_takes(stem: str) -> None:
    module = _c_module(stem)
    tree = ast.parse((NATIVE_DIR / f"{stem}.pyi").read_text())
    declared = {
        node.name if not isinstance(node, ast.AnnAssign) else ast.unparse(node.target): node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AnnAssign))
    }
    public = {name for name in declared if not name.startswith("_")}
    assert public == {name for name in dir(module) if not name.startswith("_")}, f"{stem}.pyi and the C module differ"
    for name in sorted(public):
        node, runtime = declared[name], getattr(module, name)
        if isinstance(node, ast.FunctionDef):
            doc = _doc_signature(runtime.__doc__, name)
            assert doc is not None, f"{stem}.{name}: its C docstring starts with no signature"
            assert _stub_parameters(node, method=False) == doc[:2], f"{stem}.{name}: the stub's parameters"
            assert node.returns is not None and _bare(ast.unparse(node.returns)) == doc[2], f"{stem}.{name}: return"
        elif isinstance(node, ast.ClassDef):
            _check_class(stem, node, runtime)
        else:
            assert type(runtime).__name__ == ast.unparse(node.annotation), f"{stem}.{name}"


def _check_class(stem: str, node: ast.ClassDef, cls: type) -> None:
    methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
    public = {n for n in methods if not n.startswith("_")}
    assert public == {n for n in vars(cls) if not n.startswith("_")}, f"{stem}.{cls.__name__}: stub and C type differ"
    init = _doc_signature(cls.__doc__, cls.__name__)
    assert init is not None and _stub_parameters(methods["__init__"], method=True) == init[:2], f"{cls.__name__}()"
    blank = cls.__new__(cls)  # never initialised: only the argument checks run
    for name in sorted(public):
        stub, runtime = methods[name], inspect.getattr_static(cls, name)
        if any(ast.unparse(d) == "property" for d in stub.decorator_list):
            assert type(runtime).__name__ == "getset_descriptor", f"{cls.__name__}.{name}: expected a property"
            continue
        params = _stub_parameters(stub, method=True)
        doc = _doc_signature(runtime.__doc__, name)
        if doc is not None:
            assert params == doc[:2], f"{cls.__name__}.{name}: the stub's parameters against its C docstring"
        else:  # METH_NOARGS, whose docstring gives no signature: an argument is refused before any work
            assert params == ([], []), f"{cls.__name__}.{name}: its C docstring gives no signature"
            with pytest.raises(TypeError, match="takes no arguments"):
                getattr(blank, name)(1)


# --- without the C modules ---------------------------------------------------------

def test_without_the_c_modules_weightstream_imports_and_takes_the_python_paths() -> None:
    """A machine without a compiler installs no C module: the wrapper, the shm ring and the
    package still import, and every wrapper function answers with its pure-Python path."""
    script = r"""
import importlib.abc, sys

class NoCompiler(importlib.abc.MetaPathFinder):  # as if setup.py's optional extensions had not built
    def find_spec(self, name, path=None, target=None):
        if name.startswith("weightstream.native._"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoCompiler())
import numpy as np
import weightstream
from weightstream import native
from weightstream.protocol.transports.shm import ring

assert not native.BUILT and not native.NATIVE, (native.BUILT, native.NATIVE)
assert ring.Control is None and ring.ring_bytes_for(1 << 30) == 0
dst = np.zeros(8, np.uint8)
assert native.gather(dst, [0], [8], [np.ones(8, np.uint8)], 0) == 0 and not dst.any()
native.copy(dst, np.full(8, 3, np.uint8))
assert (dst == 3).all()
state = {"a": dst}
assert native.same_items(state, ["a"], [dst]) and not native.same_items(state, ["a"], [dst.copy()])
assert native.dict_version(state) is None and native.destinations([dst], [8]) is None
print("ok", weightstream.__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok weightstream", done.stderr or done.stdout
