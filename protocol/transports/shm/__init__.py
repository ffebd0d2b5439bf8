"""POSIX shared-memory transport: host slots shared by name between processes.

The sender creates each slot once per session and unlinks it on close; Python's
resource tracker unlinks it too if the sender is killed. Receivers map a slot by
name without registering it with their own resource tracker (which would unlink
the sender's segment when a receiver exits) and cache the mapping per session.

Safety: a slot's memory is reserved when it is created (posix_fallocate), so a /dev/shm
too small for the slots is a TransportError at creation, never a SIGBUS in the middle of
a push. A segment is named ``ws_<sender pid>_<sender session>_<random>``; a rank maps
only segments of the sender session it is connected to, owned by its own uid with mode
0600 (unless ``insecure``), and checks the size with fstat before it maps them.
"""

from __future__ import annotations

import mmap
import os
import secrets
import stat
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any, cast

import numpy as np

from ....frameworks import host_bytes
from ...errors import TransportError
from ..base import Capabilities, NoFields, PushLayout, StreamSpec, create_all, host_identity
from ..host import HostSlotReader, HostSlotWriter, write_one
from . import ring as shm_ring
from .streaming import hot_bucket_bytes, slot_streams

try:  # CPython's own binding of shm_open, used by multiprocessing.shared_memory
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX
    _posixshmem = None

PREFIX = "ws_"
SHM_DIR = "/dev/shm"


def shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _no_room(needed: int, what: str, detail: str = "") -> TransportError:
    free = shm_free_bytes()
    free_text = "unknown" if free is None else f"{free} bytes ({free / (1 << 20):.0f} MiB)"
    return TransportError(
        f"{what} needs {needed} bytes ({needed / (1 << 20):.0f} MiB) of shared memory, {SHM_DIR} has {free_text} "
        f"free{detail}; fix: give the container more (docker run --shm-size=..., or a bigger tmpfs on {SHM_DIR}), "
        "or lower bucket_bytes / num_buffers"
    )


def _map_readwrite(fd: int, size: int) -> mmap.mmap:
    # MAP_POPULATE maps every page up front: no minor faults on the first read of each bucket.
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)


def close_mapping(mapping: Any) -> None:
    """Close an mmap, RingMap or SharedMemory unless a view of it is still alive somewhere: the
    mapping then goes when the last view does."""
    if mapping is not None:
        try:
            mapping.close()
        except BufferError:
            pass


def segment_name(session: str) -> str:
    """``ws_<pid>_<session>_<random>``: the creator's pid first (leak checks find a dead one's)."""
    return f"{PREFIX}{os.getpid()}_{session or 'nosession'}_{secrets.token_hex(4)}"


class ShmExportedSlot(HostSlotWriter):
    def __init__(self, size: int, session: str = "") -> None:
        name = segment_name(session)
        # every choice read from the machine or the environment first: nothing to undo if one fails
        ring_bytes = shm_ring.ring_bytes_for(size)
        streams, hot = slot_streams(size), hot_bucket_bytes(size)
        segment = shm_ring.segment_bytes(size, ring_bytes)
        try:
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=segment)
        except OSError as exc:
            raise TransportError(
                f"could not create a {size}-byte shared-memory slot ({exc}); "
                "free space in /dev/shm or lower bucket_bytes/num_buffers"
            ) from exc
        try:  # reserve every page now: a full tmpfs is an error here, not a SIGBUS at the first write
            os.posix_fallocate(self._shm._fd, 0, segment)  # type: ignore[attr-defined]
        except OSError as exc:
            close_mapping(self._shm)
            self._shm.unlink()
            raise _no_room(segment, f"shm slot {name}", f" ({exc.strerror})") from exc
        self.size = size
        self.name = name
        self._streams = self.streams = streams  # a bucket this big is in DRAM before a rank reads it
        self.hot_bytes = hot  # a bucket this small is read from the cache: written through it
        buf = cast(memoryview, self._shm.buf)  # typeshed: None after close() only
        self._view: np.ndarray | None = np.frombuffer(buf, dtype=np.uint8, count=size)
        self._view.fill(0)  # allocate every page now, not as page faults inside the first push
        self._mv = memoryview(self._view)  # type: ignore[arg-type]  # NumPy types __buffer__ on 3.12+ only
        self.ring: shm_ring.RingWriter | None = None
        self._ring_map: Any = None
        if ring_bytes:
            try:
                self._ring_map = shm_ring.RingMap(self._shm._fd, ring_bytes, 2 * ring_bytes)  # type: ignore[attr-defined]
                control = shm_ring.Control(buf, shm_ring.control_offset(size))
            except (OSError, ValueError) as exc:
                self.close()
                raise TransportError(f"could not map the ring of shm slot {name} ({exc}); set {shm_ring.ENV}=0") from exc
            self.ring = shm_ring.RingWriter(control, np.frombuffer(self._ring_map, np.uint8), ring_bytes)
        self.can_stream = self.ring is not None

    def writer(self, bucket: Any, layout: PushLayout, stream: StreamSpec | None) -> Any:
        """A streamed bucket goes through the slot's ring; any other is written into the slot, through
        the cache when it is small enough for a rank to read it from there."""
        if stream is None or self.ring is None:
            self.streams = self._streams and not (self.hot_bytes and bucket.used <= self.hot_bytes)
            return self
        return RingBucketWriter(self.ring, bucket.seq, layout, stream)

    def descriptor(self) -> dict[str, Any]:
        found = {"name": self.name, "size": self.size, "host": host_identity()}
        if self.ring is not None:
            found["ring"] = self.ring.ring_bytes
        return found

    def host_view(self) -> np.ndarray:
        if self._view is None:
            raise TransportError(f"slot {self.name} is closed")
        return self._view

    def close(self) -> None:
        if self._view is None:
            return
        self._mv.release()
        self._view = None
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        close_mapping(self._ring_map)
        self._ring_map = None
        close_mapping(self._shm)
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass


class ShmImportedSlot(HostSlotReader):

    def __init__(self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False) -> None:
        """``owner``: (pid, session) of the sender this rank is connected to; only its segments are mapped."""
        name, size = descriptor.get("name"), descriptor.get("size")
        if not isinstance(name, str) or not name.startswith(PREFIX) or "/" in name or len(name) > 200:
            raise TransportError(f"shm slot descriptor: expected a name starting with {PREFIX!r}, got {name!r}")
        if not isinstance(size, int) or size <= 0:
            raise TransportError(f"shm slot descriptor: expected a positive size, got {size!r}")
        if owner is not None and not name.startswith(f"{PREFIX}{owner[0]}_{owner[1]}_"):
            raise TransportError(
                f"shm slot {name} is not a segment of the connected sender (pid {owner[0]}, session {owner[1]}); "
                f"expected a name starting with {PREFIX}{owner[0]}_{owner[1]}_. A sender announces only its own "
                "slots: check that nothing else answers at this endpoint"
            )
        if descriptor.get("host") != host_identity():
            raise TransportError(
                f"shm slot {name} lives on host {descriptor.get('host')!r}, this receiver runs on {host_identity()!r}; "
                "shared memory only works on one host, and weightstream has no cross-host transport yet: run the "
                "rank on the sender's host"
            )
        if _posixshmem is None:  # pragma: no cover
            raise TransportError("POSIX shared memory is not available on this platform")
        ring_bytes = descriptor.get("ring", 0)  # checked before anything is opened: nothing to close on error
        if type(ring_bytes) is not int or ring_bytes < 0 or ring_bytes % shm_ring.PAGE or ring_bytes >= size:
            raise TransportError(
                f"shm slot {name}: expected 'ring' to be a multiple of {shm_ring.PAGE} below the slot's {size} bytes, "
                f"got {ring_bytes!r}"
            )
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except OSError as exc:
            raise TransportError(f"could not open shared-memory slot {name} ({exc}); is the sender alive?") from exc
        if shm_ring.RingMap is None:
            ring_bytes = 0  # this rank cannot map rings: it never says READY streamed
        segment = shm_ring.segment_bytes(size, ring_bytes)
        self.ring: shm_ring.RingReader | None = None
        self._ring_map: Any = None
        try:
            st = os.fstat(fd)
            if not insecure and (st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077):
                raise TransportError(
                    f"shm slot {name} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; expected uid "
                    f"{os.getuid()} (this rank's) and mode 600. Run the sender as the same user as the ranks, or pass "
                    "insecure=True to the daemon if another user's sender is meant to feed it"
                )
            if st.st_size < segment:  # mapping past the end would be a SIGBUS at the first read
                raise TransportError(
                    f"shm slot {name}: expected a segment of at least {segment} bytes (as announced), it has "
                    f"{st.st_size}; the sender and this rank disagree on the slot, or the segment was truncated"
                )
            self._mmap: mmap.mmap | None = _map_readwrite(fd, segment)
            if ring_bytes:
                self._ring_map = shm_ring.RingMap(fd, ring_bytes, 2 * ring_bytes)
        except OSError as exc:
            raise TransportError(f"could not map shm slot {name} ({exc})") from exc
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.streams = slot_streams(size)  # copies out of it go to memory read only at the next forward pass
        self._view: np.ndarray | None = np.frombuffer(self._mmap, dtype=np.uint8, count=size)
        if ring_bytes:
            control = shm_ring.Control(self._mmap, shm_ring.control_offset(size))
            self.ring = shm_ring.RingReader(control, np.frombuffer(self._ring_map, np.uint8), ring_bytes)
        self.can_stream = self.ring is not None

    def stream_reader(self, index: int, used: int, check: Callable[[], None], timeout: float) -> shm_ring.RingRead:
        ring = self.ring
        if ring is None:
            raise TransportError(f"shm slot {self.name} has no ring (closed, or this rank cannot map rings)")
        return ring.reading(index, used, check, timeout)

    def host_view(self) -> np.ndarray:
        if self._view is None:
            raise TransportError(f"slot {self.name} is closed")
        return self._view

    def close(self) -> None:
        self._view = None
        # Dropped, not released: a thread still inside a ring wait holds the reader, whose control
        # block and view then keep both mappings alive (the closes below raise BufferError) until
        # it lets go, rather than have them unmapped under it.
        self.ring = None
        close_mapping(self._ring_map)
        self._ring_map = None
        close_mapping(self._mmap)
        self._mmap = None


class RingBucketWriter:
    """One bucket streamed through a slot's ring (see :mod:`.ring`): published before it is
    written, each rank copying it out right behind. How the layout's whole-tensor buckets run
    through a ring of this size is planned once per layout and kept with it."""

    streamed = True

    def __init__(self, ring: shm_ring.RingWriter, seq: int, layout: PushLayout, stream: StreamSpec) -> None:
        self.ring, self.seq, self.layout = ring, seq, layout
        ring.begin(stream.consumers, stream.check, stream.timeout)

    def source_bytes(self, tensor: Any) -> np.ndarray:
        return host_bytes(tensor)

    def write(self, offset: int, source: np.ndarray, start: int, nbytes: int) -> None:
        self.ring.write(offset, source, start, nbytes)

    def write_whole(self, bucket: Any, items: Any) -> int | None:
        key = ("shm ring plan", self.ring.ring_bytes)
        plan = self.layout.derived.get(key)
        if plan is None:
            plan = self.layout.derived[key] = shm_ring.ring_plan(self.layout.plan, self.layout.tensor_bytes, self.ring.ring_bytes)
        return self.ring.write_tensors(items, plan, self.seq, write_one)

    def finish(self, used: int) -> list[Any]:
        self.ring.finish(used)
        return []

    def abort(self) -> None:
        self.ring.abort()  # ranks waiting for its bytes wake now, not at their timeout


class ShmTransport(NoFields):
    name = "shm"
    capabilities = Capabilities(same_host=True, device="host", streamed=True, max_consumers=shm_ring.MAX_CONSUMERS)

    def create_slots(self, count: int, size: int, session: str = "") -> list[ShmExportedSlot]:
        needed = count * shm_ring.segment_bytes(size, shm_ring.ring_bytes_for(size))
        free = shm_free_bytes()
        if free is not None and needed > free:  # before anything is made: say it for all slots at once
            raise _no_room(needed, f"{count} slots of {size} bytes")
        return create_all(lambda n: ShmExportedSlot(n, session), count, size)

    def open_slot(
        self, descriptor: dict[str, Any], owner: tuple[int, str] | None = None, insecure: bool = False
    ) -> ShmImportedSlot:
        return ShmImportedSlot(descriptor, owner, insecure)


TRANSPORT = ShmTransport()
