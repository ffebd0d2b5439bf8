#!/usr/bin/env bash
# The prepared GPU proof of the cuda_ipc path (issue 24): one short run on the GPU machine.
#
#   here first:          bash bench/gpu_prepare.sh          (stages .whl/: pyzmq, pytest-asyncio)
#   on the GPU machine:  bash bench/gpu_check.sh $OUT       (repo root; the device call carries .whl)
#
# Without a GPU (no nvidia-smi, no GPU listed, or torch.cuda.is_available() not True) it prints one
# line saying so and exits 0: CI runs that mode. GPU_CHECK_DRY_RUN=1 rehearses the rest on a CPU
# machine (install, import, pytest and summary plumbing; the GPU tests then skip, so it ends FAIL,
# and the bench runs its --device cpu rehearsal),
# e.g. PYTHON=/tmp/venv/bin/python GPU_CHECK_SITE=/tmp/ws-site GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh /tmp/o
#
# With a GPU: 225 s in all (GPU_CHECK_BUDGET_S), counted from the start and the GPU detection
# included, so that with a step's kill grace and the summary it stays under 4 minutes. Each step
# runs under `timeout` (its whole process group is killed), capped by what is left of the
# budget less the minimum the later steps keep:
#   1. env.txt       nvidia-smi, Python, torch and CUDA package versions             (~10 s)
#   2. install.log   the carried .whl/*.whl, then this project (built from a copy of its sources,
#                    so nothing is built in the tree), into GPU_CHECK_SITE (/tmp/site) with
#                    pip --target --no-index --no-deps (--no-build-isolation for the project; if
#                    that build fails, the pure-Python package is laid out from pyproject's
#                    package-dir). The device's Python is left alone. PYTHONPATH=/tmp/site and
#                    PYTHONSAFEPATH=1: `weightstream` is the installed package, never the source
#                    folder of the same name in the repo root. Then one import check.   (<= 60 s)
#   3. gpu_tests.log `pytest -m gpu` on every tests/test_*.py that marks a test gpu
#                    (tests/test_cuda_ipc.py: cuda_ipc, and the c10d device slots via gloo) (<= 110 s)
#   4. gpu_update.log/.json  bench/gpu_update.py: a GPU_CHECK_GIB (6) GiB bf16 model of Llama
#                    shapes into a preallocated CUDA model in a second process, weightstream
#                    cuda_ipc against the two-device-copy limit and per-tensor reduce_tensor
#                    handles, in the same run, bytes verified            (the rest, <= 100 s)
#   5. summary.txt   pass/fail counts, GB/s and ratios; also printed. Exit 0 only if all passed.
# Files in OUTDIR: 6 (the device tool returns at most 8).
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
    exit 2
fi
OUT_DIR=$1
START=$SECONDS
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python3}

no_gpu() {
    echo "gpu_check: no GPU here ($1); nothing to check, exiting 0"
    exit 0
}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" != 1 ]; then
    command -v nvidia-smi >/dev/null 2>&1 || no_gpu "no nvidia-smi"
    gpus=$(timeout 20 nvidia-smi -L 2>/dev/null) # captured first: grep -q in a pipe can SIGPIPE it
    grep -q '^GPU ' <<<"$gpus" || no_gpu "nvidia-smi lists no GPU"
    cuda=$(timeout 60 "$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")' 2>/dev/null)
    [ "$cuda" = yes ] || no_gpu "torch.cuda.is_available() is not True for $PY"
fi

# --- a GPU is here --------------------------------------------------------------------------------
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
SITE=${GPU_CHECK_SITE:-/tmp/site}
BUDGET=${GPU_CHECK_BUDGET_S:-225} # 4 minutes with room for a step's kill grace and the summary
GIB=${GPU_CHECK_GIB:-6}
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds of the budget stay for later steps
cap() {
    local t=$1 l
    l=$(($(left) - $2))
    [ "$l" -lt "$t" ] && t=$l
    echo "$t"
}

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONSAFEPATH=1 # no cwd on sys.path: ./weightstream (the sources) would shadow the install
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. what this machine is
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  budget: ${BUDGET}s"
    [ "$DRY" = 1 ] && echo "DRY RUN (GPU_CHECK_DRY_RUN=1): no GPU was looked for"
    timeout 10 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
    timeout 20 "$PY" - <<'PY'
import importlib.metadata as md
import platform
import sys

print("python", sys.version.split()[0], sys.executable, platform.machine())
for name in ("torch", "cuda-bindings", "cuda-core", "cupy-cuda13x", "numpy", "msgpack", "uvloop", "pytest",
             "pytest-timeout", "setuptools"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} MISSING")
import torch

if torch.cuda.is_available():
    print("torch.cuda:", torch.version.cuda, torch.cuda.get_device_name(), f"{torch.cuda.mem_get_info()[1] / 2**30:.1f} GiB")
PY
} >"$OUT_DIR/env.txt" 2>&1
gpu_name=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[ "$DRY" = 1 ] && gpu_name="DRY RUN, no GPU looked for"
say "gpu_check: $gpu_name; budget ${BUDGET}s; results in $OUT_DIR"

# 2. install: the carried wheels, then the project (a copy of its sources, so nothing is built in the tree)
install_rc=0
(
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "no .whl/*.whl: run bash bench/gpu_prepare.sh on the CPU machine and carry .whl"
        exit 3
    fi
    t=$(cap 40 165)
    [ "$t" -ge 5 ] || { echo "install: no budget left (${t}s)"; exit 4; }
    timeout -k 5 "$t" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" || exit 5
    src=$(mktemp -d /tmp/ws-src.XXXXXX)
    tar --exclude=./.git --exclude=./.whl --exclude=./build --exclude='*.egg-info' --exclude='*.so' \
        --exclude=__pycache__ -cf - . | tar -C "$src" -xf - || exit 6
    t=$(cap 60 165)
    [ "$t" -ge 5 ] || { echo "install: no budget left (${t}s)"; exit 4; }
    if ! timeout -k 5 "$t" "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --no-cache-dir --upgrade --target "$SITE" "$src"; then
        # the build backend failed here (an old setuptools, say): lay the pure-Python package out
        # by pyproject's package-dir mapping instead (no C speedups: pure-Python loops, same bytes)
        echo "install: pip could not build the project; laying weightstream out from package-dir instead"
        "$PY" - "$SITE" <<'PY' || exit 7
import os
import shutil
import sys
import tomllib

site = sys.argv[1]
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
shutil.rmtree(os.path.join(site, "weightstream"), ignore_errors=True)
for package, folder in sorted(dirs.items(), key=lambda kv: kv[0].count(".")):
    shutil.copytree(folder, os.path.join(site, *package.split(".")), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
PY
    fi
    rm -rf "$src"
    timeout -k 5 30 "$PY" - "$SITE" "$DRY" <<'PY'
import os
import sys

site = os.path.realpath(sys.argv[1])
import pytest_asyncio
import zmq

import weightstream
from weightstream import native as speedups

where = os.path.realpath(weightstream.__file__)
assert where.startswith(site + os.sep), f"weightstream imported from {where}, not from {site}"
try:
    import weightstream.protocol.transports.cuda_ipc.slots  # noqa: F401 - ImportError says why CUDA is unusable
except ImportError:
    if sys.argv[2] != "1":
        raise
    print("dry run: weightstream.protocol.transports.cuda_ipc.slots does not import here")

print(f"weightstream {weightstream.__version__} from {os.path.dirname(where)} (C speedups: "
      f"{'yes' if speedups.NATIVE else 'no'}); pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}); "
      f"pytest-asyncio {pytest_asyncio.__version__}")
PY
) >"$OUT_DIR/install.log" 2>&1 || install_rc=$?
if [ "$install_rc" -ne 0 ]; then
    say "install: FAILED (rc $install_rc); see install.log:"
    tail -n 15 "$OUT_DIR/install.log" | tee -a "$SUMMARY"
    say "RESULT: FAIL ($((SECONDS - START)) s of ${BUDGET} s)"
    exit 1
fi
say "install: $(tail -n 1 "$OUT_DIR/install.log")"

# 3. the gpu-marked tests (every tests/ file that marks one; the c10d device slots through gloo among them)
mapfile -t gpu_files < <(grep -l -E 'mark\.gpu|mark\(["'"'"']gpu' tests/test_*.py)
[ ${#gpu_files[@]} -gt 0 ] || gpu_files=(tests/test_cuda_ipc.py)
plugins=()
# pytest-asyncio 1.x needs pytest >= 8.4; an older device pytest runs these (sync) tests without it
"$PY" -c 'import pytest, sys; sys.exit(0 if tuple(map(int, pytest.__version__.split(".")[:2])) >= (8, 4) else 1)' 2>/dev/null ||
    plugins=(-p no:asyncio)
t=$(cap 110 90)
tests_rc=0
[ "$t" -ge 20 ] || { tests_rc=4; echo "gpu_check: only ${t}s of the budget left, tests not run" >"$OUT_DIR/gpu_tests.log"; }
rm -f "$OUT_DIR/gpu_tests.xml"
[ "$tests_rc" -ne 0 ] || timeout -k 10 "$t" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
    "${plugins[@]}" --junitxml="$OUT_DIR/gpu_tests.xml" "${gpu_files[@]}" >"$OUT_DIR/gpu_tests.log" 2>&1 || tests_rc=$?
[ "$tests_rc" -eq 124 ] || [ "$tests_rc" -eq 137 ] && echo "gpu_check: stopped after ${t}s (budget)" >>"$OUT_DIR/gpu_tests.log"
counts=$("$PY" - "$OUT_DIR/gpu_tests.xml" <<'PY'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("no report (killed before the end?)")
    sys.exit(1)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped")
sys.exit(0 if n["tests"] and passed == n["tests"] else 1)
PY
) || failed=1
[ "$tests_rc" -eq 0 ] || failed=1
say "gpu tests (${gpu_files[*]}): $counts [pytest rc $tests_rc]"
grep -E '^(FAILED|ERROR|SKIPPED)' "$OUT_DIR/gpu_tests.log" | head -n 12 | tee -a "$SUMMARY"
rm -f "$OUT_DIR/gpu_tests.xml"

# 4. the weight-update benchmark, same-run yardsticks
t=$(cap 100 5)
bench_rc=0
if [ "$t" -lt 20 ]; then
    say "gpu_update: SKIPPED (only ${t}s of the budget left)"
    failed=1
else
    size=(--gib "$GIB" --repeats 3 --bucket-mib 512)
    [ "$DRY" = 1 ] && size=(--device cpu --scale 16 --gib 0.02 --repeats 1 --bucket-mib 4) # plumbing only
    timeout -k 10 "$t" "$PY" bench/gpu_update.py "${size[@]}" --out "$OUT_DIR" >"$OUT_DIR/gpu_update.log" 2>&1 ||
        bench_rc=$?
    [ "$bench_rc" -eq 124 ] || [ "$bench_rc" -eq 137 ] && echo "gpu_check: stopped after ${t}s (budget)" >>"$OUT_DIR/gpu_update.log"
    "$PY" - "$OUT_DIR/gpu_update.json" <<'PY' | tee -a "$SUMMARY" || failed=1
import json
import sys

try:
    doc = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"gpu_update: no results ({exc})")
    sys.exit(1)
print(f"gpu_update: {doc['bytes'] / 2**30:.2f} GiB bf16, {doc['tensors']} tensors, "
      f"bucket {doc['bucket_bytes'] >> 20} MiB, {doc['repeats']} timed updates each, on {doc['gpu']}")
ok = bool(doc.get("complete"))
for row in doc["results"]:
    if row.get("error"):
        ok = False
        print(f"  {row['method']:34} FAILED: {row['error'][:200]}")
        continue
    verified = row.get("verified")
    ok = ok and verified is not False
    ratio = "" if row.get("x_limit") is None else f"  x{row['x_limit']:.2f} the limit's time"
    print(f"  {row['method']:34} median {row['median_s']:7.4f} s {row['gbps']:8.1f} GB/s{ratio}"
          + ("" if verified is None else f"  bytes {'ok' if verified else 'WRONG: ' + str(row.get('mismatch'))}"))
for name, value in doc.get("ratios", {}).items():
    print(f"  {name}: {value:.2f}")
if not doc.get("complete"):
    print("  (incomplete: the run stopped before every method ran)")
sys.exit(0 if ok else 1)
PY
    [ "$bench_rc" -eq 0 ] || failed=1
fi

if [ "$failed" -eq 0 ]; then
    say "RESULT: PASS ($((SECONDS - START)) s of ${BUDGET} s)"
else
    say "RESULT: FAIL ($((SECONDS - START)) s of ${BUDGET} s); logs in $OUT_DIR"
fi
exit "$failed"
