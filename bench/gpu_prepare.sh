#!/usr/bin/env bash
# Stage the Python wheels the GPU machine lacks, for bench/gpu_check.sh to install there (issue 24).
#
#   here, from anywhere in the repo:   bash bench/gpu_prepare.sh
#   then one device call:              run(command="bash bench/gpu_check.sh $OUT", carry=[".whl"])
#
# The GPU machine (device kinds nvidia-h100-x1 / nvidia-h200, image 'cuda') runs CPython 3.12 on
# x86_64 with no network. It has torch, cupy, cuda-bindings, cuda-core, msgpack, uvloop, numpy,
# pytest, pytest-timeout, ... (the list below, from the device tool's KINDS.md) but not pyzmq or
# pytest-asyncio. This downloads those wheels, and any runtime dependency of theirs that the device
# lacks, into .whl/ (ignored by git), for cp312 manylinux x86_64 only, one version of each (two
# versions of one project stop the whole install there). It prints each wheel and the total size.
#
# Idempotent: a wheel already in .whl/ that satisfies its pin is kept and not fetched again; a
# wheel of another version of the same project, or of a project no longer needed, is removed.
# Pins: the versions CI tests with; override with GPU_WHEELS="pyzmq==X pytest-asyncio==Y".
# GPU_PREPARE_DEST=DIR stages elsewhere (tests); only .whl/ travels with the device call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
DEST=${GPU_PREPARE_DEST:-.whl}
MAX_MIB=${GPU_PREPARE_MAX_MIB:-16} # the device call carries 64 MiB in all, working tree included
read -r -a WANTED <<<"${GPU_WHEELS:-pyzmq==27.3.0 pytest-asyncio==1.5.0}"
# pip matches manylinux_2_N exactly: these are the ones the device README names
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

# .whl/ must never be committed: it travels to the device as a carried (ignored) path
if [ "$DEST" = .whl ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    if ! git check-ignore -q "$DEST/probe.whl"; then
        echo "gpu_prepare: $DEST/ is not ignored by git; add '/$DEST/' to .gitignore" >&2
        exit 1
    fi
fi
mkdir -p "$DEST"

export GPU_PREPARE_PLATFORMS="${PLATFORMS[*]}"
helper() { # helper COMMAND SPEC...: the wheel bookkeeping, in Python (packaging: pip's own copy if need be)
    "$PY" - "$DEST" "$@" <<'PY'
import os
import sys

try:
    from packaging import tags
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging import tags
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
import zipfile

# Python packages already on the GPU machine (KINDS.md, "Python packages already there", 2026-11-17)
DEVICE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
# the device's interpreter, for environment markers
ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3",
    "python_version": "3.12", "sys_platform": "linux", "extra": "",
}
PLATFORMS = os.environ["GPU_PREPARE_PLATFORMS"].split()
COMPATIBLE = set(tags.cpython_tags((3, 12), abis=["cp312"], platforms=PLATFORMS))
COMPATIBLE |= set(tags.compatible_tags((3, 12), "cp312", PLATFORMS))

dest, command, *specs = sys.argv[1:]


def wheels() -> dict[str, list[tuple[str, object, frozenset]]]:
    found: dict[str, list[tuple[str, object, frozenset]]] = {}
    for name in sorted(os.listdir(dest)):
        if name.endswith(".whl"):
            project, version, _build, wtags = parse_wheel_filename(name)
            found.setdefault(project, []).append((name, version, wtags))
    return found


def requires(path: str) -> list[Requirement]:
    """The wheel's runtime requirements that apply on the device (extras and other Pythons skipped)."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(meta).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        if not line:
            break  # the headers end at the first blank line
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(ENV):
                out.append(req)
    return out


def closure(specs: list[str], have: dict) -> set[str]:
    """The named projects and, transitively, their requirements staged in .whl/ for the device."""
    keep = {canonicalize_name(Requirement(s).name) for s in specs}
    todo = list(keep)
    while todo:
        for filename, _v, _t in have.get(todo.pop(), []):
            for req in requires(os.path.join(dest, filename)):
                dep = canonicalize_name(req.name)
                if dep not in DEVICE and dep in have and dep not in keep:
                    keep.add(dep)
                    todo.append(dep)
    return keep


if command == "plan":
    # for each pinned spec: keep one satisfying wheel (remove the others), or print the spec to fetch
    have = wheels()
    for spec in specs:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        keep = [w for w in have.get(name, []) if req.specifier.contains(w[1], prereleases=True)]
        for filename, _v, _t in have.get(name, []):
            if not keep or filename != keep[-1][0]:
                os.remove(os.path.join(dest, filename))
                print(f"gpu_prepare: removed {filename} (not {spec})", file=sys.stderr)
        if not keep:
            print(spec)
elif command == "deps":
    # runtime requirements of the named projects' wheels (and of their staged dependencies)
    # that neither the device nor .whl/ satisfies
    have = wheels()
    for name in closure(specs, have):
        for filename, _v, _t in have.get(name, []):
            for req in requires(os.path.join(dest, filename)):
                dep = canonicalize_name(req.name)
                if dep in DEVICE:
                    continue
                if not any(req.specifier.contains(v, prereleases=True) for _f, v, _t in have.get(dep, [])):
                    print(f"{req.name}{req.specifier}")
elif command == "report":
    # keep only the named projects and their staged dependencies; check tags; list and total
    have = wheels()
    keep = closure(specs, have)
    problems = []
    total = 0
    for name, entries in sorted(have.items()):
        if name not in keep:
            for filename, _v, _t in entries:
                os.remove(os.path.join(dest, filename))
                print(f"gpu_prepare: removed {filename} (no longer needed)", file=sys.stderr)
            continue
        if len(entries) > 1:
            problems.append(f"{name}: {len(entries)} versions ({', '.join(e[0] for e in entries)}); keep one")
        for filename, version, wtags in entries:
            size = os.path.getsize(os.path.join(dest, filename))
            total += size
            ok = bool(wtags & COMPATIBLE)
            if not ok:
                problems.append(f"{filename}: no tag of it installs on CPython 3.12 manylinux x86_64")
            best = sorted(str(t) for t in wtags & COMPATIBLE) or sorted(str(t) for t in wtags)
            print(f"  {filename:70} {size / 1024:9.1f} KiB  {'ok' if ok else 'INCOMPATIBLE'} ({best[0]})")
    missing = sorted(keep - set(have))
    if missing:
        problems.append(f"not staged: {', '.join(missing)}")
    print(f"TOTAL {total}")
    for p in problems:
        print(f"gpu_prepare: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)
else:
    sys.exit(f"gpu_prepare: unknown helper command {command!r}")
PY
}

download() { # download SPEC: one wheel, for the device only (the device README's recipe)
    local plat=() p
    for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    echo "gpu_prepare: fetching $1"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${plat[@]}" -d "$DEST" "$1"
}

lines() { # lines VAR TEXT: the non-empty lines of TEXT into the array VAR
    local -n into=$1
    into=()
    local line
    while IFS= read -r line; do
        [ -n "$line" ] && into+=("$line")
    done <<<"$2"
    return 0
}

all=("${WANTED[@]}")
for round in 1 2 3 4 5; do
    out=$(helper plan "${all[@]}")
    lines fetch "$out"
    for spec in "${fetch[@]}"; do
        download "$spec"
    done
    out=$(helper deps "${all[@]}")
    lines need "$out"
    if [ "${#need[@]}" -eq 0 ]; then
        break
    fi
    if [ "$round" -eq 5 ]; then
        echo "gpu_prepare: dependencies still unresolved: ${need[*]}" >&2
        exit 1
    fi
    echo "gpu_prepare: the device also lacks: ${need[*]}"
    all+=("${need[@]}")
done

echo "gpu_prepare: wheels in $DEST/ for CPython 3.12 manylinux x86_64:"
rc=0
report=$(helper report "${all[@]}") || rc=$?
total=$(sed -n 's/^TOTAL //p' <<<"$report")
grep -v '^TOTAL ' <<<"$report" || true
if [ "$rc" -ne 0 ] || [ -z "$total" ]; then
    echo "gpu_prepare: the staged wheels are not right for the device (see above)" >&2
    exit 1
fi
# what one device call carries: the working tree (tracked + untracked-not-ignored) plus .whl/
tree=0
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
fi
awk -v w="$total" -v t="$tree" -v max="$MAX_MIB" 'BEGIN {
    printf "gpu_prepare: total %.2f MiB of wheels (limit %d MiB); the device call carries about %.2f MiB of 64 MiB with the working tree\n",
        w / 1048576, max, (w + t) / 1048576
    exit (w > max * 1048576 || w + t > 60 * 1048576) ? 1 : 0
}' || {
    echo "gpu_prepare: too large for one device call" >&2
    exit 1
}
