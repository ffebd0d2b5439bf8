"""The version order a rank keeps: it never goes back to an older version unless told to."""

from __future__ import annotations

from ..protocol.errors import WeightstreamError
from ..versions import compare_versions


def check_version_order(new: str, committed: str | None, *, force: bool = False) -> None:
    """Refuse to go back: raise unless ``new`` is newer than or the same as ``committed``.

    The same version is allowed (reloading it repairs a model a failed update left torn);
    an older one, or one whose order is unknown, needs ``force=True``.
    """
    if committed is None or force:
        return
    order = compare_versions(new, committed)
    if order is None:
        raise WeightstreamError(
            f"version order: expected a version newer than the committed {committed!r}, got {new!r} and cannot tell "
            "which is newer (only integers / step_N / <name>_N with the same <name> are ordered); "
            "fix: pass force=True if you mean it"
        )
    if order < 0:
        raise WeightstreamError(
            f"version order: expected a version at least as new as the committed {committed!r}, got the older {new!r}; "
            "fix: pass force=True to roll back on purpose"
        )
