"""What the c10d collectives (``gloo``, ``nccl``) share: each bucket is one broadcast from the
sender (rank 0 of the group) to every rank of the push, through a process group made for the
push from a ``TCPStore`` the sender hosts. Never the process's default group: the engine in a
rank owns that one.

::

    sender                                         rank (each)
    TCPStore (master) at data_address             (nothing until a push)
    begin_push: new group id G, each rank's index
      in the store; builds its side of G (thread)
    BEGIN transport={store, group: G, world, fresh} -> join: builds its side of G (thread)
    per bucket: broadcast(slot[:used]) (async)  ...  receive thread: broadcast into slot[:used], wait
    BUCKET on control ->                             (then slices and applies it, ACK)
    push ok: G is kept while the ranks are the same   COMMIT: G kept
    push failed: G aborted, the next push builds G'   ABORT/failure: G aborted

A group is rebuilt only after a failure or when the ranks change. Every wait (the group's
rendezvous, each broadcast) is bounded and stops as soon as the version failed; a rank that
dies mid-broadcast makes the others' broadcast fail at once (gloo sees the connection close),
the control plane aborts the version, and both sides drop the group.

c10d has no authentication: anyone who reaches the store or a member's port can join or feed
a group. These transports are offered and used only with ``insecure=True``, on a network you
trust.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
from collections.abc import Callable
from typing import Any

from ...deadline import Deadline
from ..errors import ConfigError, PeerTimeout, ProtocolError, TransportError
from .base import ExportContext, ImportContext, address_toward, transfer_spans


def c10d() -> Any:
    """torch.distributed, imported when a group is first needed (a rank that offers gloo but is
    served by shm never pays for it). Typed Any: torch's stubs leave the c10d classes unexported."""
    import torch.distributed

    return torch.distributed

log = logging.getLogger("weightstream.transport.c10d")

POLL_S = 0.1  # how often a wait looks at whether its version failed


def wait_done(done: threading.Event, check: Callable[[], None], timeout: float, what: str) -> None:
    """Wait for ``done``, giving up once ``check`` raises or after ``timeout``."""
    deadline = Deadline(timeout)
    while not done.wait(min(POLL_S, max(deadline.left(), 0.0))):
        check()
        if deadline.expired():
            raise PeerTimeout(f"timed out after {timeout:.1f}s waiting for {what}")


def wait_work(work: Any, check: Callable[[], None], timeout: float, what: str) -> None:
    """Wait for a c10d work item, bounded and abandoned once the version failed; its own error typed."""
    done = threading.Event()
    work.get_future().add_done_callback(lambda _fut: done.set())
    wait_done(done, check, timeout, what)
    try:
        work.wait()
    except RuntimeError as exc:  # gloo/nccl say what broke (a peer closed, a timeout)
        raise TransportError(f"{what} failed: {str(exc)[:400]}") from None


class Build:
    """A group being built on its own thread (the rendezvous waits for every member)."""

    def __init__(self, make: Callable[[], Any], what: str) -> None:
        self.what = what
        self.group: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(make,), name="weightstream-c10d-build", daemon=True).start()

    def _run(self, make: Callable[[], Any]) -> None:
        try:
            group = make()
            if self.cancelled:  # the push failed while it was being built: nobody will use it
                abort_group(group)
            else:
                self.group = group
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    def wait(self, check: Callable[[], None], timeout: float) -> Any:
        wait_done(self._done, check, timeout, self.what)
        if self.error is not None:
            raise TransportError(f"{self.what} failed: {str(self.error)[:400]}") from None
        return self.group

    def drop(self) -> None:
        self.cancelled = True
        if self._done.is_set() and self.group is not None:
            abort_group(self.group)
            self.group = None


def abort_group(group: Any) -> None:
    """End a group now: its members' pending operations fail instead of waiting out a timeout."""
    try:
        group.abort()
    except Exception as exc:  # some backends/versions have no abort: dropping it closes the connections
        log.debug("c10d group abort: %s", exc)


def make_group(backend: str, store: Any, group_id: str, index: int, world: int, address: str, timeout: float) -> Any:
    dist = c10d()
    prefixed = dist.PrefixStore(f"weightstream/{group_id}", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = datetime.timedelta(seconds=timeout)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return dist.ProcessGroupGloo(prefixed, index, world, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = datetime.timedelta(seconds=timeout)
    return dist.ProcessGroupNCCL(prefixed, index, world, options)


# --- sender ----------------------------------------------------------------------------------


class C10dExported:
    """The sender's store, its group of the current ranks, and its slots (made by the transport)."""

    def __init__(self, backend: str, slots: list[Any], context: ExportContext, direct_min: int = 0) -> None:
        if not context.insecure:
            raise ConfigError(
                f"transport={backend!r}: c10d has no authentication (anyone reaching the store or a member's port can "
                "join or feed the group); expected insecure=True, got False; fix: insecure=True on a trusted network, "
                "or transport='tcp' with CURVE keys"
            )
        self.backend = backend
        self.slots = slots
        self.direct_min = 0 if context.checksum else direct_min  # see transfer_spans
        bind = context.data_host if context.data_host not in ("", "*") else "0.0.0.0"
        # what the store is announced as, and where the sender's member of a group listens
        self.address = address_toward(None) if bind == "0.0.0.0" else address_toward(bind) if bind == "localhost" else bind
        try:
            self._store: Any = c10d().TCPStore(
                bind, context.data_port, None, True, timeout=datetime.timedelta(seconds=context.heartbeat_timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, ValueError) as exc:
            raise TransportError(
                f"transport={backend!r}: could not start its TCPStore at {bind}:{context.data_port or '<any port>'} "
                f"({exc}); fix: data_address= an address of this host with a free port"
            ) from exc
        self._rendezvous = context.heartbeat_timeout
        self._build: Build | None = None
        self._members: tuple[tuple[int, str], ...] = ()
        self._healthy = False  # the last push through the group went well: the next may reuse it
        self._check: Callable[[], None] = lambda: None
        self._timeout = 60.0

    def descriptors(self) -> list[dict[str, Any]]:
        return [{"size": slot.size, "direct": self.direct_min} for slot in self.slots]

    def begin_push(self, ranks: dict[int, str], check: Callable[[], None], timeout: float) -> dict[str, Any] | None:
        self._check, self._timeout = check, timeout
        members = tuple(sorted(ranks.items()))
        fresh = not (self._build is not None and self._healthy and members == self._members)
        if fresh:
            self._drop()
            group_id = secrets.token_hex(8)
            world = len(members) + 1
            for index, (rank, token) in enumerate(members, start=1):  # only that daemon finds its place
                self._store.set(f"weightstream/{group_id}/member/{rank}/{token}", str(index))
            self._members, self._group_id = members, group_id
            self._build = Build(
                lambda: make_group(self.backend, self._store, group_id, 0, world, self.address, timeout),
                f"{self.backend}: the group of ranks {[r for r, _ in members]} to form",
            )
        self._healthy = False
        return {
            "store": f"{self.address}:{self._store.port}", "group": self._group_id, "world": len(members) + 1,
            "fresh": fresh, "timeout": float(timeout),
        }

    def broadcast(self, ranges: list[Any], seq: int) -> list[Any]:
        """Start bucket ``seq``'s broadcasts, one per range (a tensor: a part of the slot, or a large
        tensor's own memory); the works, to wait on before the slot is written again (they hold
        the tensors)."""
        if not ranges:  # both sides skip an empty bucket
            return []
        build = self._build
        if build is None:
            raise TransportError(f"{self.backend}: bucket {seq} outside a push")
        group = build.wait(self._check, self._timeout)
        limit = datetime.timedelta(seconds=self._timeout)
        return [(group.broadcast(tensor, 0, timeout=limit), tensor) for tensor in ranges]

    def settle(self, works: list[Any], seq: int) -> None:
        for work, _tensor in works:
            wait_work(work, self._check, self._timeout, f"{self.backend}: broadcast of bucket {seq}")

    def end_push(self, ok: bool) -> None:
        if ok:
            for slot in self.slots:
                slot.settle()
            self._healthy = True
        else:
            for slot in self.slots:
                slot.works = []
            self._drop()

    def _drop(self) -> None:
        if self._build is not None:
            self._build.drop()
            self._build = None
        self._healthy = False

    def close(self) -> None:
        self._drop()
        for slot in self.slots:
            slot.close()
        self._store = None


class C10dSlotWriting:
    """A sender slot's part in the broadcasts (mixed into each backend's slot class, before the
    class that writes the slot's memory)."""

    exported: C10dExported
    tensor: Any  # the slot's memory as a torch tensor (what the group broadcasts)
    works: list[Any]
    _seq = 0

    def writer(self, bucket: Any, layout: Any, stream: Any) -> Any:
        self.settle()  # its last broadcasts are done before the slot is written again
        self._seq = bucket.seq
        return super().writer(bucket, layout, stream)  # type: ignore[misc]

    def settle(self) -> None:
        works, self.works = getattr(self, "works", []), []
        self.exported.settle(works, self._seq)

    def send(self, ranges: list[Any]) -> None:
        self.works = self.exported.broadcast(ranges, self._seq)


# --- rank ------------------------------------------------------------------------------------


def _fields(backend: str, fields: dict[str, Any] | None) -> tuple[str, int, str, int, bool, float]:
    f = fields or {}
    store, group, world, fresh, timeout = f.get("store"), f.get("group"), f.get("world"), f.get("fresh"), f.get("timeout")
    host, _, port = store.rpartition(":") if isinstance(store, str) else ("", "", "")
    if (
        not host or not (port.isascii() and port.isdigit()) or not isinstance(group, str) or not 0 < len(group) <= 64
        or type(world) is not int or not 2 <= world <= 1 << 20 or type(fresh) is not bool
        or type(timeout) is not float or not 0 < timeout <= 86400 or len(f) != 5
    ):
        raise ProtocolError(
            f"BEGIN: field 'transport': expected {{store: 'host:port', group, world >= 2, fresh, timeout}} for transport "
            f"{backend!r}, got {fields!r}"
        )
    return host, int(port), group, world, fresh, timeout


class C10dImported:
    """A rank's receive slots and its side of the push's group."""

    def __init__(self, backend: str, slots: list[Any], context: ImportContext, direct_min: int = 0) -> None:
        if not context.insecure:
            raise TransportError(
                f"transport {backend!r}: c10d has no authentication, so this rank joins a group only with insecure=True; "
                "fix: ReceiverDaemon(insecure=True) on a trusted network, or have the sender use transport='tcp'"
            )
        self.backend = backend
        self.slots = slots
        self.direct_min = direct_min  # the sender's (WELCOME): both sides derive the same ranges
        self._rank = context.rank
        self._token = context.token
        self._toward = context.sender_host
        self._build: Build | None = None
        self._group_id = ""
        self._timeout = 60.0

    def join(self, fields: dict[str, Any] | None, timeout: float) -> None:
        host, port, group_id, world, fresh, push_timeout = _fields(self.backend, fields)
        self._timeout = push_timeout
        if not fresh:
            if self._build is None or self._group_id != group_id:
                raise TransportError(
                    f"{self.backend}: the sender reuses group {group_id}, this rank holds {self._group_id or 'none'}; "
                    "this push fails, and the next one builds a new group"
                )
            return
        self._drop()
        self._group_id = group_id
        rank, token, address = self._rank, self._token, address_toward(self._toward or host)

        def make() -> Any:
            store = c10d().TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout))
            index = int(store.get(f"weightstream/{group_id}/member/{rank}/{token}"))
            return make_group(self.backend, store, group_id, index, world, address, push_timeout)

        self._build = Build(make, f"{self.backend}: rank {rank} joining group {group_id} at {host}:{port}")

    def receive(
        self, slot: Any, seq: int, pieces: tuple[Any, Any] | None, used: int, check: Callable[[], None],
        timeout: float, into: Any = None,
    ) -> None:
        """Bucket ``seq``'s ranges (as the sender derives them from the same pieces) into the slot's
        ``memory`` (a torch tensor), one broadcast each; a direct range straight into ``into``'s
        memory (a host tensor's, in the model) when it gives one."""
        tensor = slot.memory
        spans = transfer_spans(pieces, used, self.direct_min)
        if not spans:
            return
        build = self._build
        if build is None:
            raise TransportError(f"{self.backend}: bucket {seq} before the push's BEGIN joined a group")
        group = build.wait(check, self._timeout)
        limit = datetime.timedelta(seconds=self._timeout)
        works = []
        for start, stop, direct in spans:
            land = into(start, stop - start) if direct and into is not None else None
            target = tensor[start:stop] if land is None else torch_from(land)
            works.append(group.broadcast(target, 0, timeout=limit))
        for work in works:
            wait_work(work, check, min(timeout, self._timeout), f"{self.backend}: rank {self._rank}: broadcast of bucket {seq}")

    def leave(self, ok: bool) -> None:
        if not ok:
            self._drop()

    def _drop(self) -> None:
        if self._build is not None:
            self._build.drop()
            self._build = None
        self._group_id = ""

    def close(self) -> None:
        self._drop()
        for slot in self.slots:
            slot.close()


def torch_from(array: Any) -> Any:
    """A torch tensor over a NumPy array's memory (no copy)."""
    import torch

    return torch.from_numpy(array)


def torch_zeros(size: int, device: str = "cpu") -> Any:
    import torch

    return torch.zeros(size, dtype=torch.uint8, device=device)
