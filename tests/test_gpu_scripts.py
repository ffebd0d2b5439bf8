"""The prepared GPU run (issue 24) in the modes a CPU machine can check.

bench/gpu_check.sh, without a GPU, prints one line and exits 0 (CI runs that mode); with
nvidia-smi but no CUDA for torch it says so in one line too. bench/gpu_prepare.sh parses,
keeps one version per project, removes what is no longer needed and refuses wheels that do
not install on the device's CPython 3.12, all without the network when .whl/ is already
right. The gpu-marked tests collect cleanly here, and gpu_check.sh's selection of test files
holds every one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "bench" / "gpu_check.sh"
PREPARE = ROOT / "bench" / "gpu_prepare.sh"
BASH = shutil.which("bash")

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(BASH is None, reason="needs bash")]


def _gpu_listed() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [BASH, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize("script", [CHECK, PREPARE], ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    done, _ = _run(["-n", str(script)])
    assert done.returncode == 0, done.stderr


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0(tmp_path: Path) -> None:
    if _gpu_listed():
        pytest.skip("nvidia-smi lists a GPU here: gpu_check.sh would run for real")
    out = tmp_path / "out"
    env = dict(os.environ)
    env.pop("GPU_CHECK_DRY_RUN", None)
    done, seconds = _run([str(CHECK), str(out)], env=env)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, done
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU here"), lines
    assert seconds < 60, f"the no-GPU mode took {seconds:.1f}s"
    assert not out.exists(), "the no-GPU mode wrote results"


def test_gpu_check_with_nvidia_smi_but_no_cuda_says_so_in_one_line(tmp_path: Path) -> None:
    """A machine with the driver's tool but no CUDA for this Python's torch (or no torch)."""
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    except ImportError:
        pass
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable)
    env.pop("GPU_CHECK_DRY_RUN", None)
    done, seconds = _run([str(CHECK), str(tmp_path / "out")], env=env)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, done
    assert (
        len(lines) == 1 and lines[0].startswith("gpu_check: no GPU here") and "torch.cuda.is_available()" in lines[0]
    ), lines
    assert seconds < 90, f"the no-CUDA mode took {seconds:.1f}s"


def test_gpu_check_needs_its_outdir() -> None:
    done, _ = _run([str(CHECK)])
    assert done.returncode == 2 and "usage: bash bench/gpu_check.sh OUTDIR" in done.stderr, done


def test_wheel_folder_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "check-ignore", "-q", ".whl/pyzmq-1-cp312-abi3-manylinux_2_28_x86_64.whl"], cwd=ROOT)
    assert done.returncode == 0, ".whl/ must be ignored: the wheels travel to the GPU machine, never into a commit"


# --- gpu_prepare.sh without the network: a .whl/ that is already right -------------------------------


def _wheel(folder: Path, filename: str, requires: list[str] = ()) -> Path:
    """A minimal wheel: only its name and its METADATA matter to gpu_prepare.sh."""
    name, version = filename.split("-")[:2]
    meta = [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}"] + [f"Requires-Dist: {r}" for r in requires]
    path = folder / filename
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n\nA test wheel.\n")
    return path


def _prepare(dest: Path, pins: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GPU_PREPARE_DEST=str(dest), GPU_WHEELS=pins, PYTHON=sys.executable)
    # no network: every pin is satisfied by what dest holds, so pip must not be called
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/none")
    done, _ = _run([str(PREPARE)], env=env)
    return done


def test_gpu_prepare_keeps_one_version_and_drops_what_is_not_needed(tmp_path: Path) -> None:
    dest = tmp_path / "whl"
    dest.mkdir()
    _wheel(
        dest,
        "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
        ['cffi; implementation_name == "pypy"'],
    )
    _wheel(dest, "pyzmq-26.0.0-cp312-cp312-manylinux_2_28_x86_64.whl")  # another version: must go
    _wheel(dest, "pytest_asyncio-1.5.0-py3-none-any.whl",
           ["pytest>=8.4", 'typing-extensions>=4.12; python_version < "3.13"', 'sphinx>=5.3; extra == "docs"'])  # fmt: skip
    _wheel(dest, "coloredlogs-15.0.1-py2.py3-none-any.whl", ["humanfriendly>=9.1"])  # no longer pinned: must go
    done = _prepare(dest, "pyzmq==27.3.0 pytest-asyncio==1.5.0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in dest.iterdir()) == [
        "pytest_asyncio-1.5.0-py3-none-any.whl",
        "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    ]
    assert "fetching" not in done.stdout, done.stdout
    assert re.search(r"total [0-9.]+ MiB of wheels", done.stdout), done.stdout
    again = _prepare(dest, "pyzmq==27.3.0 pytest-asyncio==1.5.0")  # idempotent
    assert again.returncode == 0 and "removed" not in again.stderr and "fetching" not in again.stdout, again


def test_gpu_prepare_names_a_missing_dependency_and_refuses_a_wheel_for_another_python(tmp_path: Path) -> None:
    dest = tmp_path / "whl"
    dest.mkdir()
    _wheel(dest, "pyzmq-27.3.0-cp311-cp311-manylinux_2_28_x86_64.whl")  # not for CPython 3.12
    _wheel(dest, "coloredlogs-15.0.1-py2.py3-none-any.whl", ["humanfriendly>=9.1"])
    _wheel(dest, "humanfriendly-10.0-py2.py3-none-any.whl")  # coloredlogs needs it, the device lacks it
    done = _prepare(dest, "pyzmq==27.3.0 coloredlogs==15.0.1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "humanfriendly-10.0-py2.py3-none-any.whl" in done.stdout  # kept: a dependency
    assert "no tag of it installs on CPython 3.12 manylinux x86_64" in done.stderr, done.stderr


# --- the gpu tests on a CPU machine ----------------------------------------------------------------


def test_gpu_tests_collect_cleanly_and_gpu_check_selects_every_file_with_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert any("test_cuda_ipc.py::test_every_dtype_bit_exact" in i for i in ids), ids
    assert any("test_checksum_true_end_to_end" in i for i in ids), ids
    files = {i.split("::")[0] for i in ids}
    # gpu_check.sh runs `pytest -m gpu` on the tests/test_*.py files this pattern selects
    pattern = re.compile(r"mark\.gpu|mark\([\"']gpu")
    selected = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text())}
    assert files <= selected, f"gpu-marked tests in files gpu_check.sh would not run: {sorted(files - selected)}"


def test_gpu_update_rehearses_its_three_methods_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu_update.py --device cpu: the same receivers, queues, version marks and byte checks
    as on the GPU (shm instead of cuda_ipc), so an API change breaks it here, not in the rare GPU run."""
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "bench/gpu_update.py", "--device", "cpu", "--scale", "16", "--gib", "0.02",
         "--repeats", "1", "--bucket-mib", "4", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_update.json").read_text())
    assert doc["complete"] and doc["device"] == "cpu", doc
    assert [r["method"] for r in doc["results"]] == [
        "limit (2 D2D copies, 1 process)", "weightstream shm", "per-tensor IPC handles",
    ]  # fmt: skip
    assert all(r["verified"] and r["median_s"] > 0 for r in doc["results"]), doc["results"]
    assert set(doc["ratios"]) == {"weightstream_x_limit", "handles_x_limit", "weightstream_speedup_vs_handles"}
