"""Snapshot file names and the safetensors format, read and written directly.

safetensors: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data; offsets are relative to the data start and cover it without gaps.
We parse it ourselves (json + mmap) rather than through ``safetensors.numpy``, which
has no bfloat16/float8 (ml_dtypes) support and loads a whole file at once.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import xxhash

from ..protocol.dtypes import DType, by_name
from ..protocol.errors import CorruptSnapshot, WeightstreamError

#: safetensors dtype string -> our canonical dtype name
ST_TO_NAME: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
NAME_TO_ST: dict[str, str] = {v: k for k, v in ST_TO_NAME.items()}

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit: a larger header is a corrupt file

# __metadata__ keys of weightstream-written parts: index of the part, and on the last
# part only, how many parts the version has (so a half-renamed set never looks whole)
META_FORMAT = "weightstream.format"
META_PART = "weightstream.part"
META_PARTS = "weightstream.parts"
FORMAT_TAG = "snapshot-v2"  # v2: every part has its xxh3 digests (v1 parts, older, have none)
FORMATS_WITHOUT_DIGESTS = ("snapshot-v1",)
# xxh3_64 of the data section, one 16-hex-digit digest per DIGEST_BLOCK bytes, comma-separated:
# ``snapshot verify`` then names the bad byte range and its tensors, not just the file. Parts
# written before these keys existed have none and are verified structurally.
META_DIGEST = "weightstream.xxh3_64"
META_DIGEST_BLOCK = "weightstream.xxh3_block"
DIGEST_BLOCK = 16 << 20
_READ_CHUNK = 4 << 20


def base_name(rank: int, version: str) -> str:
    # dots around rank and version: tp1.234 and tp12.34 never collide (tp0{v} did)
    return f"model_state.tp{rank}.{version}"


def part_name(rank: int, version: str, index: int) -> str:
    return f"{base_name(rank, version)}.part{index}.safetensors"


def full_name(rank: int, version: str) -> str:
    return f"{base_name(rank, version)}.safetensors"


def legacy_names(version: str) -> list[str]:
    """The pre-rank-separator FastDeploy names, ``model_state.tp0{version}``."""
    return [f"model_state.tp0{version}.safetensors", f"model_state.tp0{version}.pdparams"]


def part_regex(rank: int, version: str) -> re.Pattern[str]:
    """Matches this rank's and version's part files; group 1 is the raw index text."""
    return re.compile(re.escape(f"{base_name(rank, version)}.part") + r"(.*)" + re.escape(".safetensors"))


def version_text_problem(version: str) -> str | None:
    """Why ``version`` cannot be part of a snapshot file name, or None when it can."""
    if not version:
        return "it is empty"
    for bad, what in (("/", "a '/'"), ("\\", "a '\\'"), ("\0", "a NUL byte")):
        if bad in version:
            return f"it contains {what}"
    if version in (".", ".."):
        return f"{version!r} names a directory"
    return None


def check_version_text(version: str) -> None:
    """Raise WeightstreamError unless ``version`` is usable in a file name (no '/', '\\', NUL; not '.'/'..')."""
    problem = version_text_problem(version)
    if problem is not None:
        raise WeightstreamError(
            f"snapshot version: expected a non-empty string usable in a file name, got {version!r} ({problem}); "
            "fix: use versions like '1234' or 'step_1234'"
        )


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int  # byte offset in the file (header included)
    nbytes: int


@dataclass(frozen=True)
class Header:
    entries: list[Entry]  # in data order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; every entry must lie inside the file."""
    with open(path, "rb") as f:
        return read_header_from(f, path)


def read_header_from(f: BinaryIO, path: Path) -> Header:
    """:func:`read_header` of an already open file (``path`` only names it in errors)."""
    f.seek(0)
    raw = f.read(8)
    size = f.seek(0, 2)
    if len(raw) != 8:
        raise _bad(path, f"expected an 8-byte header length, got a {len(raw)}-byte file")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _bad(path, f"expected a header length below {min(MAX_HEADER_BYTES, size - 8)}, got {n}")
    f.seek(8)
    text = f.read(n)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"expected a JSON object header, got {type(header).__name__}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "expected __metadata__ to be an object")
    start = 8 + n
    entries: list[Entry] = []
    for name, spec in header.items():
        try:
            st, shape, (lo, hi) = spec["dtype"], spec["shape"], spec["data_offsets"]
            dtype = by_name(ST_TO_NAME[st])
            shape_t = tuple(int(d) for d in shape)
            ok = all(d >= 0 for d in shape_t) and isinstance(lo, int) and isinstance(hi, int)
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name!r}: expected dtype (one of {', '.join(ST_TO_NAME)}), shape, data_offsets") from None
        nbytes = math.prod(shape_t) * dtype.itemsize
        if not ok or hi - lo != nbytes or lo < 0 or start + hi > size:
            raise _bad(path, f"tensor {name!r}: offsets {[lo, hi]} do not hold {dtype.name}{list(shape_t)} inside the file")
        entries.append(Entry(name, dtype, shape_t, start + lo, nbytes))
    entries.sort(key=lambda e: e.begin)
    return Header(entries, {str(k): str(v) for k, v in meta.items()}, start, size)


def _bad(path: Path, what: str) -> WeightstreamError:
    return WeightstreamError(f"{path}: not a valid safetensors file: {what}; fix: delete it or re-write the snapshot")


def build_header(items: Sequence[tuple[str, DType, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included) for ``(name, dtype, shape, nbytes)`` in data order.

    Padded with spaces to a multiple of 8 so that data starts 8-aligned (as safetensors does).
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in items:
        header[name] = {"dtype": NAME_TO_ST[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def entry_header_bytes(name: str, dtype: DType, shape: tuple[int, ...], end: int) -> int:
    """Upper bound of what one entry adds to the header (used to keep parts under the limit)."""
    spec = {"dtype": NAME_TO_ST[dtype.name], "shape": list(shape), "data_offsets": [end, end]}
    return len(json.dumps({name: spec}, separators=(",", ":"))) + len(str(end)) + 1


def layout_problem(header: Header) -> str | None:
    """What is wrong with how the entries tile the data section, or None.

    safetensors data is the entries back to back, without gaps or overlap, from the end of
    the header to the end of the file; :func:`read_header` only checks each one is inside.
    """
    at = header.data_start
    for e in header.entries:
        if e.begin != at:
            kind = "a gap" if e.begin > at else "an overlap"
            return f"tensor {e.name!r} starts at byte {e.begin}, expected {at} ({kind} in the data)"
        at += e.nbytes
    if at != header.file_size:
        return f"the tensors end at byte {at} but the file has {header.file_size} bytes"
    return None


def parts_problem(indices: Sequence[int], metadata: Sequence[dict[str, str]]) -> str | None:
    """Why a set of weightstream-written parts (their indices, ascending, and metadata) is not
    one whole version, or None. Only the last part carries the count, so a set missing it (a
    commit or a prune cut short) never looks whole."""
    counts = sorted({m[META_PARTS] for m in metadata if META_PARTS in m})
    if not counts:
        return f"parts {list(indices)} are there but none says how many the version has (the last part is missing)"
    if len(counts) > 1 or not (counts[0].isascii() and counts[0].isdigit()):
        return f"parts {list(indices)} give part counts {counts}; expected one number on the last part"
    if list(indices) != list(range(int(counts[0]))):
        return f"expected parts 0..{int(counts[0]) - 1}, found {list(indices)}"
    return None


def digest_meta_bytes(data_bytes: int) -> int:
    """Upper bound of what the digest keys add to a part's header for ``data_bytes`` of data."""
    blocks = -(-data_bytes // DIGEST_BLOCK)
    return len(META_DIGEST) + len(META_DIGEST_BLOCK) + 17 * blocks + len(str(DIGEST_BLOCK)) + 16


class BlockHasher:
    """xxh3_64 of a byte stream, one digest per ``block`` bytes (the last block may be short)."""

    def __init__(self, block: int = DIGEST_BLOCK) -> None:
        if block < 1:
            raise WeightstreamError(f"digest block: expected a size >= 1, got {block}")
        self.block = block
        self.digests: list[str] = []
        self._hash = xxhash.xxh3_64()
        self._fill = 0

    def update(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(view):
            take = min(len(view), self.block - self._fill)
            self._hash.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.block:
                self.digests.append(self._hash.hexdigest())
                self._hash.reset()
                self._fill = 0

    def finish(self) -> list[str]:
        """Every block's digest, the short last one included."""
        if self._fill:
            self.digests.append(self._hash.hexdigest())
            self._hash.reset()
            self._fill = 0
        return self.digests


def digests_of(header: Header) -> tuple[list[str], int] | None:
    """The part's recorded xxh3 digests and their block size, or None when it has none (an older
    or foreign part). Raises CorruptSnapshot when the digest keys are there but unreadable."""
    text = header.metadata.get(META_DIGEST)
    form = header.metadata.get(META_FORMAT)
    if form is not None and form != FORMAT_TAG and form not in FORMATS_WITHOUT_DIGESTS:
        raise CorruptSnapshot(f"its {META_FORMAT} is {form!r}; expected {FORMAT_TAG!r} (or an older {FORMATS_WITHOUT_DIGESTS})")
    if text is None:
        if form == FORMAT_TAG:  # a flipped bit in the key would otherwise switch the check off
            raise CorruptSnapshot(f"it has no {META_DIGEST}, which every {FORMAT_TAG} part has")
        return None
    block_text = header.metadata.get(META_DIGEST_BLOCK) or str(DIGEST_BLOCK)
    if not (block_text.isascii() and block_text.isdigit()) or int(block_text) < 1:
        raise CorruptSnapshot(f"its {META_DIGEST_BLOCK} is {block_text!r}; expected a block size in bytes >= 1")
    return (text.split(",") if text else []), int(block_text)


def read_range(
    f: BinaryIO, start: int, end: int, hasher: BlockHasher | None, advance: Callable[[int], None] | None = None
) -> int:
    """Read bytes ``[start, end)`` of ``f`` in 4 MiB pieces into ``hasher``; return how many were
    read (fewer when the file shrank meanwhile). Through the file, not a mapping: a bad sector is
    an OSError here, where a mapping would be killed by SIGBUS."""
    f.seek(start)
    buf = bytearray(min(_READ_CHUNK, max(end - start, 1)))
    view = memoryview(buf)
    done = 0
    while done < end - start:
        n = f.readinto(view[: min(len(buf), end - start - done)])  # type: ignore[attr-defined]
        if not n:
            break
        if hasher is not None:
            hasher.update(view[:n])
        done += n
        if advance is not None:
            advance(n)
    return done


def digest_mismatches(header: Header, want: Sequence[str], got: Sequence[str], block: int) -> list[str]:
    """Each data block whose digest differs: its byte range and the tensors in it (no fix: the
    caller says what to do)."""
    if len(want) != len(got):
        return [f"the header lists {len(want)} xxh3 digest(s) for its data, expected {len(got)} (one per {block} bytes)"]
    problems = []
    for i, (w, g) in enumerate(zip(want, got)):
        if w == g:
            continue
        lo, hi = i * block, min((i + 1) * block, header.file_size - header.data_start)
        names = [
            e.name for e in header.entries
            if e.nbytes and e.begin - header.data_start < hi and e.begin - header.data_start + e.nbytes > lo
        ]
        if not names:
            shown = "no tensor (only padding) is"
        elif len(names) == 1:
            shown = f"tensor {names[0]!r} is"
        else:
            shown = f"tensors {names[0]!r} .. {names[-1]!r} ({len(names)}) are"
        problems.append(
            f"data bytes [{lo}, {hi}) (file offsets {header.data_start + lo}..{header.data_start + hi}) do not match "
            f"their xxh3 digest (expected {w}, got {g}): {shown} corrupt"
        )
    return problems
