"""Snapshots: the writer's files and atomicity, the loader's search order, restore into
NumPy/paddle/torch models bit-exactly, bootstrap of unmaterialised models, version order,
and the resident memory of a restore (in a spawned process)."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from disk_faults import flip

from weightstream import BucketSender, ReceiverDaemon, WeightstreamError
from weightstream.frameworks import dtype_of, host_bytes
from weightstream.protocol.dtypes import DTYPES
from weightstream.receiver.sinks import NumpySink, PaddleLayerSink, TorchModuleSink
from weightstream.receiver.snapshot import (
    SnapshotWriter,
    Tee,
    check_version_order,
    compare_versions,
    load_snapshot,
    verify_materialised,
    version_key,
)
from weightstream.receiver.snapshot_writer import TEMP_PREFIX

pytestmark = pytest.mark.timeout(120)

CTX = mp.get_context("spawn")
ALL_DTYPES = [d.name for d in DTYPES]


def raw(t: Any) -> bytes:
    return host_bytes(t).tobytes()


def random_state(seed: int, dtypes: list[str] = ALL_DTYPES, shape: tuple[int, ...] = (5, 7)) -> dict[str, np.ndarray]:
    """One tensor per dtype, random bytes (NaN payloads included: compared bit for bit)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(dtypes):
        d = next(x for x in DTYPES if x.name == name)
        n = int(np.prod(shape)) * d.itemsize
        data = rng.integers(0, 2 if name == "bool" else 256, size=n, dtype=np.uint8)
        out[f"layer{i}.{name}"] = data.view(d.numpy).reshape(shape)
    return out


def write(directory: Path, rank: int, version: str, state: dict[str, Any], max_part_bytes: int = 1 << 20) -> list[Path]:
    with SnapshotWriter(directory, rank, max_part_bytes=max_part_bytes) as writer:
        writer.begin()
        for name, t in state.items():
            writer.load_one(name, t)
        return writer.commit(version)


def collect(directory: Path, rank: int, version: str | None = None, fallback: Path | None = None) -> tuple[str, dict[str, bytes]]:
    src = load_snapshot(directory, rank, version, fallback_dir=fallback)
    got = {}
    for part in src:
        got.update((n, a.tobytes()) for n, a in part)
    return src.kind, got


def daemon_for(target: Any, rank: int = 0, **kw: Any) -> ReceiverDaemon:
    return ReceiverDaemon("ipc:///nonexistent/ws-snapshot.sock", target, rank=rank, **kw)


# --- writer ---------------------------------------------------------------------------------


def test_writer_names_parts_and_keeps_them_under_the_limit(tmp_path: Path) -> None:
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((64, 33 + i)).astype(np.float32) for i in range(12)}
    state["tiny.bf16"] = random_state(1, ["bfloat16"])["layer0.bfloat16"]
    limit = 40_000
    paths = write(tmp_path, 3, "17", state, max_part_bytes=limit)
    assert [p.name for p in paths] == [f"model_state.tp3.17.part{i}.safetensors" for i in range(len(paths))]
    assert len(paths) > 3 and all(p.stat().st_size <= limit for p in paths)
    assert yaml.safe_load((tmp_path / "version.yaml").read_text()) == {"step": "17"}
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))
    # plain safetensors reads our parts (bf16 included) and sees the same bytes
    seen = {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            seen.update((k, raw(f.get_tensor(k))) for k in f.keys())  # noqa: SIM118 - safe_open is not a dict
    assert seen == {k: raw(v) for k, v in state.items()}


def test_writer_puts_an_oversized_tensor_in_a_part_of_its_own(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = {"small": np.ones(100, np.float32), "big": np.arange(5000, dtype=np.float64), "after": np.zeros(3, np.int8)}
    with caplog.at_level(logging.WARNING, "weightstream.snapshot"):
        paths = write(tmp_path, 0, "1", state, max_part_bytes=8192)
    assert "'big'" in caplog.text and "part of its own" in caplog.text
    assert len(paths) == 3
    assert collect(tmp_path, 0)[1] == {k: v.tobytes() for k, v in state.items()}


def test_writer_abort_mid_version_leaves_nothing_visible(tmp_path: Path) -> None:
    write(tmp_path, 0, "1", {"a": np.ones(10_000, np.float32)}, max_part_bytes=8192)
    before = sorted(os.listdir(tmp_path))
    writer = SnapshotWriter(tmp_path, 0, max_part_bytes=8192)
    writer.begin()
    for i in range(10):  # several parts flushed to the temp dir already
        writer.load_one(f"t{i}", np.full(1500, i, np.float32))
    assert list(tmp_path.glob(TEMP_PREFIX + "*"))
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == before  # no part of version 2, version.yaml untouched
    with pytest.raises(WeightstreamError, match="aborted"):
        writer.load_one("late", np.ones(3, np.float32))  # the aborted iteration's stragglers are refused
    with pytest.raises(WeightstreamError, match="expected an open version"):
        writer.commit("2")
    writer.begin()  # the next version works
    writer.load_one("b", np.ones(3, np.float32))
    writer.commit("2")
    writer.close()
    assert collect(tmp_path, 0)[1] == {"b": np.ones(3, np.float32).tobytes()}


def _crash_mid_version(directory: str) -> None:
    writer = SnapshotWriter(directory, 0, max_part_bytes=8192)
    writer.begin()
    for i in range(10):
        writer.load_one(f"t{i}", np.full(1500, i, np.float32))
    writer._wait_pending()  # parts really on disk in the temp dir
    os._exit(3)  # a crash: no abort, no cleanup


def test_a_crash_mid_version_leaves_no_snapshot_and_the_next_writer_cleans_up(tmp_path: Path) -> None:
    proc = CTX.Process(target=_crash_mid_version, args=(str(tmp_path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    temps = list(tmp_path.glob(TEMP_PREFIX + "*"))
    assert len(temps) == 1 and len(list(temps[0].iterdir())) >= 5  # the half version, hidden
    assert not list(tmp_path.glob("model_state*")) and not (tmp_path / "version.yaml").exists()
    with pytest.raises(Exception, match=r"version.yaml"):
        load_snapshot(tmp_path, 0)
    SnapshotWriter(tmp_path, 0).close()
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_a_half_renamed_commit_is_refused_as_incomplete(tmp_path: Path) -> None:
    paths = write(tmp_path, 0, "4", {f"t{i}": np.full(1500, i, np.float32) for i in range(6)}, max_part_bytes=8192)
    paths[-1].unlink()  # the crash hit between renames: the last part (with the count) is missing
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_snapshot(tmp_path, 0, "4")


def test_rank_and_version_never_collide(tmp_path: Path) -> None:
    a = {"x": np.full(4, 1, np.int32)}
    b = {"x": np.full(4, 2, np.int32)}
    pa = write(tmp_path, 1, "234", a)
    pb = write(tmp_path, 12, "34", b)
    assert {p.name for p in pa}.isdisjoint(p.name for p in pb)
    assert collect(tmp_path, 1, "234")[1] == {"x": a["x"].tobytes()}
    assert collect(tmp_path, 12, "34")[1] == {"x": b["x"].tobytes()}
    for rank, version in ((1, "34"), (12, "234"), (123, "4")):
        with pytest.raises(FileNotFoundError):
            load_snapshot(tmp_path, rank, version)


# --- loader ---------------------------------------------------------------------------------


def save_st(path: Path, state: dict[str, np.ndarray]) -> None:
    import safetensors.numpy

    safetensors.numpy.save_file(state, str(path))


def test_loader_priority_parts_full_legacy_fallback(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    main, fallback = tmp_path / "main", tmp_path / "fallback"
    main.mkdir()
    mark = {k: {"which": np.array([i], np.int64)} for i, k in enumerate(["parts", "full", "legacy_st", "legacy_pd", "fb"])}
    write(main, 2, "9", mark["parts"])
    save_st(main / "model_state.tp2.9.safetensors", mark["full"])
    save_st(main / "model_state.tp09.safetensors", mark["legacy_st"])
    paddle.save({"which": paddle.to_tensor(mark["legacy_pd"]["which"])}, str(main / "model_state.tp09.pdparams"))
    write(fallback, 2, "9", mark["fb"])

    def which() -> tuple[str, int]:
        src = load_snapshot(main, 2, "9", fallback_dir=fallback)
        (part,) = list(src)
        return src.kind, int(dict(part)["which"][0])

    assert which() == ("parts", 0)
    for p in main.glob("*.part*"):
        p.unlink()
    assert which() == ("full", 1)
    (main / "model_state.tp2.9.safetensors").unlink()
    assert which() == ("legacy", 2)  # .safetensors before .pdparams
    (main / "model_state.tp09.safetensors").unlink()
    assert which() == ("legacy", 3)
    (main / "model_state.tp09.pdparams").unlink()
    assert which() == ("parts", 4)  # from the fallback directory
    for p in fallback.glob("*.part*"):
        p.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_snapshot(main, 2, "9", fallback_dir=fallback)
    msg = str(err.value)
    for d in (main, fallback):
        for name in ("model_state.tp2.9.part<N>.safetensors", "model_state.tp2.9.safetensors",
                     "model_state.tp09.safetensors", "model_state.tp09.pdparams"):  # fmt: skip
            assert str(d / name) in msg


def test_loader_orders_parts_numerically_and_ignores_bad_indices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in (10, 2, 1, 0):  # foreign parts (no weightstream metadata), glob order would put 10 before 2
        save_st(tmp_path / f"model_state.tp0.5.part{i}.safetensors", {f"t{i}": np.array([i], np.int16)})
    for bad in ("partX", "part1a", "part", "part-3"):
        save_st(tmp_path / f"model_state.tp0.5.{bad}.safetensors", {"bad": np.zeros(1, np.int16)})
    with caplog.at_level(logging.WARNING, "weightstream.snapshot"):
        src = load_snapshot(tmp_path, 0, "5")
    assert [p.name for p in src.paths] == [f"model_state.tp0.5.part{i}.safetensors" for i in (0, 1, 2, 10)]
    assert [n for part in src for n, _ in part] == ["t0", "t1", "t2", "t10"]
    for bad in ("partX", "part1a", "part.", "part-3"):
        assert f"model_state.tp0.5.{bad}" in caplog.text


def test_loader_reads_version_yaml_and_rejects_corrupt_parts(tmp_path: Path) -> None:
    write(tmp_path, 0, "step_7", {"a": np.ones(3, np.float32)})
    assert load_snapshot(tmp_path, 0).version == "step_7"
    (tmp_path / "model_state.tp0.8.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(WeightstreamError, match="not a valid safetensors file"):
        load_snapshot(tmp_path, 0, "8")


# --- restore --------------------------------------------------------------------------------


def test_restore_numpy_all_dtypes_bit_exact(tmp_path: Path) -> None:
    state = random_state(3, shape=(33, 31))
    write(tmp_path, 0, "12", state, max_part_bytes=6000)  # several parts, mixed dtypes per part
    target = {k: np.zeros_like(v) for k, v in state.items()}
    daemon = daemon_for(NumpySink(target), prefetch=1)
    assert daemon.restore(tmp_path) == "12"
    assert {k: raw(v) for k, v in target.items()} == {k: raw(v) for k, v in state.items()}
    status = daemon.status
    assert (status.committed_version, status.state, status.model_intact) == ("12", "idle", True)


def test_restore_torch_all_dtypes_bit_exact(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = random_state(4)
    module = torch.nn.Module()
    for k, v in state.items():
        module.register_buffer(k.replace(".", "_"), torch.zeros(v.shape, dtype=getattr(torch, dtype_of(v).name)))
    ptrs = {k: t.data_ptr() for k, t in module.state_dict().items()}
    write(tmp_path, 1, "3", {k.replace(".", "_"): v for k, v in state.items()}, max_part_bytes=4096)
    daemon = daemon_for(TorchModuleSink(module), rank=1)
    daemon.restore(tmp_path)
    got = module.state_dict()
    assert {k: raw(got[k.replace(".", "_")]) for k in state} == {k: raw(v) for k, v in state.items()}
    assert {k: t.data_ptr() for k, t in got.items()} == ptrs  # in place


def test_restore_paddle_all_dtypes_bit_exact(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    state = random_state(5)
    layer = paddle.nn.Layer()
    for k, v in state.items():
        layer.register_buffer(k.replace(".", "_"), paddle.zeros(list(v.shape), dtype=dtype_of(v).name))
    write(tmp_path, 0, "3", {k.replace(".", "_"): v for k, v in state.items()}, max_part_bytes=4096)
    daemon_for(PaddleLayerSink(layer)).restore(tmp_path, "3")
    got = layer.state_dict()
    assert {k: raw(got[k.replace(".", "_")]) for k in state} == {k: raw(v) for k, v in state.items()}


def test_restore_refuses_a_manifest_mismatch_before_touching(tmp_path: Path) -> None:
    write(tmp_path, 0, "1", {"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    target = {"a": np.zeros(3, np.float32), "b": np.zeros(4, np.float32)}
    daemon = daemon_for(target)
    with pytest.raises(WeightstreamError, match="b: expected float32\\[4\\], got float32\\[2\\]"):
        daemon.restore(tmp_path)
    assert not target["a"].any() and daemon.status.model_intact and daemon.committed_version is None


def test_restore_while_serving_and_after_a_live_push_through_a_tee(tmp_path: Path, endpoint: str) -> None:
    """Live versions reach the model and the writer (chunked tensors too); the daemon commits
    each snapshot when its version commits; restore runs on a started daemon between pushes
    and then fills a fresh model with the newest snapshot."""
    rng = np.random.default_rng(7)
    named = {"big": rng.standard_normal(3000).astype(np.float32), "small": np.arange(5, dtype=np.int64)}
    model = {k: np.zeros_like(v) for k, v in named.items()}
    writer = SnapshotWriter(tmp_path / "snap", 0, max_part_bytes=8192)
    daemon = ReceiverDaemon(endpoint, Tee(NumpySink(model), writer), rank=0)
    with BucketSender(endpoint, receivers=1, bucket_bytes=4096) as sender, daemon:  # "big" is chunked
        sender.push(named.items(), version="1")
        daemon.wait_for_version("1", 30)
        assert {k: raw(v) for k, v in model.items()} == {k: raw(v) for k, v in named.items()}
        model["big"][:] = 0
        assert daemon.restore(tmp_path / "snap") == "1"  # serving: runs on the apply thread
        assert raw(model["big"]) == raw(named["big"])
        # the restore skipped the writer: nothing copied aside, no temp part written again
        assert not list((tmp_path / "snap").glob(".snapshot-tmp-*")) and not writer._part.items
        named2 = {k: v + 1 for k, v in named.items()}
        sender.push(named2.items(), version="2")
        daemon.wait_for_version("2", 30)
    writer.close()
    fresh = {k: np.zeros_like(v) for k, v in named.items()}
    assert daemon_for(fresh).restore(tmp_path / "snap") == "2"  # stop() let the last snapshot commit finish
    assert {k: raw(v) for k, v in fresh.items()} == {k: raw(v) for k, v in named2.items()}
    assert daemon_for(fresh).restore(tmp_path / "snap", version="1", force=True) == "1"
    assert {k: raw(v) for k, v in fresh.items()} == {k: raw(v) for k, v in named.items()}


# --- bootstrap ------------------------------------------------------------------------------


def torch_meta_model() -> Any:
    torch = pytest.importorskip("torch")
    with torch.device("meta"):
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, dtype=torch.bfloat16))


def paddle_lazy_model() -> Any:
    paddle = pytest.importorskip("paddle")
    with paddle.LazyGuard():
        return paddle.nn.Sequential(paddle.nn.Linear(3, 4), paddle.nn.Linear(4, 2))


def specs_state(specs: dict[str, tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in specs.items():
        d = next(x for x in DTYPES if x.name == dtype)
        out[name] = rng.standard_normal(shape).astype(np.float32).astype(d.numpy)
    return out


def test_bootstrap_meta_and_lazy_models_from_a_snapshot(tmp_path: Path) -> None:
    for rank, sink in enumerate([TorchModuleSink(torch_meta_model()), PaddleLayerSink(paddle_lazy_model())]):
        state = specs_state(sink.param_specs(), rank)
        write(tmp_path, rank, "1", state, max_part_bytes=4096)
        with pytest.raises(WeightstreamError, match="unmaterialised"):
            verify_materialised(sink)
        daemon_for(sink, rank=rank).restore(tmp_path, "1")
        verify_materialised(sink)
        model = getattr(sink, "module", None) or sink.layer
        got = {k: raw(t) for k, t in model.state_dict().items()}
        assert got == {k: raw(v) for k, v in state.items()}


def test_bootstrap_names_what_a_partial_snapshot_left_unmaterialised(tmp_path: Path) -> None:
    sink = TorchModuleSink(torch_meta_model())
    state = specs_state(sink.param_specs(), 0)
    del state["1.bias"]
    write(tmp_path, 0, "1", state)
    daemon = daemon_for(sink, allow_missing=True)
    with pytest.raises(WeightstreamError, match=r"1 still unmaterialised: 1\.bias"):
        daemon.restore(tmp_path)
    assert daemon.committed_version is None and not daemon.status.model_intact


def test_bootstrap_meta_and_lazy_models_from_a_live_push(endpoint: str) -> None:
    paddle = pytest.importorskip("paddle")
    torch = pytest.importorskip("torch")

    class TorchNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 3, dtype=torch.bfloat16))
            self.b = torch.nn.Parameter(torch.empty(3))

    class PaddleNet(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.w = self.create_parameter([4, 3], dtype="bfloat16")
            self.b = self.create_parameter([3], dtype="float32")

    with torch.device("meta"):
        tnet = TorchNet()
    with paddle.LazyGuard():
        pnet = PaddleNet()
    named = specs_state(TorchModuleSink(tnet).param_specs(), 9)
    with BucketSender(endpoint, receivers=2) as sender, ReceiverDaemon(
        endpoint, TorchModuleSink(tnet), rank=0
    ) as d0, ReceiverDaemon(endpoint, PaddleLayerSink(pnet), rank=1) as d1:
        sender.push(named.items(), version="1")
        d0.wait_for_version("1", 30)
        d1.wait_for_version("1", 30)
    for model in (tnet, pnet):
        verify_materialised(model)
        assert {k: raw(t) for k, t in model.state_dict().items()} == {k: raw(v) for k, v in named.items()}


# --- version order --------------------------------------------------------------------------


def test_version_key_and_compare() -> None:
    assert version_key("12") == version_key("step_12") == version_key("step-12") == version_key("v12") == ("", 12)
    assert version_key("ckpt_7") == ("ckpt", 7) and version_key("abc") is None
    assert compare_versions("9", "10") == -1 and compare_versions("step_10", "9") == 1  # numeric, not text
    assert compare_versions("abc", "abc") == 0 and compare_versions("abc", "abd") is None
    assert compare_versions("ckpt_1", "step_2") is None
    check_version_order("5", None)
    check_version_order("5", "5")
    check_version_order("6", "step_5")
    for older, committed in (("4", "5"), ("abc", "5"), ("x", "y")):
        with pytest.raises(WeightstreamError, match="force=True"):
            check_version_order(older, committed)
        check_version_order(older, committed, force=True)


def test_restore_refuses_an_older_version_unless_forced(tmp_path: Path) -> None:
    write(tmp_path, 0, "9", {"a": np.full(2, 9, np.int32)})
    write(tmp_path, 0, "step_10", {"a": np.full(2, 10, np.int32)})  # version.yaml now says step_10
    target = {"a": np.zeros(2, np.int32)}
    daemon = daemon_for(target)
    assert daemon.restore(tmp_path) == "step_10" and target["a"][0] == 10
    with pytest.raises(WeightstreamError, match="older '9'"):
        daemon.restore(tmp_path, "9")
    assert target["a"][0] == 10 and daemon.committed_version == "step_10"
    assert daemon.restore(tmp_path, "step_10") == "step_10"  # same version: allowed (repair)
    assert daemon.restore(tmp_path, "9", force=True) == "9" and target["a"][0] == 9


# --- memory ---------------------------------------------------------------------------------

MODEL_BYTES = 400 << 20
PART_BYTES = 50 << 20
TENSOR_ELEMS = 2 << 20  # 8 MiB float32 tensors, 50 of them


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _peak() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _memory_child(directory: str, out: Any) -> None:
    import psutil

    proc = psutil.Process()
    count = MODEL_BYTES // (TENSOR_ELEMS * 4)

    def tensor(i: int) -> np.ndarray:
        return np.arange(TENSOR_ELEMS, dtype=np.float32) + np.float32(i * 1000)

    result: dict[str, Any] = {}
    _peak_reset()
    base = proc.memory_info().rss
    with SnapshotWriter(directory, 0, max_part_bytes=PART_BYTES) as writer:
        writer.begin()
        for i in range(count):
            writer.load_one(f"layers.{i}.weight", tensor(i))
        writer.commit("1")
    result["writer_peak_growth"] = _peak() - base
    model = {f"layers.{i}.weight": np.full(TENSOR_ELEMS, -1.0, np.float32) for i in range(count)}  # resident
    daemon = ReceiverDaemon("ipc:///nonexistent/ws-mem.sock", NumpySink(model), rank=0)
    _peak_reset()
    before = proc.memory_info().rss
    daemon.restore(directory)
    result["restore_peak_growth"] = _peak() - before
    result["restore_rss_after_growth"] = proc.memory_info().rss - before
    result["exact"] = all(np.array_equal(model[f"layers.{i}.weight"], tensor(i)) for i in range(count))
    out.put(result)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_restore_peak_memory_stays_near_one_part(tmp_path: Path) -> None:
    out = CTX.Queue()
    proc = CTX.Process(target=_memory_child, args=(str(tmp_path), out))
    proc.start()
    try:
        result = out.get(timeout=100)
    except queue_mod.Empty:
        proc.kill()
        raise
    finally:
        proc.join(30)
    mib = {k: round(v / 2**20, 1) for k, v in result.items() if k != "exact"}
    print(f"snapshot memory (MiB): {mib}")
    assert result["exact"]
    budget = 3 * PART_BYTES + (100 << 20)
    assert result["restore_peak_growth"] < budget, mib
    assert result["writer_peak_growth"] < budget, mib
    assert result["restore_peak_growth"] < MODEL_BYTES // 2, mib


def test_daemon_accepts_a_torch_module_directly(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    module = torch.nn.Linear(2, 2)
    state = {k: np.full(tuple(v.shape), 0.5, np.float32) for k, v in module.state_dict().items()}
    write(tmp_path, 0, "1", state)
    daemon_for(module).restore(tmp_path)  # DESIGN: a torch module is accepted as load_weights
    assert {k: raw(v) for k, v in module.state_dict().items()} == {k: raw(v) for k, v in state.items()}


def test_a_disk_error_drops_the_snapshot_not_the_live_update(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path, 0, max_part_bytes=8192)
    writer.begin()
    writer.load_one("a", np.ones(1500, np.float32))
    tmp = next(tmp_path.glob(TEMP_PREFIX + "*"))
    (tmp / "part0.safetensors").mkdir()  # the background write of part 0 fails (IsADirectoryError)
    writer.load_one("b", np.ones(1500, np.float32))  # flushes part 0: no exception here
    writer.load_one("c", np.ones(1500, np.float32))
    with pytest.raises(WeightstreamError, match="was not written"):
        writer.commit("1")
    assert not list(tmp_path.glob("model_state*")) and not (tmp_path / "version.yaml").exists()
    writer.begin()
    writer.load_one("d", np.ones(2, np.float32))
    writer.commit("2")
    writer.close()
    assert collect(tmp_path, 0)[1] == {"d": np.ones(2, np.float32).tobytes()}


def test_a_pdparams_file_others_can_write_is_never_unpickled(tmp_path: Path) -> None:
    paddle = pytest.importorskip("paddle")
    path = tmp_path / "model_state.tp07.pdparams"
    paddle.save({"w": paddle.to_tensor(np.ones(3, np.float32))}, str(path))
    os.chmod(path, 0o666)  # anyone could have planted it: loading would run their pickle
    with pytest.raises(WeightstreamError, match="refusing to unpickle"):
        load_snapshot(tmp_path, 0, "7").open_part(0)
    os.chmod(path, 0o600)
    part = load_snapshot(tmp_path, 0, "7").open_part(0)
    assert [name for name, _ in part.tensors] == ["w"]
    part.release()


# --- corrupt parts, file modes, version names -------------------------------------------------


def six_parts(version: int) -> dict[str, np.ndarray]:
    return {f"t{i}": np.full(1500, version * 100 + i, np.float32) for i in range(6)}  # 6000 B each: one per part


def test_restore_refuses_a_part_with_a_flipped_bit_before_it_reaches_the_model(tmp_path: Path) -> None:
    from weightstream.receiver.snapshot_format import CorruptSnapshot, read_header

    write(tmp_path, 0, "1", six_parts(1), max_part_bytes=8192)
    paths = write(tmp_path, 0, "2", six_parts(2), max_part_bytes=8192)
    assert len(paths) == 6
    target = {k: np.zeros_like(v) for k, v in six_parts(0).items()}
    daemon = daemon_for(NumpySink(target), prefetch=2)

    # a bad FIRST part: nothing was applied, the model is untouched and intact
    start = read_header(paths[0]).data_start
    flip(paths[0], start + 100)
    with pytest.raises(CorruptSnapshot) as err:
        daemon.restore(tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, WeightstreamError)
    assert str(paths[0]) in msg and "part 0" in msg and "version '2'" in msg
    assert "data bytes [0, 6000)" in msg and "tensor 't0' is corrupt" in msg
    assert "weightstream snapshot verify" in msg and "restore another version" in msg
    assert not any(v.any() for v in target.values())
    status = daemon.status
    assert status.model_intact and status.committed_version is None and "CorruptSnapshot" in (status.last_error or "")
    flip(paths[0], start + 100)  # repaired

    # a bad later part: the parts before it were applied, so the model is no longer intact
    start = read_header(paths[3]).data_start
    flip(paths[3], start + 5999)
    with pytest.raises(CorruptSnapshot, match=r"part 3 .*tensor 't3' is corrupt") as err:
        daemon.restore(tmp_path)
    assert str(paths[3]) in str(err.value)
    assert [raw(target[f"t{i}"]) for i in range(3)] == [raw(six_parts(2)[f"t{i}"]) for i in range(3)]
    assert not target["t3"].any() and not target["t5"].any()  # never handed to the model
    assert not daemon.status.model_intact and daemon.committed_version is None

    # the fix the error gives: another version restores whole
    assert daemon.restore(tmp_path, "1") == "1"
    assert {k: raw(v) for k, v in target.items()} == {k: raw(v) for k, v in six_parts(1).items()}
    assert daemon.status.model_intact


def test_a_flipped_bit_in_a_parts_digest_key_does_not_switch_its_check_off(tmp_path: Path) -> None:
    """A part of this format always has its digests: one whose digest key is damaged is corrupt,
    for restore and for verify alike, not a part that never had digests; so is an unknown format."""
    from weightstream.receiver.snapshot_format import CorruptSnapshot, read_header
    from weightstream.receiver.snapshot_store import list_snapshots, verify_snapshot

    paths = write(tmp_path, 0, "2", six_parts(2), max_part_bytes=8192)
    raw_bytes = paths[0].read_bytes()
    for key, damaged in ((b"weightstream.xxh3_64", b"weightstream.x|h3_64"), (b"snapshot-v2", b"snapshot-v3")):
        at = raw_bytes.index(key)
        paths[0].write_bytes(raw_bytes[:at] + damaged + raw_bytes[at + len(key):])
        flip(paths[0], read_header(paths[0]).data_start + 100)  # and the data: it must not be restored
        target = {k: np.zeros_like(v) for k, v in six_parts(0).items()}
        with pytest.raises(CorruptSnapshot, match="part 0"):
            daemon_for(NumpySink(target)).restore(tmp_path)
        assert not any(v.any() for v in target.values())
        (snap,) = list_snapshots(tmp_path)
        result = verify_snapshot(snap)
        assert not result.ok, (damaged, result)
        paths[0].write_bytes(raw_bytes)


def test_restore_of_parts_without_digests_is_unchecked_as_before(tmp_path: Path) -> None:
    for i in range(3):  # an older or foreign writer: no weightstream metadata, no digests
        save_st(tmp_path / f"model_state.tp0.7.part{i}.safetensors", {f"t{i}": np.full(8, i + 1, np.int32)})
    target = {f"t{i}": np.zeros(8, np.int32) for i in range(3)}
    assert daemon_for(NumpySink(target)).restore(tmp_path, "7") == "7"
    assert [int(target[f"t{i}"][0]) for i in range(3)] == [1, 2, 3]


def test_snapshot_files_are_private_whatever_the_umask(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import stat

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    old = os.umask(0)  # the most permissive umask: the writer's modes must not depend on it
    try:
        directory = tmp_path / "new" / "snap"
        writer = SnapshotWriter(directory, 0, max_part_bytes=8192)
        assert mode(directory) == 0o700
        writer.begin()
        for i in range(4):
            writer.load_one(f"t{i}", np.full(1500, i, np.float32))
        writer._wait_pending()
        (tmp,) = directory.glob(TEMP_PREFIX + "*")
        assert mode(tmp) == 0o700 and [mode(p) for p in tmp.iterdir()] and all(mode(p) == 0o600 for p in tmp.iterdir())
        paths = writer.commit("1")
        writer.close()
        assert [mode(p) for p in paths] == [0o600] * len(paths) and mode(directory / "version.yaml") == 0o600

        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o755)
        with caplog.at_level(logging.WARNING, "weightstream.snapshot"):
            SnapshotWriter(shared, 0).close()
            SnapshotWriter(shared, 1).close()  # warned once per directory
        assert mode(shared) == 0o755  # an existing directory is left as it is
        assert caplog.text.count(f"directory {shared} is mode 755") == 1 and f"chmod 700 {shared}" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, "weightstream.snapshot"):
            SnapshotWriter(directory, 1).close()  # private already: nothing to say
        assert "is mode" not in caplog.text
    finally:
        os.umask(old)


def test_a_version_unusable_in_a_file_name_says_which_why_and_the_fix(tmp_path: Path) -> None:
    write(tmp_path, 0, "1", {"a": np.ones(3, np.float32)})
    writer = SnapshotWriter(tmp_path, 0, max_part_bytes=8192)
    writer.begin()
    for i in range(3):
        writer.load_one(f"t{i}", np.full(1500, i, np.float32))
    with pytest.raises(WeightstreamError) as err:
        writer.commit("step_2/x")
    msg = str(err.value)
    assert "version 'step_2/x' cannot be snapshotted: it contains a '/'" in msg and "rank 0" in msg
    assert "check_version_text" in msg and "e.g. 'step_2_x'" in msg
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))  # what was copied of it is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_state.tp0.1.part0.safetensors", "version.yaml"]
    for bad, why in (("..", "names a directory"), ("a\\b", "contains a '\\'"), ("", "it is empty")):
        with pytest.raises(WeightstreamError, match=re.escape(why)):
            writer.check_version(bad)
    writer.check_version("step_2")
    tee = Tee(NumpySink({"a": np.zeros(3, np.float32)}), writer)
    with pytest.raises(WeightstreamError, match="'x/y' cannot be snapshotted"):
        tee.check_version("x/y")  # the hook a daemon could call at BEGIN, before anything is written
    tee.check_version("2")
    writer.close()


def test_a_daemon_refuses_a_version_its_snapshot_writer_cannot_name(tmp_path: Path, endpoint: str) -> None:
    """A version that cannot be a file name is refused at BEGIN (the Tee's check_version hook), with
    the model untouched and the reason; the next version goes through to every sink."""
    named = {"a": np.arange(3000, dtype=np.float32), "b": np.arange(5, dtype=np.int64)}
    model = {k: np.zeros_like(v) for k, v in named.items()}
    snap = tmp_path / "snap"

    class Recording(NumpySink):  # a second sink with an on_commit
        def __init__(self, target: dict[str, np.ndarray]) -> None:
            super().__init__(target)
            self.committed: list[str] = []

        def on_commit(self, version: str) -> None:
            self.committed.append(version)

    other = Recording({k: np.zeros_like(v) for k, v in named.items()})
    writer = SnapshotWriter(snap, 0)
    with BucketSender(endpoint, receivers=1) as sender, ReceiverDaemon(
        endpoint, Tee(NumpySink(model), writer, other), rank=0
    ) as daemon:
        with pytest.raises(WeightstreamError, match="rejected before any byte was written") as refused:
            sender.push(named.items(), version="step_2/x")
        assert "version 'step_2/x' cannot be snapshotted: it contains a '/'" in str(refused.value)
        assert all(not v.any() for v in model.values()), "a refused version touched the model"
        assert daemon.status.model_intact
        sender.push(named.items(), version="step_3")
        daemon.wait_for_version("step_3", 30)
    writer.close()
    assert {k: raw(v) for k, v in model.items()} == {k: raw(v) for k, v in named.items()}
    assert other.committed == ["step_3"]
    assert sorted(p.name for p in snap.iterdir()) == ["model_state.tp0.step_3.part0.safetensors", "version.yaml"]
