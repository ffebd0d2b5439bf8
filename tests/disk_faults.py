"""Real on-disk corruption for the snapshot tests."""

from __future__ import annotations

from pathlib import Path


def flip(path: Path, offset: int, bit: int = 0x10) -> None:
    """Flip ``bit`` of the byte at ``offset`` in place (flipping it again repairs the file)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ bit]))
