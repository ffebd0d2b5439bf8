"""Version strings, their one order rule, and the FastDeploy convention of ``version.yaml`` (``step: N``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

from .protocol.errors import VersionAborted, WeightstreamError

VERSION_FILE = "version.yaml"


def read_version(model_dir: str | os.PathLike[str]) -> str:
    """Return ``step`` from ``model_dir/version.yaml`` as a string."""
    path = Path(model_dir) / VERSION_FILE
    try:
        text = path.read_text()
    except OSError as exc:
        raise WeightstreamError(
            f"no version given and {path} could not be read ({exc.strerror}); "
            "pass version='...' or write a version.yaml with 'step: N'"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WeightstreamError(f"{path} is not valid YAML ({exc}); expected a line 'step: N'") from None
    if not isinstance(data, dict) or "step" not in data or data["step"] is None:
        raise WeightstreamError(f"{path}: expected a mapping with a 'step' key, got {text[:80]!r}")
    step = data["step"]
    if isinstance(step, bool) or not isinstance(step, (int, str)):
        raise WeightstreamError(f"{path}: 'step' must be an int or str, got {type(step).__name__}")
    return str(step)


def write_version(model_dir: str | Path, version: str) -> Path:
    """Write ``version.yaml`` atomically (temp file + rename)."""
    directory = Path(model_dir)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".version.", dir=directory)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"step": version}, f)
    target = directory / VERSION_FILE
    os.replace(tmp, target)
    return target


_TRAILING_INT = re.compile(r"(.*?)(\d+)")
_NO_PREFIX = {"", "step", "v", "version"}  # "step_12" == "12" == "v12"


def version_key(version: str) -> tuple[str, int] | None:
    """``(family, number)`` for versions that end in an integer, else None (no order known).

    ``"12"``, ``"step_12"``, ``"step-12"`` and ``"v12"`` are all ``("", 12)``; ``"ckpt_7"``
    is ``("ckpt", 7)``. Two versions are ordered only when their families match.
    """
    found = _TRAILING_INT.fullmatch(str(version).strip())
    if found is None:
        return None
    family = found.group(1).lower().rstrip("_-.:/ ")
    return ("" if family in _NO_PREFIX else family, int(found.group(2)))


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as ``a`` is older than, the same as or newer than ``b``; None when unknown."""
    if str(a) == str(b):
        return 0
    ka, kb = version_key(a), version_key(b)
    if ka is None or kb is None or ka[0] != kb[0]:
        return None
    return (ka[1] > kb[1]) - (ka[1] < kb[1])


def is_older(version: str, than: str) -> bool:
    """True only when both versions are ordered and ``version`` comes first."""
    return compare_versions(version, than) == -1


def check_version_order(
    new: str, committed: str | None, *, force: bool = False, unordered: bool = False, fix: str = "pass force=True"
) -> None:
    """The one rule for what may follow the committed version; raise VersionAborted if ``new`` may not.

    The same version may (reloading it repairs a model a failed update left torn), and so may a
    newer one; an older one only with ``force``. A version whose order is unknown (see
    :func:`compare_versions`) needs ``force`` too, unless ``unordered``: a live push passes it,
    since its versions are opaque strings and refusing them would block a trainer's legitimate
    push. ``fix`` says how the caller's user forces it.
    """
    if committed is None or force:
        return
    order = compare_versions(new, committed)
    if order is None and not unordered:
        raise VersionAborted(
            f"version order: expected a version newer than the committed {committed!r}, got {new!r} and cannot tell "
            "which is newer (only integers / step_N / <name>_N with the same <name> are ordered); "
            f"fix: {fix} if you mean it"
        )
    if order == -1:
        raise VersionAborted(
            f"version {new!r} is older than the committed {committed!r} (expected a version at least as new, got the "
            f"older {new!r}); fix: {fix} to roll back deliberately"
        )
