"""The cuda_ipc transport.

CPU part (runs everywhere): the wire descriptor of a slot (64 raw handle bytes, size,
device UUID, pid) and its validation, the error texts, and that the transport is
refused with a clear TransportError where CUDA is unusable.

GPU part (``-m gpu``, skipped without a usable GPU): real spawned receiver processes
with torch modules on CUDA, every dtype bit-exact over several versions, no handle
re-opened after the first version, and GPU memory back to its baseline after many
update cycles in both the sender and the receivers.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from typing import Any

import pytest

from weightstream.protocol import messages as m
from weightstream.protocol.cuda_ipc_wire import (
    HANDLE_BYTES,
    cuda_error_message,
    decode_descriptor,
    device_identity,
    encode_descriptor,
    expandable_segments_note,
    format_uuid,
)
from weightstream.protocol.errors import TransportError
from weightstream.protocol.transport import available_transports, get_transport

pytestmark = pytest.mark.timeout(60)

UUID = "GPU-0123abcd-4567-89ef-0123-456789abcdef"
HANDLE = bytes(range(HANDLE_BYTES))


def _cuda_usable() -> bool:
    try:
        import weightstream.protocol.cuda_ipc  # noqa: F401
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
DTYPES = [
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2",
]  # fmt: skip
BUCKET = 64 << 10  # small: several buckets per version and one chunked tensor


def _gpu_model_specs() -> dict[str, tuple[str, tuple[int, ...]]]:
    specs = {f"t.{name}": (name, (33, 17)) for name in DTYPES}
    specs["t.big"] = ("float32", (200, 200))  # 160000 bytes: chunked over 3 buckets
    specs["t.scalar"] = ("float64", ())
    specs["t.empty"] = ("float16", (0, 4))
    return specs


class _Params:
    """A torch module whose state_dict has exactly the given names, dtypes and shapes."""

    @staticmethod
    def build(device: str) -> Any:
        import torch

        from weightstream.protocol.dtypes import by_name

        mod = torch.nn.Module()
        holder = torch.nn.Module()
        for name, (dtype, shape) in _gpu_model_specs().items():
            holder.register_buffer(name.split(".", 1)[1], torch.zeros(shape, dtype=by_name(dtype).torch(), device=device))
        mod.add_module("t", holder)
        return mod


def _random_tensor(dtype: str, shape: tuple[int, ...], gen: Any, device: str) -> Any:
    import torch

    from weightstream.protocol.dtypes import by_name

    target = by_name(dtype)
    nbytes = target.itemsize * int(torch.Size(shape).numel())
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)
    if dtype == "bool":
        raw = raw % 2
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[target.itemsize]
    return raw.view(ints).view(target.torch()).reshape(shape)


def _digest(t: Any) -> str:
    import torch
    import xxhash

    flat = t.detach().contiguous().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    return xxhash.xxh3_64_hexdigest(flat.view(ints).cpu().numpy().tobytes())


def _gpu_receiver(endpoint: str, rank: int, versions: list[str], events: Any) -> None:
    """Spawned: a torch module on CUDA fed by a ReceiverDaemon; reports digests and counters."""
    try:
        import torch

        from weightstream import ReceiverDaemon
        from weightstream.protocol import cuda_ipc
        from weightstream.receiver.sinks import TorchModuleSink

        torch.cuda.init()
        module = _Params.build("cuda")
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        daemon = ReceiverDaemon(endpoint, TorchModuleSink(module), rank=rank, heartbeat_interval=0.2)
        daemon.start()
        try:
            for version in versions:
                daemon.wait_for_version(version, timeout=60)
                torch.cuda.synchronize()
                digests = {name: _digest(t) for name, t in module.state_dict().items()}
                events.put({"rank": rank, "event": "version", "version": version, "digests": digests,
                            "opens": cuda_ipc.OPEN_COUNT, "free": torch.cuda.mem_get_info()[0]})  # fmt: skip
        finally:
            daemon.stop()
        torch.cuda.synchronize()
        events.put({"rank": rank, "event": "done", "opens": cuda_ipc.OPEN_COUNT,
                    "mappings": len(cuda_ipc._MAPPINGS), "free_before": free_before,
                    "free_after": torch.cuda.mem_get_info()[0]})  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails with it
        events.put({"rank": rank, "event": "crashed", "error": repr(exc), "tb": traceback.format_exc()})


def _next(events: Any, want: str, rank: int, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=1.0)
        except queue_mod.Empty:
            continue
        if event["event"] == "crashed":
            raise AssertionError(f"rank {event['rank']} crashed: {event['error']}\n{event['tb']}")
        if event["rank"] == rank and event["event"] == want:
            return event
        events.put(event)  # another rank's: keep it for its own wait
        time.sleep(0.01)
    raise AssertionError(f"rank {rank}: no {want!r} event within {timeout}s")


def _require_gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False")
    if not _cuda_usable():
        pytest.skip("cuda-bindings missing or CUDA unusable")


def _run_versions(endpoint: str, versions: list[str], ranks: int) -> dict[int, list[dict[str, Any]]]:
    import torch

    from weightstream import BucketSender

    torch.cuda.init()
    torch.cuda.synchronize()
    baseline = torch.cuda.mem_get_info()[0]  # device-wide: measured before and after the ranks live
    events: Any = CTX.Queue()
    procs = [CTX.Process(target=_gpu_receiver, args=(endpoint, r, versions, events), daemon=True) for r in range(ranks)]
    for p in procs:
        p.start()
    seen: dict[int, list[dict[str, Any]]] = {r: [] for r in range(ranks)}
    gen = torch.Generator().manual_seed(1234)
    try:
        with BucketSender(endpoint, receivers=ranks, transport="cuda_ipc", bucket_bytes=BUCKET, timeout=90) as sender:
            for version in versions:
                named = {n: _random_tensor(d, s, gen, "cuda") for n, (d, s) in _gpu_model_specs().items()}
                named["t.float32"] = named["t.float32"].t().contiguous().t()  # a non-contiguous source
                sender.push(list(named.items()), version)
                want = {n: _digest(t) for n, t in named.items()}
                for r in range(ranks):
                    got = _next(events, "version", r)
                    assert got["version"] == version
                    assert got["digests"] == want, f"rank {r} {version}: bytes differ"
                    seen[r].append(got)
                del named
        for r in range(ranks):
            seen[r].append(_next(events, "done", r))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        events.close()
        events.join_thread()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    leaked = baseline - torch.cuda.mem_get_info()[0]
    assert leaked <= 4 << 20, f"GPU memory not back to baseline after the run: {leaked} bytes still used"
    return seen


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
@pytest.mark.timeout(600)
def test_gpu_memory_back_to_baseline_after_20_cycles(endpoint: str) -> None:
    _require_gpu()
    seen = _run_versions(endpoint, [f"v{i}" for i in range(20)], ranks=1)
    done = seen[0][-1]
    frees = [e["free"] for e in seen[0][1:-1]]  # steady state, after the first version
    assert max(frees) - min(frees) <= 8 << 20, f"GPU memory drifts across update cycles: {frees}"
    assert done["mappings"] == 0 and len({e["opens"] for e in seen[0]}) == 1


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_device_digest_detects_changed_and_swapped_words() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from weightstream.protocol.cuda_ipc import device_digest

    data = torch.randint(0, 256, ((3 << 20) + 5,), dtype=torch.uint8, device="cuda")
    base = device_digest(data.data_ptr(), data.numel(), data.device.index)
    assert base == device_digest(data.data_ptr(), data.numel(), data.device.index)  # deterministic
    changed = data.clone()
    changed[12345] ^= 1
    assert device_digest(changed.data_ptr(), changed.numel(), 0) != base
    swapped = data.clone()
    swapped[0:8], swapped[8:16] = data[8:16].clone(), data[0:8].clone()
    if not torch.equal(swapped, data):
        assert device_digest(swapped.data_ptr(), swapped.numel(), 0) != base
    tail = data.clone()
    tail[-1] ^= 0xFF
    assert device_digest(tail.data_ptr(), tail.numel(), 0) != base
