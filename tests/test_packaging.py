"""Packaging from a checkout: setup's package list holds every package directory of the tree (a
new subpackage cannot be left out of the wheel), every module imports, each C module has its
stub and the stub says what the C module takes, and without the C modules weightstream still
imports and takes its pure-Python paths. Then the distributions themselves, built from a copy of
the tree: the sdist and the wheel pass ``twine check --strict`` and carry the license, the sdist
builds the wheel (C sources and header in it), and with no C compiler the sdist still installs,
with no C module, and runs (a demo push, a bench, from outside the checkout). Importing every
module of the installed wheel is .ci/run's job, which repeats these steps too."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import weightstream
from weightstream import native

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
NATIVE_DIR = ROOT / "weightstream" / "native"
# DESIGN.md's layout: sender/, receiver/ and protocol/ install as subpackages of weightstream;
# bench/ too, so that an installed `weightstream bench` runs the benches
LAYOUT = {
    "weightstream": "weightstream",
    "weightstream.protocol": "protocol",
    "weightstream.sender": "sender",
    "weightstream.receiver": "receiver",
    "weightstream.bench": "bench",
}
# Package directories of the tree that stay out of the wheel (setup.py's EXCLUDED), with all below them
EXCLUDED = {"weightstream.bench.micro"}  # pytest-benchmark files: tests
# Roots with a link under weightstream/ for mypy (pyproject's [tool.mypy]); bench/ has none: mypy
# is not run on it, so in a checkout with no install that maps weightstream.bench it is `bench`
MYPY_LINKED = ("weightstream.protocol", "weightstream.sender", "weightstream.receiver")
CHECKOUT_NAMES = {"weightstream.bench": "bench"}
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
    """Every directory with an ``__init__.py`` under a root of the layout, by import name, but
    those that stay out of the wheel (``EXCLUDED`` and below)."""
    found = {}
    for name, directory in LAYOUT.items():
        top = ROOT / directory
        for init in top.rglob("__init__.py"):  # rglob does not enter symlinked directories
            if "__pycache__" in init.parts or init.parent.is_symlink():
                continue
            package = ".".join((name, *init.parent.relative_to(top).parts))
            if any(package == x or package.startswith(x + ".") for x in EXCLUDED):
                continue
            found[package] = init.parent
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
    assert "weightstream.bench" in dist.packages and not EXCLUDED & set(dist.packages), dist.packages


def test_the_mypy_links_point_at_their_package_roots() -> None:
    """weightstream/protocol etc. let mypy see the installed names; packaging must skip them."""
    for name in MYPY_LINKED:
        directory = LAYOUT[name]
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
checkout_names = json.loads(sys.argv[2])

def load(name):
    # a root with no mypy link (bench/) is, in a checkout with no install mapping it, its own top-level package
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        root = next((r for r in checkout_names if name == r or name.startswith(r + ".")), None)
        if root is None or exc.name != root:
            raise
        return importlib.import_module(checkout_names[root] + name[len(root):])

names, failed = [], {}
for package in json.loads(sys.argv[1]):
    names.append(package)
    found = pkgutil.iter_modules(load(package).__path__, package + ".")
    names += [m.name for m in found if not m.ispkg and m.name.rpartition(".")[2] != "__main__"]
for name in names:
    try:
        load(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
print(json.dumps({"names": names, "failed": failed}))
"""
    packages = sorted(package_directories())
    done = subprocess.run([sys.executable, "-c", script, json.dumps(packages), json.dumps(CHECKOUT_NAMES)],
                          capture_output=True, text=True, timeout=50, cwd=ROOT)
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


# --- the distributions, built -------------------------------------------------------

@dataclass
class Built:
    """An sdist and the wheel ``python -m build`` made from it, from a copy of the tree."""

    sdist: Path
    wheel: Path
    tmp: Path

    @property
    def base(self) -> str:
        """``weightstream-<version>``: the sdist's top folder, the wheel's .dist-info stem."""
        return self.sdist.name.removesuffix(".tar.gz")


def _copy_of_the_tree(into: Path) -> Path:
    """The tracked files and the untracked ones git does not ignore, as .ci/run's copy: a build in
    the checkout would pack what an earlier one left in build/ and *.egg-info (and write there)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, timeout=30, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, dst = ROOT / rel, into / rel
        if not (src.is_symlink() or src.is_file()):  # deleted since it was tracked
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():  # the mypy links stay links, as in a checkout
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return into




@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout: the build copies the tree git lists")
    pytest.importorskip("build")
    tmp = tmp_path_factory.mktemp("dist")
    src = _copy_of_the_tree(tmp / "src")
    # --no-isolation: the build backend installed here, no download; the wheel is built from the sdist
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                          capture_output=True, text=True, timeout=150, cwd=tmp)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (sdist,), (wheel,) = (tmp / "dist").glob("weightstream-*.tar.gz"), (tmp / "dist").glob("weightstream-*.whl")
    return Built(sdist, wheel, tmp)


@pytest.mark.timeout(180)
def test_sdist_and_wheel_pass_twine_check_strict(built: Built) -> None:
    pytest.importorskip("twine")
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(built.sdist), str(built.wheel)],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("PASSED") == 2 and "WARNING" not in out.upper(), out


@pytest.mark.timeout(180)
def test_the_license_and_classifiers_ship_in_both(built: Built) -> None:
    license_text = (ROOT / "LICENSE").read_bytes()
    base = built.base
    assert base == f"weightstream-{weightstream.__version__}", f"{base}: pyproject's version and __version__ differ"
    with zipfile.ZipFile(built.wheel) as whl:
        assert whl.read(f"{base}.dist-info/licenses/LICENSE") == license_text, "the wheel's license differs"
        metadata = whl.read(f"{base}.dist-info/METADATA").decode()
    with tarfile.open(built.sdist) as sdist:
        member = sdist.extractfile(f"{base}/LICENSE")
        assert member is not None and member.read() == license_text, "the sdist's license differs"
        pkg_info = sdist.extractfile(f"{base}/PKG-INFO")
        assert pkg_info is not None and b"License-File: LICENSE" in pkg_info.read()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata, metadata[:2000]
    classifiers = {line.partition(": ")[2] for line in metadata.splitlines() if line.startswith("Classifier: ")}
    want = {"Programming Language :: Python :: 3.10", "Operating System :: POSIX :: Linux", "Typing :: Typed"}
    assert want <= classifiers and any(c.startswith("Topic :: ") for c in classifiers), classifiers


@pytest.mark.timeout(180)
def test_the_sdist_builds_on_its_own_and_the_wheel_holds_the_package(built: Built) -> None:
    """The wheel was built from the sdist: so the sdist has every C source and header; the wheel
    has the benches once (bench/micro, tests, stays out) and no C source."""
    base = built.base
    with tarfile.open(built.sdist) as sdist:
        in_sdist = set(sdist.getnames())
    c_files = {f"{base}/weightstream/native/{p.name}" for p in NATIVE_DIR.iterdir() if p.suffix in (".c", ".h", ".pyi")}
    assert c_files <= in_sdist, sorted(c_files - in_sdist)
    with zipfile.ZipFile(built.wheel) as whl:
        files = whl.namelist()
    assert len(files) == len(set(files)), "a file listed twice in the wheel"
    benches = {f"weightstream/bench/{p.relative_to(ROOT / 'bench').as_posix()}" for p in (ROOT / "bench").rglob("*.py")
               if "__pycache__" not in p.parts and "micro" not in p.parts}
    assert "weightstream/bench/engine.py" in benches and benches <= set(files), sorted(benches - set(files))
    assert not [f for f in files if "/micro/" in f or f.endswith((".c", ".h", ".sh"))], files


@pytest.mark.timeout(180)
def test_without_a_c_compiler_the_sdist_installs_and_runs_in_pure_python(built: Built) -> None:
    """``CC=/bin/false``: every optional C module fails to build, the wheel has none, and the
    installed package, from outside the checkout, imports, says so, pushes (the demo: spawned
    receivers, every byte checked) and runs a bench."""
    wheels = built.tmp / "nocc"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEIGHTSTREAM_PURE_PYTHON",
                                                              "WEIGHTSTREAM_REQUIRE_NATIVE")}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                           str(built.sdist)], capture_output=True, text=True, timeout=120, env={**env, "CC": "/bin/false"},
                          cwd=built.tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = wheels.glob("weightstream-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        native_files = [f for f in whl.namelist() if f.endswith((".so", ".pyd"))]
    assert not native_files, f"built with CC=/bin/false, yet the wheel has {native_files}"

    env_dir = built.tmp / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)  # dependencies from this interpreter's site
    python = env_dir / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir", "--no-deps", str(wheel)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    def run(*args: str) -> str:
        proc = subprocess.run([str(env_dir / "bin" / "weightstream"), *args], capture_output=True, text=True,
                              timeout=100, env=env, cwd=built.tmp)  # outside the checkout: no `weightstream` from cwd
        assert proc.returncode == 0, f"weightstream {' '.join(args)}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    check = ("import json, weightstream; from weightstream import native; "
             "print(json.dumps([weightstream.__file__, native.BUILT, native.NATIVE]))")
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True, timeout=60, env=env, cwd=built.tmp)
    assert proc.returncode == 0, proc.stderr
    where, built_native, native_on = json.loads(proc.stdout)
    assert Path(where).resolve().is_relative_to(env_dir.resolve()), f"imported from {where}, not the venv"
    assert not built_native and not native_on
    assert "C modules: none loaded" in run("--version")
    out = run("demo", "--size-gib", "0.01", "--versions", "2", "--receivers", "1", "--bucket-mib", "4")
    assert "verification OK" in out and out.count("digests OK") == 2, out
    out = run("bench", "handoff", "--quick", "--size-mib", "8")
    assert "readers=1: best" in out and "memcpy 8 MiB" in out, out
