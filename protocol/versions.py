"""Version strings, and the FastDeploy convention of ``version.yaml`` (``step: N``)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

from .errors import WeightstreamError

VERSION_FILE = "version.yaml"


def read_version(model_dir: str | Path) -> str:
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


_TRAILING_INT = re.compile(r"^(.*?)(\d+)$")


def version_key(version: str) -> tuple[str, int] | None:
    """``"234"`` -> ("", 234); ``"step_100"`` -> ("step_", 100); no trailing number -> None."""
    match = _TRAILING_INT.match(version)
    return (match.group(1), int(match.group(2))) if match else None


def is_older(version: str, than: str) -> bool:
    """True when both versions share a prefix and ``version``'s number is lower.

    Versions without a comparable number are never called older: they are
    opaque strings, and refusing them would block legitimate pushes.
    """
    a, b = version_key(version), version_key(than)
    return a is not None and b is not None and a[0] == b[0] and a[1] < b[1]
