"""The cuda_ipc transport.

CPU part (runs everywhere): the wire descriptor of a slot (64 raw handle bytes, size,
device UUID, pid) and its validation, the error texts, and that the transport is
refused with a clear TransportError where CUDA is unusable.

GPU part (``-m gpu``, skipped without a usable GPU; ``bash bench/gpu_check.sh OUTDIR`` runs
it on the GPU machine): real spawned receiver processes with torch modules on CUDA, every
wire dtype bit-exact through 2 ranks over 3 versions, no handle re-opened after the first
version, GPU memory back to its baseline after 20 update cycles, the device digest against
its formula computed on the host, and ``checksum=True`` end to end (matching digests commit,
a wrong one aborts the version with the model intact).
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from typing import Any

import pytest

from weightstream.protocol import messages as m
from weightstream.protocol.dtypes import DTYPES as WIRE_DTYPES
from weightstream.protocol.errors import TransportError, WeightstreamError
from weightstream.protocol.transports import available_transports, get_transport
from weightstream.protocol.transports.cuda_ipc.wire import (
    HANDLE_BYTES,
    cuda_error_message,
    decode_descriptor,
    device_identity,
    encode_descriptor,
    expandable_segments_note,
    format_uuid,
)

pytestmark = pytest.mark.timeout(60)

UUID = "GPU-0123abcd-4567-89ef-0123-456789abcdef"
HANDLE = bytes(range(HANDLE_BYTES))


def _cuda_usable() -> bool:
    try:
        import weightstream.protocol.transports.cuda_ipc.slots  # noqa: F401
    except ImportError:
        return False
    return True


# --- CPU: descriptors ------------------------------------------------------------------------


def test_descriptor_round_trips_through_the_wire_codec() -> None:
    desc = encode_descriptor(HANDLE, 256 << 20, UUID, 4242)
    assert desc == {"handle": HANDLE, "size": 256 << 20, "device": UUID, "pid": 4242}
    welcome = m.Welcome(
        session="s" * 16,
        transport="cuda_ipc",
        bucket_bytes=256 << 20,
        alignment=256,
        slots=[desc, encode_descriptor(b"\xff" * HANDLE_BYTES, 1, UUID, 1)],
        heartbeat_interval=1.0,
        heartbeat_timeout=10.0,
        pid=4242,
    )
    back = m.decode(m.encode(welcome))
    assert isinstance(back, m.Welcome)
    got = decode_descriptor(back.slots[0])
    assert got.handle == HANDLE and type(got.handle) is bytes  # raw bytes, not a list or str
    assert (got.size, got.device, got.pid) == (256 << 20, UUID, 4242)
    assert decode_descriptor(back.slots[1]).handle == b"\xff" * HANDLE_BYTES


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"handle": HANDLE[:63]}, "64 raw bytes, got 63 bytes"),
        ({"handle": HANDLE + b"\0"}, "64 raw bytes, got 65 bytes"),
        ({"handle": list(HANDLE)}, "64 raw bytes, got list"),
        ({"handle": HANDLE.hex()}, "64 raw bytes, got str"),
        ({"size": 0}, "'size' must be an int"),
        ({"size": -5}, "'size' must be an int"),
        ({"size": 1.5}, "'size' must be an int"),
        ({"size": True}, "'size' must be an int"),
        ({"size": 1 << 50}, "'size' must be an int"),
        ({"device": "0"}, "GPU UUID"),
        ({"device": 0}, "GPU UUID"),
        ({"device": "GPU-" + "x" * 100}, "GPU UUID"),
        ({"pid": 0}, "'pid' must be a positive int"),
        ({"pid": "12"}, "'pid' must be a positive int"),
    ],
)
def test_bad_descriptors_are_refused_with_what_was_expected(change: dict[str, Any], expected: str) -> None:
    desc = {"handle": HANDLE, "size": 4096, "device": UUID, "pid": 7} | change
    with pytest.raises(TransportError, match=expected.replace("(", r"\(")):
        decode_descriptor(desc)


@pytest.mark.parametrize("desc", [None, [HANDLE, 1], "slot", {"handle": HANDLE, "size": 1, "device": UUID}])
def test_malformed_descriptors_are_transport_errors(desc: Any) -> None:
    with pytest.raises(TransportError, match="cuda_ipc slot descriptor"):
        decode_descriptor(desc)


def test_uuid_is_formatted_like_nvidia_smi() -> None:
    assert format_uuid(bytes.fromhex("0123abcd456789ef0123456789abcdef")) == UUID
    with pytest.raises(TransportError, match="16 bytes"):
        format_uuid(b"\0" * 15)


def test_error_messages_name_the_cuda_error_and_the_fix() -> None:
    cudart = pytest.importorskip("cuda.bindings.runtime")
    for name, fix in [
        ("cudaErrorInsufficientDriver", "driver"),
        ("cudaErrorNoDevice", "CUDA_VISIBLE_DEVICES"),
        ("cudaErrorDeviceUninitialized", "second process"),
        ("cudaErrorMapBufferObjectFailed", "--ipc=host"),
        ("cudaErrorNotSupported", "transport='shm'"),
    ]:
        assert hasattr(cudart.cudaError_t, name), name  # the names exist in the installed bindings
        msg = cuda_error_message("cudaIpcOpenMemHandle", name, "text")
        assert msg.startswith(f"cudaIpcOpenMemHandle failed: {name} (text); fix: ") and fix in msg


def test_expandable_segments_is_explained_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert expandable_segments_note() is None
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128, expandable_segments:True")
    note = expandable_segments_note()
    assert note is not None and "plain cudaMalloc" in note


# --- CPU: the transport is refused where CUDA is unusable -------------------------------------


def test_transport_is_refused_with_the_reason_without_a_gpu() -> None:
    if _cuda_usable():
        pytest.skip("CUDA is usable here")
    with pytest.raises(TransportError, match="cuda_ipc' is unavailable here") as info:
        get_transport("cuda_ipc")
    text = str(info.value)
    assert "cuda-bindings is not installed" in text or "fix:" in text
    assert "cuda_ipc" not in available_transports() and "shm" in available_transports()
    assert device_identity() == ""


def test_sender_refuses_cuda_ipc_without_a_gpu(endpoint: str) -> None:
    if _cuda_usable():
        pytest.skip("CUDA is usable here")
    from weightstream import BucketSender

    with pytest.raises(TransportError, match="cuda_ipc"):
        BucketSender(endpoint, transport="cuda_ipc")


# --- GPU: real processes -----------------------------------------------------------------------

CTX = mp.get_context("spawn")
DTYPES = [d.name for d in WIRE_DTYPES]  # every dtype the wire carries, so a new one is tested too
BUCKET = 64 << 10  # small: several buckets per version and one chunked tensor


def _gpu_model_specs() -> dict[str, tuple[str, tuple[int, ...]]]:
    # "t.x_<dtype>": a bare dtype name would clash with nn.Module's methods (.bfloat16(), .half())
    specs = {f"t.x_{name}": (name, (33, 17)) for name in DTYPES}
    specs["t.big"] = ("float32", (200, 200))  # 160000 bytes: chunked over 3 buckets
    specs["t.scalar"] = ("float64", ())
    specs["t.empty"] = ("float16", (0, 4))
    return specs


class _Params:
    """A torch module whose state_dict has exactly the given names, dtypes and shapes."""

    @staticmethod
    def build(device: str) -> Any:
        import torch

        from weightstream.frameworks import torch as torch_fw
        from weightstream.protocol.dtypes import by_name

        mod = torch.nn.Module()
        holder = torch.nn.Module()
        for name, (dtype, shape) in _gpu_model_specs().items():
            holder.register_buffer(
                name.split(".", 1)[1], torch.zeros(shape, dtype=torch_fw.native_dtype(by_name(dtype)), device=device)
            )
        mod.add_module("t", holder)
        return mod


def _random_tensor(dtype: str, shape: tuple[int, ...], gen: Any, device: str) -> Any:
    import torch

    from weightstream.frameworks import torch as torch_fw
    from weightstream.protocol.dtypes import by_name

    target = by_name(dtype)
    nbytes = target.itemsize * int(torch.Size(shape).numel())
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)
    if dtype == "bool":
        raw = raw % 2
    return torch_fw.retype(raw, target, shape)  # raw: a fresh tensor, at its storage's offset 0


def _digest(t: Any) -> str:
    import torch
    import xxhash

    flat = t.detach().contiguous().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return xxhash.xxh3_64_hexdigest(flat.view(ints).cpu().numpy().tobytes())


def _receiver(
    endpoint: str, rank: int, versions: list[str], events: Any, device: str = "cuda", expect_fail: tuple[str, ...] = (),
    transport: str | None = None,
) -> None:
    """Spawned: a torch module on ``device`` fed by a ReceiverDaemon; reports digests and counters.

    Each version is reported as a "version" event once committed, or, for a version in
    ``expect_fail``, as a "failed" event once it failed (with the error and the model's
    digests then, which must still be the version before). ``device="cpu"`` is the same
    harness over shm: the CPU rehearsal of these GPU tests.
    """
    try:
        import torch

        from weightstream import ReceiverDaemon
        from weightstream.receiver.sinks import TorchModuleSink

        cuda = device == "cuda"
        if cuda:
            from weightstream.protocol.transports.cuda_ipc import slots as cuda_ipc

            torch.cuda.init()
        if transport == "gloo_cuda":
            import gloo_cuda_transport  # noqa: F401 - registers it in this process too

        def counters() -> dict[str, int]:
            if not cuda:
                return {"opens": 0, "mappings": 0, "free": 0}
            torch.cuda.synchronize()
            return {
                "opens": cuda_ipc.OPEN_COUNT,
                "mappings": len(cuda_ipc._MAPPINGS),
                "free": torch.cuda.mem_get_info()[0],
            }

        module = _Params.build(device)
        free_before = counters()["free"]
        daemon = ReceiverDaemon(endpoint, TorchModuleSink(module), rank=rank, heartbeat_interval=0.2,
                                insecure=transport == "gloo_cuda")  # a c10d group: no authentication
        daemon.start()
        try:
            for version in versions:
                kind, error = "version", None
                try:
                    daemon.wait_for_version(version, timeout=60)
                except WeightstreamError as exc:
                    if version not in expect_fail:
                        raise
                    kind, error = "failed", f"{type(exc).__name__}: {exc}"
                found = counters()  # synchronizes the device first
                digests = {name: _digest(t) for name, t in module.state_dict().items()}
                events.put({"rank": rank, "event": kind, "version": version, "digests": digests, "error": error,
                            "model_intact": daemon.status.model_intact, **found})  # fmt: skip
        finally:
            daemon.stop()
        events.put({"rank": rank, "event": "done", "free_before": free_before, **counters()})
    except BaseException as exc:  # reported to the test, which fails with it
        events.put({"rank": rank, "event": "crashed", "error": repr(exc), "tb": traceback.format_exc()})


class _Events:
    """The ranks' events, in each rank's own order (one shared queue, a buffer per rank)."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self.pending: dict[int, list[dict[str, Any]]] = {}

    def next(self, rank: int, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.pending.get(rank):
            if time.monotonic() > deadline:
                raise AssertionError(f"rank {rank}: no event within {timeout}s")
            try:
                event = self.queue.get(timeout=1.0)
            except queue_mod.Empty:
                continue
            if event["event"] == "crashed":
                raise AssertionError(f"rank {event['rank']} crashed: {event['error']}\n{event['tb']}")
            self.pending.setdefault(event["rank"], []).append(event)
        return self.pending[rank].pop(0)

    def poll(self) -> None:
        """Take what the ranks said so far; fail at once if one crashed."""
        while True:
            try:
                event = self.queue.get_nowait()
            except queue_mod.Empty:
                return
            if event["event"] == "crashed":
                raise AssertionError(f"rank {event['rank']} crashed: {event['error']}\n{event['tb']}")
            self.pending.setdefault(event["rank"], []).append(event)

    def expect(self, rank: int, kind: str, version: str | None = None) -> dict[str, Any]:
        event = self.next(rank)
        what = {k: v for k, v in event.items() if k != "digests"}
        assert event["event"] == kind, f"rank {rank}: expected a {kind!r} event for {version}, got {what}"
        assert version is None or event["version"] == version, f"rank {rank}: expected {version}, got {what}"
        return event


def _require_gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    if not _cuda_usable():
        pytest.skip("cuda-bindings missing or CUDA unusable")


def _version(gen: Any, device: str) -> dict[str, Any]:
    """One version of the model: random bytes in every tensor, one source non-contiguous."""
    named = {n: _random_tensor(d, s, gen, device) for n, (d, s) in _gpu_model_specs().items()}
    named["t.x_float32"] = named["t.x_float32"].t().contiguous().t()  # a non-contiguous source
    return named


def _start(
    endpoint: str, ranks: int, versions: list[str], device: str, expect_fail: tuple[str, ...] = (),
    transport: str | None = None,
) -> tuple[Any, list[Any]]:
    events: Any = CTX.Queue()
    procs = [CTX.Process(target=_receiver, args=(endpoint, r, versions, events, device, expect_fail, transport),
                         daemon=True) for r in range(ranks)]  # fmt: skip
    for p in procs:
        p.start()
    return events, procs


def _connect(sender: Any, ev: _Events, procs: list[Any], timeout: float = 90.0) -> None:
    """Wait for every rank to say HELLO; fail at once, with its traceback, if one crashed first."""
    from weightstream import PeerTimeout

    deadline = time.monotonic() + timeout
    while True:
        try:
            sender.wait_for_receivers(len(procs), timeout=1.0)
            return
        except PeerTimeout:
            time.sleep(0.2)  # a crashed rank's event may still be on its way
            ev.poll()
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"ranks did not connect within {timeout}s; exited (rank, code): {dead}") from None


def _join(events: Any, procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    events.close()
    events.join_thread()


def _run_versions(
    endpoint: str, versions: list[str], ranks: int, *, device: str = "cuda", checksum: bool = False,
    transport: str | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Push ``versions`` to ``ranks`` spawned receivers; every rank must hold each bit for bit.

    On CUDA, the device's free memory must be back to its baseline once the ranks are gone and
    the sender closed (within 4 MiB)."""
    import torch

    from weightstream import BucketSender

    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.synchronize()
        baseline = torch.cuda.mem_get_info()[0]  # device-wide: measured before and after the ranks live
    events, procs = _start(endpoint, ranks, versions, device, transport=transport)
    ev = _Events(events)
    seen: dict[int, list[dict[str, Any]]] = {r: [] for r in range(ranks)}
    gen = torch.Generator().manual_seed(1234)
    insecure = transport == "gloo_cuda"
    if insecure:
        import gloo_cuda_transport  # noqa: F401 - registers it
    transport = transport or ("cuda_ipc" if cuda else "shm")
    try:
        with BucketSender(endpoint, receivers=ranks, transport=transport, bucket_bytes=BUCKET, timeout=90,
                          checksum=checksum, insecure=insecure) as sender:  # fmt: skip
            _connect(sender, ev, procs)
            for version in versions:
                named = _version(gen, device)
                report = sender.push(list(named.items()), version)
                assert report.committed and sorted(report.receivers) == list(range(ranks)), report
                want = {n: _digest(t) for n, t in named.items()}
                for r in range(ranks):
                    got = ev.expect(r, "version", version)
                    assert got["digests"] == want, f"rank {r} {version}: bytes differ"
                    seen[r].append(got)
                del named
        for r in range(ranks):
            seen[r].append(ev.expect(r, "done"))
    finally:
        _join(events, procs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        leaked = baseline - torch.cuda.mem_get_info()[0]
        assert leaked <= 4 << 20, f"GPU memory not back to baseline after the run: {leaked} bytes still used"
    return seen


def _checksum_mismatch(endpoint: str, monkeypatch: pytest.MonkeyPatch, device: str = "cuda") -> None:
    """checksum=True: v1 commits; v2's buckets carry a checksum off by one bit, so the rank
    refuses v2 before applying a byte (push raises naming the checksum, the rank still holds
    v1, model intact); v3 then commits bit for bit."""
    import torch

    from weightstream import BucketSender

    cuda = device == "cuda"
    versions = ["v1", "v2", "v3"]
    events, procs = _start(endpoint, 1, versions, device, expect_fail=("v2",))
    ev = _Events(events)
    gen = torch.Generator().manual_seed(99)
    try:
        with BucketSender(endpoint, transport="cuda_ipc" if cuda else "shm", bucket_bytes=BUCKET, checksum=True,
                          timeout=90) as sender:  # fmt: skip
            _connect(sender, ev, procs)
            v1 = _version(gen, device)
            sender.push(list(v1.items()), "v1")
            want_v1 = {n: _digest(t) for n, t in v1.items()}
            assert ev.expect(0, "version", "v1")["digests"] == want_v1

            slots = getattr(sender, "_slots", None)
            assert slots, "BucketSender._slots is gone: point this test at where the sender's slots live now"
            cls = type(slots[0])
            real = cls.digest
            monkeypatch.setattr(cls, "digest", lambda self, nbytes: real(self, nbytes) ^ 1)
            v2 = _version(gen, device)
            with pytest.raises(WeightstreamError) as info:
                sender.push(list(v2.items()), "v2")
            monkeypatch.undo()
            report = getattr(info.value, "report", None)
            text = " | ".join(
                [str(info.value)] + [r.error or "" for r in (report.receivers.values() if report else [])]
            )
            assert "checksum" in text, f"v2 failed, but not for its checksum: {text}"
            failed = ev.expect(0, "failed", "v2")
            assert "checksum" in failed["error"], failed["error"]
            assert failed["digests"] == want_v1, "the rank changed its model although v2 failed its checksum"
            assert failed["model_intact"] is True, failed

            v3 = _version(gen, device)
            report = sender.push(list(v3.items()), "v3")
            assert report.committed, report
            assert ev.expect(0, "version", "v3")["digests"] == {n: _digest(t) for n, t in v3.items()}
        done = ev.expect(0, "done")
        assert done["mappings"] == 0, done
    finally:
        _join(events, procs)


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_every_dtype_bit_exact_to_two_processes_with_one_open_per_slot(endpoint: str) -> None:
    _require_gpu()
    seen = _run_versions(endpoint, ["v1", "v2", "v3"], ranks=2)
    for rank, events in seen.items():
        opens = [e["opens"] for e in events]
        assert opens[0] == 2, f"rank {rank}: expected 2 slot opens (num_buffers=2) at v1, got {opens[0]}"
        assert len(set(opens)) == 1, f"rank {rank}: handles re-opened after the first version: {opens}"
        assert events[-1]["mappings"] == 0, f"rank {rank}: mappings left open after BYE"


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_c10d_device_slots_through_gloo_bit_exact_to_two_processes(endpoint: str) -> None:
    """The nccl transport's code (device slots, a group per push, broadcast per bucket) with the
    gloo backend, which shares one GPU between the sender and two ranks; NCCL itself needs a GPU
    per process, so ``nccl`` proper stays unverified on one GPU."""
    _require_gpu()
    seen = _run_versions(endpoint, ["v1", "v2", "v3"], ranks=2, transport="gloo_cuda")
    assert all(len(events) == 4 for events in seen.values())


@pytest.mark.gpu
@pytest.mark.timeout(600)
def test_gpu_memory_back_to_baseline_after_20_cycles(endpoint: str) -> None:
    _require_gpu()
    seen = _run_versions(endpoint, [f"v{i}" for i in range(20)], ranks=1)
    done = seen[0][-1]
    frees = [e["free"] for e in seen[0][1:-1]]  # steady state, after the first version
    assert max(frees) - min(frees) <= 8 << 20, f"GPU memory drifts across update cycles: {frees}"
    assert done["mappings"] == 0 and len({e["opens"] for e in seen[0]}) == 1


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_checksum_true_end_to_end_to_two_processes(endpoint: str) -> None:
    """Sender and ranks hash each bucket on their GPUs (device_digest): the digests agree."""
    _require_gpu()
    seen = _run_versions(endpoint, ["v1", "v2", "v3"], ranks=2, checksum=True)
    for rank, events in seen.items():
        assert len({e["opens"] for e in events}) == 1, f"rank {rank}: handles re-opened: {events}"
        assert events[-1]["mappings"] == 0


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_a_wrong_checksum_aborts_the_version_on_the_gpu_and_the_next_commits(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_gpu()
    _checksum_mismatch(endpoint, monkeypatch)


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_device_digest_detects_changed_and_swapped_words() -> None:
    _require_gpu()
    import torch

    from weightstream.protocol.transports.cuda_ipc.slots import device_digest

    data = torch.randint(0, 256, ((3 << 20) + 5,), dtype=torch.uint8, device="cuda")
    index = data.device.index
    base = device_digest(data.data_ptr(), data.numel(), index)
    assert base == device_digest(data.data_ptr(), data.numel(), index)  # deterministic
    changed = data.clone()
    changed[12345] ^= 1
    assert device_digest(changed.data_ptr(), changed.numel(), index) != base
    swapped = data.clone()
    swapped[0:8], swapped[8:16] = data[8:16].clone(), data[0:8].clone()
    if not torch.equal(swapped, data):
        assert device_digest(swapped.data_ptr(), swapped.numel(), index) != base
    tail = data.clone()
    tail[-1] ^= 0xFF
    assert device_digest(tail.data_ptr(), tail.numel(), index) != base


def _digest_on_host(data: Any) -> int:
    """device_digest's documented formula, on the host with NumPy: each 8-byte word times
    (its index * 0x9E3779B97F4A7C15 | 1), summed mod 2**64; the < 8 trailing bytes xor'ed in
    as their xxh3 (host_digest)."""
    import numpy as np

    from weightstream.protocol.transports import host_digest

    words, tail = divmod(data.nbytes, 8)
    total = 0
    if words:
        w = data[: words * 8].view("<u8")
        mult = (np.arange(words, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
        total = int((w * mult).sum(dtype=np.uint64))  # uint64 array arithmetic wraps mod 2**64
    if tail:
        total ^= host_digest(np.ascontiguousarray(data[words * 8 :]))
    return total


def test_digest_formula_on_the_host_matches_the_torch_expression() -> None:
    """CPU: _digest_on_host (the GPU test's reference) equals device_digest's torch arithmetic
    run on the CPU, chunk boundary included, so a GPU mismatch is the GPU path's, not the reference's."""
    torch = pytest.importorskip("torch")
    import numpy as np

    golden = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64, as in cuda_ipc
    rng = np.random.default_rng(3)
    for nbytes, chunk in [(0, 4), (7, 4), (8, 4), (8 * 9 + 3, 4), (8 * 1000, 333), (4096 + 5, 1 << 20)]:
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
        words = nbytes // 8
        acc = torch.zeros((), dtype=torch.int64)
        x = torch.from_numpy(data[: words * 8].copy()).view(torch.int64) if words else None
        for start in range(0, words, chunk):
            part = x[start : start + chunk]
            index = torch.arange(start, start + part.numel(), dtype=torch.int64)
            acc += (part * (index * golden | 1)).sum()
        total = int(acc.item()) & ((1 << 64) - 1)
        if nbytes % 8:
            from weightstream.protocol.transports import host_digest

            total ^= host_digest(data[words * 8 :])
        assert _digest_on_host(data) == total, nbytes


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_device_digest_equals_its_formula_computed_on_the_host() -> None:
    """Exact and deterministic, so the same on every GPU: sizes with and without a tail, and one
    past the 128 MiB chunk device_digest works in."""
    _require_gpu()
    import numpy as np
    import torch

    from weightstream.protocol.transports.cuda_ipc.slots import device_digest

    rng = np.random.default_rng(11)
    for nbytes in (5, 8, 4096 + 3, (3 << 20) + 5, (128 << 20) + 8 * 3 + 7):
        host = rng.integers(0, 256, nbytes, dtype=np.uint8)
        dev = torch.from_numpy(host).cuda()
        assert device_digest(dev.data_ptr(), nbytes, dev.device.index) == _digest_on_host(host), nbytes
        del dev


# --- CPU rehearsal of the GPU harness (shm, torch on the CPU): the same code paths minus CUDA -----


@pytest.mark.timeout(120)
def test_gpu_harness_rehearsed_on_cpu_over_shm(endpoint: str) -> None:
    pytest.importorskip("torch")
    seen = _run_versions(endpoint, ["v1", "v2", "v3"], ranks=2, device="cpu", checksum=True)
    assert [[e["event"] for e in events] for events in seen.values()] == [["version"] * 3 + ["done"]] * 2


@pytest.mark.timeout(120)
def test_checksum_mismatch_harness_rehearsed_on_cpu_over_shm(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    _checksum_mismatch(endpoint, monkeypatch, device="cpu")
