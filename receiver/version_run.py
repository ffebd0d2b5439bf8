"""One version on a receiver: bucket validation and slicing, and the iterator fed to load_weights.

``prepare`` runs on the daemon's loop as buckets arrive: it checks that the bucket
continues the version's manifest in order (vectorised over its packed arrays, no
per-entry lookups) and slices the slot into typed zero-copy views. ``iterate`` runs in the apply
thread: it yields ``(name, view)`` pairs and acks a bucket only once the consumer
asked for the item after its last entry.

Direct mode: when the sink can say where a tensor's bytes live (``destination``)
and the manifest was checked against that sink, whole tensors are copied from the
slot straight into the model's memory by the iterator itself; no view is made and
``load_weights`` sees only the tensors without a destination. At 100k small
tensors that is most of the receiver's per-tensor cost.
"""

from __future__ import annotations

import ctypes
import itertools
import operator
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..frameworks import Framework, bytes_view, host_bytes, module
from ..protocol import messages as m
from ..protocol.dtypes import DTYPES
from ..protocol.errors import ManifestMismatch, ProtocolError, VersionAborted
from ..protocol.transports import ImportedSlot, StreamRead
from .appliers import Applier, Direct, PreparedBucket, choose_applier
from .prefetch import PrefetchQueue
from .run_manifest import RunManifest, address_of
from .scratch import ScratchPool
from .view_keeper import ViewKeeper


class VersionRun:
    def __init__(
        self,
        begin: m.Begin,
        *,
        framework: Framework,
        queue: PrefetchQueue,
        timeout: float,
        on_ack: Callable[[int, int], None],
        destination: Callable[[str], np.ndarray | None] | None = None,
        direct: bool = False,
        manifest: RunManifest | None = None,
        targets_owner: Any = None,
        alignment: int = m.ALIGNMENT,
        staged: bool = False,
        streamed: bool = False,
        stream_index: int = 0,
        domain: str = "host",
        scratch: ScratchPool | None = None,
        kept_views: ViewKeeper | None = None,
    ) -> None:
        """``staged``: the consumer only copies, the model is untouched until COMMIT. ``streamed``:
        this rank said READY streamed (it takes buckets read as the sender writes them, as the
        ``stream_index``-th reader). ``domain``: where the session's slots live ("host" or a
        device), from the transport's capabilities. ``scratch``: where host scratch for tensors
        larger than a bucket comes from and goes back to once the consumer moved past it.
        ``kept_views``: where NumPy views of a slot's batches are kept for the next bucket at the
        same place (:mod:`.view_keeper`)."""
        self.version = begin.version
        self.num_buckets = begin.buckets
        self.total_bytes = begin.total_bytes
        # the manifest, in the order buckets must deliver it (the daemon's, reused across versions;
        # a reusing BEGIN carries none of its own)
        self.manifest = manifest if manifest is not None else RunManifest(begin)
        self.total_tensors = len(self.manifest)
        self.alignment = alignment  # the session's: a packed bucket's offsets are derived with it
        self.names, self.dtypes, self.fulls = self.manifest.names, self.manifest.codes, self.manifest.fulls
        self._index: dict[str, int] = {}  # name -> manifest index, built on the first chunk piece
        self.framework = framework
        self._host_view = module(framework).view  # typed views of host bytes, unchecked (the hot path)
        self._host_views = module(framework).views  # the same, many at equal steps in one batch
        # NumPy views only: their fields can be checked in C before one is handed out again
        self._kept_views = kept_views if framework == "numpy" and domain == "host" else None
        self.queue = queue
        self.timeout = timeout
        self._on_ack = on_ack
        self._destination = destination
        self.direct = direct and destination is not None
        self._targets_owner = targets_owner  # the object whose identity keeps direct targets valid
        # loop side: the next manifest entry expected, and how many of its bytes came already
        self.next_seq = 0
        self._cursor = 0
        self._cursor_bytes = 0
        # consumer side
        self._applied = 0
        self.touched = False  # something was handed to load_weights or written in place
        self._last_given: str | None = None
        # the bucket being handed over at C speed: per batch (its names, their iterator), and how
        # many of them ``applied`` counted already
        self._giving: tuple[list[tuple[list[str], Iterator[str]]], int] | None = None
        self.finished = False
        self._partial: dict[str, tuple[Any, bool]] = {}
        self._scratch = scratch if domain == "host" else None
        self._scratch_given: list[np.ndarray] = []  # pool scratch yielded in the bucket being consumed
        self._in_place_done: tuple[int, np.ndarray] | None = None  # the chunked tensor last completed in place
        self._ties: dict[int, int] = {}  # direct mode: tensors tied in this model, sent apart (set by iterate)
        self._alias_dests: dict[str, np.ndarray | None] = {}
        # set by the daemon
        self.applied_ok = False  # every byte applied (staged: held); PREPARED went out
        self.commit_started = False  # COMMIT arrived: the version is decided, never aborted now
        self.held: list[tuple[str, Any]] | None = None  # staged: the version's copies until COMMIT
        self.swap_task: Any = None  # staged: the load_weights call COMMIT started
        self.prepared_seconds = 0.0
        self.started = 0.0
        # when the served model began to change: the first bucket handed to it (in place), or the
        # staged swap at COMMIT; None while it is untouched
        self.changing_since: float | None = None
        self.aborted = False  # ended by the sender's ABORT (or a newer BEGIN), not by this rank's own error
        self.staged = staged
        self.streamed = streamed and self.direct
        self.stream_index = stream_index
        self.check: Callable[[], None] = queue.check  # raises once the version was aborted
        # how buckets reach the model, chosen once for the whole version
        self.applier: Applier = choose_applier(self, direct=self.direct and domain == "host", streamed=self.streamed)

    # --- loop side -----------------------------------------------------------------------

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return self.manifest.shapes

    def prepare(self, msg: m.Bucket, slot: ImportedSlot) -> PreparedBucket:
        if msg.seq != self.next_seq:
            raise ProtocolError(f"BUCKET: field 'seq': expected {self.next_seq}, got {msg.seq}")
        if msg.seq >= self.num_buckets:
            raise ProtocolError(f"BUCKET: field 'seq': version {self.version!r} has {self.num_buckets} buckets, got seq {msg.seq}")
        self.applier.check(msg, slot)
        if msg.count is None:
            offsets, nbytes, chunks = msg.arrays()
            first = self._advance(msg, offsets, nbytes, chunks)
        else:
            offsets, nbytes, chunks = self.manifest.packed_entries(msg, self.alignment, slot.size)
            first = self._advance_whole(msg)
        self.next_seq += 1
        n = len(offsets)
        used = int((offsets + nbytes).max()) if n else 0
        prepared = self.applier.prepare(msg, slot, first, offsets, nbytes, chunks, used)
        prepared.pieces = (offsets, nbytes)
        return prepared

    def _advance(self, msg: m.Bucket, offsets: np.ndarray, nbytes: np.ndarray, chunks: np.ndarray) -> int:
        """Check that the bucket continues the manifest in order; return its first manifest index."""
        first, done, n = self._cursor, self._cursor_bytes, len(offsets)
        names = self.names
        if msg.first != first:
            want = f"{first} ({names[first][:80]!r})" if first < len(names) else f"{first} (the end)"
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'first': expected manifest index {want}, got {msg.first} "
                "(buckets carry the BEGIN manifest in order; duplicate, missing or out-of-order bucket)"
            )
        if n == 0:
            return first
        end = first + n
        if end > len(names):
            raise ProtocolError(
                f"BUCKET {msg.seq}: {n} entries from manifest index {first} run past the {len(names)} tensors "
                f"of {self.version!r}"
            )
        # Each piece must start where the tensor's bytes left off (only the first may continue a
        # chunked tensor), every piece but the last must finish its tensor, and a piece is empty
        # only for an empty tensor.
        sizes = self.manifest.sizes[first:end]
        starts = np.zeros(n, np.int64)
        starts[0] = done
        rest = sizes - starts
        bad = (chunks != starts) | (nbytes > rest) | ((nbytes == 0) & (sizes != 0))
        bad[:-1] |= nbytes[:-1] != rest[:-1]
        if bad.any():
            k = int(np.argmax(bad))
            want_start = done if k == 0 else 0
            raise ProtocolError(
                f"BUCKET {msg.seq}: tensor {names[first + k][:80]!r}: expected its bytes from offset {want_start} on "
                f"{'to its end ' if k < n - 1 else ''}(of {self.fulls[first + k]}), got a {int(nbytes[k])}-byte piece "
                f"at {int(chunks[k])} (duplicate, missing or out-of-order piece)"
            )
        last_done = int(chunks[-1] + nbytes[-1])
        if last_done == self.fulls[end - 1]:
            self._cursor, self._cursor_bytes = end, 0
        else:
            self._cursor, self._cursor_bytes = end - 1, last_done
        return first

    def _advance_whole(self, msg: m.Bucket) -> int:
        """``_advance`` for a packed bucket: whole tensors by construction, so it only has to
        start at the next tensor (packed_entries checked that they exist)."""
        first = self._cursor
        if msg.first != first or self._cursor_bytes:
            want = f"{first} ({self.names[first][:80]!r})" if first < len(self.names) else f"{first} (the end)"
            if self._cursor_bytes:
                want += f" from byte {self._cursor_bytes} (its first chunks came already)"
            raise ProtocolError(
                f"BUCKET {msg.seq}: field 'first': expected manifest index {want}, got {msg.first} with count={msg.count} "
                "whole tensors (buckets carry the BEGIN manifest in order; duplicate, missing or out-of-order bucket)"
            )
        self._cursor = first + (msg.count or 0)
        return first

    def entry(self, slot: ImportedSlot, index: int, offset: int, nbytes: int, chunk: int) -> tuple[str, Any, int]:
        name = self.names[index]
        data = slot.raw(offset, nbytes)
        if chunk or nbytes != self.fulls[index]:
            return name, data, chunk
        return name, self.view(slot, data, self.dtypes[index], self.shapes[index]), -1

    def batch_views(
        self, slot: ImportedSlot, first: int, offsets: np.ndarray, nbytes: np.ndarray, chunks: np.ndarray, used: int
    ) -> list[tuple[list[str], Any]] | None:
        """A bucket of whole tensors in host memory as batches of (names, their views), or None (a
        chunk piece, or device memory: :meth:`entry` per piece). Consecutive tensors of one dtype
        and shape at equal steps are one batch, whose views the framework makes as the consumer
        takes them (``views``): at 100k small tensors, a view made apiece and kept until its
        bucket is done costs as much as the engine's own loop."""
        n = len(offsets)
        if slot.domain != "host" or not n or chunks.any():
            return None
        end = first + n
        if not np.array_equal(nbytes, self.manifest.sizes[first:end]):
            return None
        kinds = self.manifest.kinds[first:end]
        cut = np.ones(n, dtype=bool)  # where a batch starts
        steps = np.diff(offsets)
        if n > 1:
            cut[1:] = (kinds[1:] != kinds[:-1]) | (kinds[1:] < 0)
            cut[2:] |= steps[1:] != steps[:-1]
        starts = np.flatnonzero(cut).tolist()
        starts.append(n)
        names, codes, shapes, buf = self.names, self.dtypes, self.shapes, slot.raw(0, used)
        views, one, keeper = self._host_views, self._host_view, self._kept_views
        batches: list[tuple[list[str], Any]] = []
        for a, b in itertools.pairwise(starts):
            index, at = first + a, int(offsets[a])
            if b - a == 1:
                batches.append(([names[index]], (one(buf[at : at + int(nbytes[a])], DTYPES[codes[index]], shapes[index]),)))
            else:
                step = int(steps[a])
                rows = views(buf, DTYPES[codes[index]], shapes[index], b - a, at, step)
                batches.append((names[index : first + b], rows if keeper is None else keeper.views(slot, rows, at, step)))
        return batches

    def view(self, slot: ImportedSlot, data: Any, code: int, shape: tuple[int, ...]) -> Any:
        """Tensor bytes as the framework's typed view: host bytes without a check (the hot path for
        many small tensors), device bytes through the slot."""
        if slot.domain == "host":
            return self._host_view(data, DTYPES[code], shape)
        return slot.typed(self.framework, data, DTYPES[code], tuple(shape))

    # --- consumer side -----------------------------------------------------------------

    def iterate(self) -> Iterator[tuple[str, Any]]:
        """What ``load_weights`` gets: each bucket's items in turn. The chain takes a bucket's
        items at C speed (a bucket of views is its batches zipped with their names); the generator behind it runs once
        per bucket, when the consumer asks for the item after the bucket's last (then the bucket
        is acked)."""
        return itertools.chain.from_iterable(self._buckets())

    def _buckets(self) -> Iterator[Iterator[tuple[str, Any]]]:
        # this run's ties, from the model as it is now (a reused manifest keeps the last run's
        # targets until the model's specs object changes): before any bucket, chunk pieces included
        self._ties = {}
        if self.direct and self._destination is not None:
            self.manifest.targets(self._destination, self._targets_owner)
            self._ties = self.manifest.tie_of
        for _ in range(self.num_buckets):
            bucket: PreparedBucket = self.queue.get(self.timeout)
            if bucket.checksum is not None:
                got = bucket.mapping.digest(bucket.used)
                if got != bucket.checksum:  # checked before any byte of the bucket is applied
                    raise VersionAborted(
                        f"bucket {bucket.seq} of {self.version!r} failed its checksum (expected {bucket.checksum:#018x}, "
                        f"got {got:#018x}): the slot was overwritten or corrupted in transit; the version was not committed"
                    )
            if self.changing_since is None and not self.staged:
                self.changing_since = time.perf_counter()
            yield self.applier.apply(bucket)
            self._settle()  # the consumer took every item of the bucket
            self._giving = None
            if self._scratch is not None:  # its views are invalid now: the next large tensor may reuse them
                for buf in self._scratch_given:
                    self._scratch.give(buf)
                self._scratch_given.clear()
            bucket.mapping.sync()  # e.g. a CUDA stream sync: copies out of the slot must be complete
            if bucket.checksum is not None:
                self._check_unchanged(bucket)
            self._on_ack(bucket.seq, bucket.slot)
        self.finished = True

    def targets(self) -> tuple[list[Any], np.ndarray | None]:
        """Direct mode: every tensor's destination in the model (None: none), and their addresses
        for the C copy (None without it)."""
        if self._destination is None:
            raise VersionAborted(f"version {self.version!r}: direct mode without the sink's destinations")
        return self.manifest.targets(self._destination, self._targets_owner)

    def landing(self, bucket: PreparedBucket) -> Callable[[int, int], np.ndarray | None] | None:
        """Direct mode over a network transport: where a whole tensor of ``bucket`` may be received
        straight into the model (its destination's memory, by address), skipping the slot and the
        copy out of it; marks ``bucket.landed``. None when this run copies nothing itself."""
        if type(self.applier) is not Direct or bucket.whole is None:
            return None
        _, addresses = self.targets()
        if addresses is None:
            return None
        first, offsets = bucket.whole
        sizes, aliased = self.manifest.sizes, self.manifest.aliases_of
        landed = bucket.landed = np.zeros(len(offsets), dtype=bool)

        def into(start: int, nbytes: int) -> np.ndarray | None:
            k = int(np.searchsorted(offsets, start))
            if k >= len(offsets) or int(offsets[k]) != start or int(sizes[first + k]) != nbytes:
                return None
            address = int(addresses[first + k])
            if not address or first + k in aliased:  # an alias is delivered from the slot's bytes
                return None
            self.touched = True  # the model's own memory is written from here on
            landed[k] = True
            return np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(address))

        return into

    @property
    def ties(self) -> dict[int, int]:
        """Tensors tied in this rank's model but sent apart (manifest index -> its twin), this run."""
        return self._ties

    def deliver(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        """A bucket's entries: typed views to hand over, chunk pieces to assemble (in place or in
        scratch), tied and aliased names resolved. A bucket of whole tensors with nothing tied goes
        out at C speed, its batches zipped with their names: what ``applied`` and ``last_given``
        would count item by item is read off the names' iterators when asked (:meth:`_settle`)."""
        batches = bucket.batches
        if batches is not None and not (self.manifest.aliases_of or self._ties):
            if not self.staged:
                self.touched = True  # load_weights gets them now: the model may change from here on
            taking = [(names, iter(names)) for names, _ in batches]
            self._giving = (taking, 0)
            return itertools.chain.from_iterable(map(zip, (it for _, it in taking), (views for _, views in batches)))
        return self._deliver_entries(bucket)

    def _deliver_entries(self, bucket: PreparedBucket) -> Iterator[tuple[str, Any]]:
        linked = self.manifest.aliases_of or self._ties
        if bucket.batches is not None:
            bucket.entries = [(name, data, -1) for names, views in bucket.batches for name, data in zip(names, views)]
        for name, data, chunk in bucket.entries:
            if chunk >= 0:
                data = self.write_piece(bucket.mapping, name, data, chunk)
                if data is None:  # held in scratch until complete, or written in place
                    done = self._in_place_done
                    if done is not None and linked:
                        self._in_place_done = None
                        yield from self.alias_deliveries(bucket.mapping, *done)
                    continue
            if linked:
                index = self._index_of(name)
                if index in self._ties:
                    self.check_tie(index, self._bytes_of(data))
                    self._applied += 1
                    continue
            if not self.staged:
                self.touched = True  # load_weights gets it: the model may change from here on
            self._last_given = name
            yield name, data
            self._applied += 1
            if linked and index in self.manifest.aliases_of:
                yield from self.alias_deliveries(bucket.mapping, index, self._bytes_of(data), data)

    def _settle(self) -> None:
        """Count what ``load_weights`` took so far of the pairs being handed over."""
        if self._giving is None:
            return
        taking, counted = self._giving
        taken, last = 0, None
        for names, left in taking:
            k = len(names) - operator.length_hint(left)
            taken += k
            if k:
                last = names[k - 1]
            if k < len(names):
                break
        if taken > counted:
            self._applied += taken - counted
            self._last_given = last
            self._giving = (taking, taken)

    @property
    def applied(self) -> int:
        """Tensors applied (given to load_weights, written in place, or checked as a tie) so far."""
        self._settle()
        return self._applied

    @applied.setter
    def applied(self, value: int) -> None:
        self._settle()
        self._applied = value

    @property
    def last_given(self) -> str | None:
        """The tensor load_weights was given last (named when it raises)."""
        self._settle()
        return self._last_given

    @last_given.setter
    def last_given(self, name: str | None) -> None:
        self._settle()
        self._last_given = name

    def _check_unchanged(self, bucket: PreparedBucket) -> None:
        """The digest again, once the consumer moved past the bucket and before its ACK: the
        first check covers what arrived, this one what was copied out (a writer that changed
        the slot between the two would otherwise commit corrupt tensors as intact)."""
        got = bucket.mapping.digest(bucket.used)
        if got != bucket.checksum:
            raise VersionAborted(
                f"bucket {bucket.seq} of {self.version!r} changed while it was being applied (checksum "
                f"{bucket.checksum:#018x} before, {got:#018x} after): something wrote into the slot before this "
                "rank acked it, so what was copied may be corrupt; the version was not committed. Look for another "
                "process writing into the sender's slots"
            )

    # --- tied weights -------------------------------------------------------------------

    def _index_of(self, name: str) -> int:
        if not self._index:
            self._index = {n: i for i, n in enumerate(self.names)}
        return self._index[name]

    @staticmethod
    def _bytes_of(data: Any) -> np.ndarray:
        """A yielded tensor's bytes as flat uint8 (host memory)."""
        found = bytes_view(data)
        return found if found is not None else host_bytes(data)

    def _alias_dest(self, name: str, full: int) -> np.ndarray | None:
        """Where an alias's bytes go in this rank's model (None: it gets a view instead)."""
        if name not in self._alias_dests:
            dest = None
            if self._destination is not None and not self.staged:
                found = self._destination(name)
                if found is not None and found.nbytes == full and found.dtype == np.uint8:
                    dest = found
            self._alias_dests[name] = dest
        return self._alias_dests[name]

    def alias_deliveries(
        self, slot: ImportedSlot, index: int, raw: np.ndarray, view: Any = None
    ) -> Iterator[tuple[str, Any]]:
        """The sender's aliases of tensor ``index`` (its bytes ``raw``): a model that ties them to
        the same memory needs nothing more; one that has a separate place gets a copy; otherwise
        load_weights gets the tensor again under the alias's name."""
        full = self.fulls[index]
        primary = self._alias_dest(self.names[index], full) if self.direct else None
        for alias in self.manifest.aliases_of.get(index, ()):
            dest = self._alias_dest(alias, full)
            if dest is not None and slot.domain == "host":
                if primary is None or address_of(dest) != address_of(primary):
                    np.copyto(dest, raw)
                continue
            self.last_given = alias
            yield alias, view if view is not None else self.view(slot, raw, self.dtypes[index], self.shapes[index])

    def check_tie(self, index: int, raw: np.ndarray) -> None:
        """Tensor ``index`` shares its memory with ``tie_of[index]`` in this model but came apart:
        one write is enough if the bytes agree; different values cannot both be served."""
        twin = self._ties[index]
        dest = self._alias_dest(self.names[twin], self.fulls[twin])
        if dest is None or np.array_equal(dest, raw):
            return
        raise ManifestMismatch(
            f"tensors {self.names[twin]!r} and {self.names[index]!r} are one tensor in this rank's model (tied "
            "weights) but the trainer sent them with different values; fix: tie them in the trainer too (send one, "
            "or the same tensor under both names), or untie them in the inference model"
        )

    def write_piece(
        self, slot: ImportedSlot, name: str, data: Any, chunk: int, ring: tuple[StreamRead, int, int] | None = None
    ) -> Any | None:
        """Write a chunk into its destination; return a view to yield once complete. From a
        streamed bucket, ``ring`` is (the read, the piece's offset, its bytes) and ``data`` is None."""
        if not self._index:
            self._index = {n: i for i, n in enumerate(self.names)}
        index = self._index[name]
        code, shape, full = self.dtypes[index], self.shapes[index], self.fulls[index]
        held = self._partial.get(name)
        if held is None:
            destination = self._destination
            usable = (
                destination is not None and slot.domain == "host" and not self.staged
                and index not in self._ties  # compared with its twin once complete, never written
            )
            dest = destination(name) if usable and destination is not None else None
            if dest is not None and dest.nbytes == full and dest.dtype == np.uint8:
                held = (dest, True)  # the model's own memory: no full-size temporary
            else:
                held = (self._scratch.take(full) if self._scratch is not None else slot.scratch(full), False)
            self._partial[name] = held
        buf, in_place = held
        if in_place:
            self.touched = True  # the model's own memory is written from here on
        if ring is None:
            slot.copy(buf, chunk, data)
            end = chunk + data.nbytes
        else:
            read, offset, nbytes = ring
            read.copy_out(buf, chunk, offset, nbytes, slot.streams and in_place)
            end = chunk + nbytes
        if end < full:
            return None
        del self._partial[name]
        if in_place:
            self.applied += 1
            self._in_place_done = (index, buf)  # its aliases, if any, are delivered from the model's bytes
            return None
        if self._scratch is not None:
            self._scratch_given.append(buf)
        return slot.typed(self.framework, buf, DTYPES[code], tuple(shape))

    @property
    def complete(self) -> bool:
        return self.finished and self.applied == self.total_tensors
