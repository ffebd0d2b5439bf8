"""examples/ run as written: a trainer script and two rank scripts (one on the CPU, one built on
the meta device) in their own processes, as a user would start them; and the engine examples
(a vLLM worker extension, a FastDeploy-style Paddle rank with an MTP draft and snapshots, a
trainer loop that gathers one parameter at a time), each run for real in spawned processes
against a real trainer, checked bit for bit."""

from __future__ import annotations

import hashlib
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import weightstream
from weightstream import ReceiverDaemon
from weightstream.receiver.sinks import NumpySink, TorchModuleSink

pytest.importorskip("torch")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))  # the examples import each other by bare name, as the scripts do

# The generator drops each gathered parameter before it gathers the next, and the sender's packer
# lets go of the last one's bytes before it asks for the next: one is alive at a time.
GATHERED_ALIVE_MAX = 1
WAIT_S = 90  # the longest any one step of these runs may take before a test fails


def _script_env() -> dict[str, str]:
    """The scripts import the weightstream this test imported (a checkout's, not another install)."""
    root = str(Path(weightstream.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_script_env()
    )


@pytest.mark.timeout(180)
def test_trainer_and_two_ranks_as_written(endpoint: str) -> None:
    ranks = [
        _start(str(EXAMPLES / "rank.py"), "--endpoint", endpoint, "--rank", "0", "--steps", "2"),
        _start(str(EXAMPLES / "rank.py"), "--endpoint", endpoint, "--rank", "1", "--steps", "2", "--meta"),
    ]
    trainer = _start(str(EXAMPLES / "trainer.py"), "--endpoint", endpoint, "--ranks", "2", "--steps", "2")
    try:
        out, _ = trainer.communicate(timeout=150)
        assert trainer.returncode == 0, out
        assert "step 2:" in out and "to 2 rank(s)" in out, out
        outputs = []
        for proc in ranks:
            text, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0, text
            outputs.append(text)
        for rank, text in enumerate(outputs):
            assert f"rank {rank}: serving step_2 (model intact: True)" in text, text
        # each rank's last line: a rank that waited for step_1 after step_2 landed says step_2 twice
        generated = [[line for line in text.splitlines() if "serving step_2" in line][-1].rsplit("generated", 1)[1]
                     for text in outputs]
        assert len(generated) == 2 and generated[0] == generated[1]  # both ranks serve the trainer's weights
    finally:
        for proc in (trainer, *ranks):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.mark.timeout(120)
def test_every_example_script_says_how_to_run_it() -> None:
    scripts = ["vllm_worker.py", "trainer_loop.py", "fastdeploy_rank.py", "paddle_trainer.py"]
    if not _has("paddle"):
        scripts = scripts[:2]
    procs = {name: _start(str(EXAMPLES / name), "--help") for name in scripts}
    try:
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=100)
            assert proc.returncode == 0, f"{name}: {out}"
            assert "usage:" in out and "--endpoint" in out and "python examples/" in out, f"{name}: {out}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None  # without importing it here


# --- digests: what both sides hold, compared by sha256 per tensor ------------------------------


def _sha(blocks: Iterable[Any]) -> str:
    """sha256 of the concatenated bytes of ``blocks`` (row blocks of one tensor, in order)."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(block.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fused_digests(named_blocks: Iterable[tuple[str, list[Any]]]) -> dict[str, str]:
    """Digests under the vLLM engine's names: q|k|v rows as qkv_proj, gate|up as gate_up_proj
    (torch.cat of the unfused tensors, hashed without making it)."""
    from vllm_model import STACKED_PARAMS_MAPPING

    groups: dict[str, list[tuple[int, list[Any]]]] = {}
    for name, blocks in named_blocks:
        target, order = name, 0
        for index, (fused, unfused, _) in enumerate(STACKED_PARAMS_MAPPING):
            if f".{unfused}." in name:
                target, order = name.replace(f".{unfused}.", f".{fused}."), index
                break
        groups.setdefault(target, []).append((order, blocks))
    return {name: _sha(b for _, blocks in sorted(parts, key=lambda p: p[0]) for b in blocks) for name, parts in groups.items()}


def _get(queue: Any, want: str) -> tuple[Any, ...]:
    """The next message from ``queue``; it must be of kind ``want`` (a worker's error shows as such)."""
    msg = queue.get(timeout=WAIT_S)
    assert msg[0] == want, f"expected a {want!r} message, got {msg!r}"
    return tuple(msg[1:])


def _stop(procs: Iterable[Any]) -> None:
    for proc in procs:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join(10)


@pytest.fixture
def spawn() -> Iterator[Any]:
    ctx = mp.get_context("spawn")
    started: list[Any] = []

    def start(target: Any, *args: Any) -> Any:
        proc = ctx.Process(target=target, args=args)
        proc.start()
        started.append(proc)
        return proc

    start.ctx = ctx  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for proc in started:
            if proc.is_alive():
                proc.kill()
            proc.join(10)


# --- 1. the vLLM worker extension -------------------------------------------------------------


def _hf_trainer(endpoint: str, ranks: int, versions: int, out: Any, go: Any) -> None:
    """A trainer with a Hugging Face Llama (unfused q/k/v, gate/up): pushes by HF name, and says
    what each rank must hold (fused), its logits and its greedy tokens."""
    try:
        import torch
        from model import PROMPT, build_model

        from weightstream import BucketSender

        model = build_model(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with BucketSender(endpoint, receivers=ranks, bucket_bytes=64 << 10, timeout=60) as sender:
            for step in range(1, versions + 1):
                loss = model(torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))).logits.pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                report = sender.push(model.named_parameters(), version=f"step_{step}")
                with torch.no_grad():
                    logits = model(torch.tensor(PROMPT)).logits[0].numpy()
                    tokens = model.generate(torch.tensor(PROMPT), max_new_tokens=4, do_sample=False, pad_token_id=0)
                fused = _fused_digests((n, [p]) for n, p in model.named_parameters())
                out.put(("trainer", step, report.committed, fused, logits, tokens[0, len(PROMPT[0]):].tolist()))
                go.get(timeout=WAIT_S)  # the ranks are checked before the next version lands
    except BaseException as exc:
        out.put(("error", f"trainer: {type(exc).__name__}: {exc}"))
        raise


def _vllm_rank(endpoint: str, rank: int, versions: int, staged: bool, out: Any) -> None:
    """The stand-in engine, with the extension loaded by dotted name, called through collective_rpc."""
    try:
        import torch
        from model import CONFIG, PROMPT
        from vllm_model import LLM

        llm = LLM(CONFIG, worker_extension_cls="vllm_worker.WeightstreamWorkerExtension", rank=rank, seed=10 + rank)
        (started,) = llm.collective_rpc("start_weightstream", args=(endpoint,), kwargs={"staged": staged})
        try:
            for step in range(1, versions + 1):
                (status,) = llm.collective_rpc("wait_weightstream_version", args=(f"step_{step}", WAIT_S))
                model = llm.workers[0].model_runner.model
                digests = {n: _sha([p]) for n, p in model.named_parameters()}
                logits = model(torch.tensor(PROMPT))[0].numpy()
                out.put(("rank", rank, step, started, status, digests, logits, llm.generate(PROMPT[0], 4)))
        finally:
            (stopped,) = llm.collective_rpc("stop_weightstream")
        out.put(("rank-exit", rank, stopped))
    except BaseException as exc:
        out.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


@pytest.mark.timeout(180)
def test_vllm_worker_extension_loads_fused_params_from_hf_names(endpoint: str, spawn: Any) -> None:
    import numpy as np

    versions = 2
    ctx = spawn.ctx
    outs, trainer_out, go = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Queue()
    ranks = [spawn(_vllm_rank, endpoint, r, versions, r == 1, outs[r]) for r in range(2)]  # rank 1 staged
    trainer = spawn(_hf_trainer, endpoint, 2, versions, trainer_out, go)
    for step in range(1, versions + 1):
        at, committed, fused, logits, tokens = _get(trainer_out, "trainer")
        assert at == step and committed
        for rank in range(2):
            _, at, started, status, digests, rank_logits, rank_tokens = _get(outs[rank], "rank")
            assert at == step and started["rank"] == rank
            assert status["version"] == f"step_{step}" and status["model_intact"], status
            assert set(digests) == set(fused), (sorted(digests), sorted(fused))  # every fused param, nothing else
            wrong = sorted(n for n in fused if digests[n] != fused[n])
            assert not wrong, f"rank {rank} step {step}: not torch.cat of the trainer's tensors: {wrong}"
            np.testing.assert_allclose(rank_logits, logits, rtol=1e-5, atol=1e-6)
            assert rank_tokens == tokens, (rank, step, rank_tokens, tokens)
        go.put("next")
    for rank in range(2):
        _, stopped = _get(outs[rank], "rank-exit")
        assert stopped["version"] == f"step_{versions}"
    _stop([trainer, *ranks])
    assert [p.exitcode for p in (trainer, *ranks)] == [0, 0, 0]


# --- 2. the FastDeploy-style Paddle rank ------------------------------------------------------


def _paddle_digests(main: Any, draft: Any) -> dict[str, str]:
    from paddle_model import named_tensors

    return {name: hashlib.sha256(t.numpy().tobytes()).hexdigest() for name, t in named_tensors(main, draft)}


def _paddle_trainer(endpoint: str, model_dir: str, trainer_dir: str, steps: int, hold_after: int, out: Any, go: Any) -> None:
    try:
        from paddle_trainer import run

        def ready(step: int, main: Any, draft: Any) -> None:
            out.put(("trainer", step, _paddle_digests(main, draft)))

        def pushed(step: int, main: Any, draft: Any) -> None:
            out.put(("trainer", step, _paddle_digests(main, draft)))
            if step == hold_after:
                go.get(timeout=WAIT_S)  # the test restarts the rank here
            elif step < steps:
                go.get(timeout=WAIT_S)  # lockstep: the rank is checked before the next version lands

        code = run(endpoint, model_dir=Path(model_dir), trainer_dir=Path(trainer_dir), ranks=1, steps=steps,
                   timeout=WAIT_S, on_ready=ready, on_step=pushed)
        out.put(("trainer-exit", code))
    except BaseException as exc:
        out.put(("error", f"trainer: {type(exc).__name__}: {exc}"))
        raise


def _fastdeploy_rank(endpoint: str, model_dir: str, snapshot_dir: str, steps: int, out: Any) -> None:
    try:
        from fastdeploy_rank import run

        def served(version: str, main: Any, draft: Any) -> None:
            out.put(("rank", version, _paddle_digests(main, draft)))

        code = run(endpoint, rank=0, model_dir=Path(model_dir), snapshot_dir=Path(snapshot_dir), steps=steps,
                   timeout=WAIT_S, on_version=served)
        out.put(("rank-exit", code))
    except BaseException as exc:
        out.put(("error", f"rank: {type(exc).__name__}: {exc}"))
        raise


def _snapshot_step(snapshot_dir: Path) -> str | None:
    import yaml

    try:
        return str(yaml.safe_load((snapshot_dir / "version.yaml").read_text())["step"])
    except (OSError, TypeError, KeyError):
        return None


@pytest.mark.timeout(180)
def test_fastdeploy_rank_restores_its_snapshot_after_kill_9_then_serves_on(tmp_path: Path, endpoint: str, spawn: Any) -> None:
    pytest.importorskip("paddle")
    model_dir, trainer_dir, snapshot_dir = tmp_path / "model", tmp_path / "trainer", tmp_path / "snapshots"
    ctx = spawn.ctx
    trainer_out, go = ctx.Queue(), ctx.Queue()
    trainer = spawn(_paddle_trainer, endpoint, str(model_dir), str(trainer_dir), 3, 2, trainer_out, go)
    expected = {0: _get(trainer_out, "trainer")[1]}  # the model dir is written: step 0
    assert (model_dir / "version.yaml").is_file()

    first_out = ctx.Queue()
    first = spawn(_fastdeploy_rank, endpoint, str(model_dir), str(snapshot_dir), 3, first_out)
    version, held = _get(first_out, "rank")
    assert version == "0" and held == expected[0]  # bootstrapped from the model dir, main model and MTP draft
    assert any(n.startswith("mtp.") for n in held) and any(not n.startswith("mtp.") for n in held)
    for step in (1, 2):
        at, expected[step] = _get(trainer_out, "trainer")
        version, held = _get(first_out, "rank")
        assert at == step and version == str(step)
        assert held == expected[step], f"step {step}: differs in {sorted(n for n in held if held[n] != expected[step].get(n))}"
        if step == 1:
            go.put("next")
    deadline = time.monotonic() + WAIT_S
    while _snapshot_step(snapshot_dir) != "2":  # the snapshot is written on the rank's apply thread, after COMMIT
        assert time.monotonic() < deadline, f"no snapshot of step 2 in {sorted(p.name for p in snapshot_dir.iterdir())}"
        time.sleep(0.05)
    first.kill()  # SIGKILL: no BYE, no cleanup
    first.join(10)
    assert first.exitcode == -9

    second_out = ctx.Queue()
    second = spawn(_fastdeploy_rank, endpoint, str(model_dir), str(snapshot_dir), 3, second_out)
    version, held = _get(second_out, "rank")  # reported before the rank connects: restored without a sender
    assert version == "2", f"expected the snapshot's step 2, got {version!r}"
    assert held == expected[2], f"restored step 2 differs in {sorted(n for n in held if held[n] != expected[2][n])}"
    go.put("next")
    at, expected[3] = _get(trainer_out, "trainer")
    version, held = _get(second_out, "rank")
    assert at == 3 and version == "3" and held == expected[3]
    assert _get(second_out, "rank-exit") == (0,)
    assert _get(trainer_out, "trainer-exit") == (0,)
    _stop([trainer, second])
    assert (trainer.exitcode, second.exitcode) == (0, 0)
    assert not list(snapshot_dir.glob(".snapshot-tmp-*"))  # the killed rank's temp dir (if any) is gone


# --- 3. the trainer loop: lazy pushes, one gathered parameter at a time --------------------------


def _loop_trainer(endpoint: str, ranks: int, steps: int, out: Any, go: Any) -> None:
    try:
        from trainer_loop import run

        def pushed(step: int, report: Any, params: Any, tracker: Any) -> None:
            sent = {name: _sha(blocks) for name, blocks in params.shards.items()}
            fused = _fused_digests(params.shards.items())
            out.put(("trainer", step, report is not None and report.committed, sent, fused, tracker.peak_count,
                     tracker.alive(), len(params.shards), min(len(b) for b in params.shards.values())))
            if step < steps:
                go.get(timeout=WAIT_S)

        code = run(endpoint, ranks=ranks, steps=steps, shards=4, bucket_bytes=64 << 10, timeout=WAIT_S, on_step=pushed)
        out.put(("trainer-exit", code))
    except BaseException as exc:
        out.put(("error", f"trainer: {type(exc).__name__}: {exc}"))
        raise


def _hf_rank(endpoint: str, rank: int, steps: int, out: Any) -> None:
    """A rank like examples/rank.py: a Hugging Face Llama, loaded by state-dict name."""
    try:
        from model import build_model

        model = build_model(seed=100 + rank)
        with ReceiverDaemon(endpoint, TorchModuleSink(model), rank=rank) as daemon:
            for step in range(1, steps + 1):
                daemon.wait_for_version(f"step_{step}", WAIT_S)
                out.put(("rank", rank, step, {n: _sha([p]) for n, p in model.named_parameters()}))
    except BaseException as exc:
        out.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise


@pytest.mark.timeout(180)
def test_trainer_loop_gathers_one_param_at_a_time_into_hf_and_vllm_ranks(endpoint: str, spawn: Any) -> None:
    steps = 2
    ctx = spawn.ctx
    outs, trainer_out, go = [ctx.Queue(), ctx.Queue()], ctx.Queue(), ctx.Queue()
    ranks = [spawn(_hf_rank, endpoint, 0, steps, outs[0]), spawn(_vllm_rank, endpoint, 1, steps, False, outs[1])]
    trainer = spawn(_loop_trainer, endpoint, 2, steps, trainer_out, go)
    for step in range(1, steps + 1):
        at, committed, sent, fused, peak, alive, params, shards = _get(trainer_out, "trainer")
        assert at == step and committed and shards == 4
        assert 1 <= peak <= GATHERED_ALIVE_MAX < params, f"{peak} gathered params alive at once (of {params})"
        assert alive == 0  # nothing keeps a gathered parameter once the push returned
        _, at, hf = _get(outs[0], "rank")
        assert at == step and hf == sent, f"rank 0 step {step}: differs in {sorted(n for n in sent if hf.get(n) != sent[n])}"
        _, at, _, _, vllm, _, _ = _get(outs[1], "rank")
        assert at == step and vllm == fused, f"rank 1 step {step}: differs in {sorted(n for n in fused if vllm.get(n) != fused[n])}"
        if step < steps:
            go.put("next")
    assert _get(trainer_out, "trainer-exit") == (0,)
    _get(outs[1], "rank-exit")
    _stop([trainer, *ranks])
    assert [p.exitcode for p in (trainer, *ranks)] == [0, 0, 0]


@pytest.mark.timeout(120)
def test_trainer_loop_reports_failed_pushes_and_gives_up(endpoint: str) -> None:
    """A rank whose model lacks a parameter rejects every version: the script prints each push's
    report (the rank's outcome) and stops after --max-failures, leaving the rank untouched."""
    import numpy as np
    from model import build_model

    state = {n: np.zeros(tuple(p.shape), np.float32) for n, p in build_model(seed=0).named_parameters()}
    dropped = state.pop("model.norm.weight")
    with ReceiverDaemon(endpoint, NumpySink(state), rank=0) as daemon:
        trainer = _start(str(EXAMPLES / "trainer_loop.py"), "--endpoint", endpoint, "--ranks", "1", "--steps", "3",
                         "--max-failures", "2", "--timeout", "60")
        try:
            text, _ = trainer.communicate(timeout=100)
        finally:
            if trainer.poll() is None:
                trainer.kill()
                trainer.wait(10)
        assert trainer.returncode == 1, text
        assert "step 1: push failed (1 in a row): ManifestMismatch" in text, text
        assert "step 2: push failed (2 in a row)" in text and "step 3:" not in text, text
        assert text.count("rank 0: rejected (model intact: True)") == 2, text
        assert "model.norm.weight" in text, text  # the report names what the rank did not expect
        assert daemon.committed_version is None and daemon.status.model_intact
    assert dropped.shape == (64,) and all(not a.any() for a in state.values())
