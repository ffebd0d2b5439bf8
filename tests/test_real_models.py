"""Real third-party models through the public API, as the README shows it: a Hugging Face
Llama (tied and untied embeddings, float32 and bfloat16, built from a config with random
weights) pushed from a trainer into a CPU rank and into a rank built on the meta device, in
spawned processes; bit-exact state and equal greedy generation on both sides."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import real_model_workers as rw

from weightstream import BucketSender, ManifestMismatch

pytestmark = pytest.mark.timeout(240)


def _ranks(endpoint: str, specs: list[tuple[int, str]], tie: bool, dtype: str, versions: list[str]) -> tuple[list[Any], Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=rw.rank_main, args=(endpoint, r, tie, dtype, dev, versions, q), daemon=True) for r, dev in specs]
    for p in procs:
        p.start()
    return procs, q


def _next(q: Any, timeout: float = 120.0) -> dict[str, Any]:
    try:
        event = q.get(timeout=timeout)
    except queue_mod.Empty:
        raise AssertionError(f"no event from a rank within {timeout}s") from None
    assert event["event"] != "crashed", event.get("tb") or event
    return event  # type: ignore[no-any-return]


def _events(q: Any, count: int) -> dict[int, dict[str, Any]]:
    out = {}
    for _ in range(count):
        e = _next(q)
        out[e["rank"]] = e
    return out


def _join(procs: list[Any]) -> None:
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
            p.join(5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_into_a_cpu_rank_and_a_meta_rank(endpoint: str, tie: bool, dtype: str) -> None:
    trainer = rw.build(tie, dtype, seed=7)
    want_digests, want_tokens = rw.state_digests(trainer), rw.generate(trainer)
    procs, q = _ranks(endpoint, [(0, "cpu"), (1, "meta")], tie, dtype, ["step_1"])
    try:
        with BucketSender(endpoint, receivers=2, bucket_bytes=1 << 16, timeout=120, **rw.HB) as sender:
            _events(q, 2)  # both started
            # parameters (tied ones listed once, as torch does) and buffers: the meta rank has none of them yet
            report = sender.push([*trainer.named_parameters(), *trainer.named_buffers()], version="step_1")
            assert report.committed and {r.outcome for r in report.receivers.values()} == {"committed"}
            done = _events(q, 2)
        for rank in (0, 1):
            got = done[rank]
            assert got["event"] == "committed", got
            assert got["status"]["model_intact"], got["status"]
            assert got["digests"] == want_digests, rank
            assert got["tokens"] == want_tokens, rank
            assert got["tied"] is tie  # a tied model stays tied: one tensor under both names
    finally:
        _join(procs)


def test_a_tied_trainer_sends_the_embedding_once_under_both_names(endpoint: str) -> None:
    """state_dict() lists the tied matrix under two names: it travels once, and both ranks fill it."""
    trainer = rw.build(True, "float32", seed=3)
    state = trainer.state_dict()
    procs, q = _ranks(endpoint, [(0, "cpu")], True, "float32", ["step_1"])
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=1 << 16, timeout=120, **rw.HB) as sender:
            _events(q, 1)
            report = sender.push(state.items(), version="step_1")
            embedding = trainer.model.embed_tokens.weight
            total = sum(t.numel() * t.element_size() for t in state.values())
            assert report.bytes == total - embedding.numel() * embedding.element_size()  # sent once
            done = _events(q, 1)[0]
        assert done["digests"] == rw.state_digests(trainer) and done["tokens"] == rw.generate(trainer)
    finally:
        _join(procs)


def test_a_meta_rank_not_sent_its_buffers_says_which_and_the_fix(endpoint: str) -> None:
    trainer = rw.build(True, "float32", seed=5)
    procs, q = _ranks(endpoint, [(0, "meta")], True, "float32", ["step_1"])
    try:
        with BucketSender(endpoint, receivers=1, bucket_bytes=1 << 16, timeout=60, **rw.HB) as sender:
            _events(q, 1)
            with pytest.raises(ManifestMismatch) as info:
                sender.push(trainer.named_parameters(), version="step_1")
            message = str(info.value)
            assert "model.rotary_emb.inv_freq" in message and "meta device" in message and "named_buffers" in message
            failed = _events(q, 1)[0]
        assert failed["event"] == "failed" and failed["status"]["model_intact"] is False, failed
    finally:
        _join(procs)


def test_the_readme_example_runs_as_written_on_a_tied_model(endpoint: str) -> None:
    """README's "Use it" code, unchanged but for its endpoint: the trainer part here, the rank part
    in one process per receiver it shows (rank=0, rank=1), on a tied-embedding Llama."""
    trainer_code, _ = rw.readme_code()
    assert "receivers=2" in trainer_code and "model.named_parameters()" in trainer_code
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=rw.readme_rank_main, args=(endpoint, r, q), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        _events(q, 2)  # started
        model = rw.build(True, "float32", seed=11)
        namespace: dict[str, Any] = {"model": model}
        exec(compile(trainer_code.replace("ipc:///tmp/ws/gpu0.sock", endpoint), "README.md (trainer)", "exec"), namespace)
        assert namespace["report"].committed
        done = _events(q, 2)
        for rank in (0, 1):
            assert done[rank]["committed"] == "step_100" and done[rank]["intact"], done[rank]
            assert done[rank]["digests"] == rw.state_digests(model) and done[rank]["tokens"] == rw.generate(model)
    finally:
        _join(procs)
