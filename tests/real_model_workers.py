"""Spawned ranks for test_real_models: a Hugging Face Llama built from a config (random weights,
no download) on the CPU or on the meta device, fed by a ReceiverDaemon through TorchModuleSink."""

from __future__ import annotations

import traceback
from typing import Any

CONFIG = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)
PROMPT = [[1, 5, 9, 17, 33, 2]]
HB = {"heartbeat_interval": 0.1, "heartbeat_timeout": 5.0}


def build(tie: bool, dtype: str, seed: int | None, device: str = "cpu") -> Any:
    """A tiny LlamaForCausalLM; ``seed`` None with device "meta" builds it with no storage."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIG, tie_word_embeddings=tie)
    torch_dtype = getattr(torch, dtype)
    if device == "meta":
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        return model.to(torch_dtype).eval()
    torch.manual_seed(seed or 0)
    model = LlamaForCausalLM(cfg).to(torch_dtype).eval()
    with torch.no_grad():  # spread the values, so that different seeds generate differently
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def state_digests(model: Any) -> dict[str, str]:
    """xxh3 of every parameter's and buffer's bytes, by name (tied names listed each)."""
    import torch
    import xxhash

    out = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t.is_meta:
            out[name] = "meta"
            continue
        raw = t.detach().contiguous().view(torch.uint8) if t.element_size() == 1 else t.detach().contiguous()
        data = raw.view(torch.int16) if t.dtype == torch.bfloat16 else raw
        out[name] = f"{t.dtype}:{tuple(t.shape)}:{xxhash.xxh3_64_hexdigest(data.numpy().tobytes())}"
    return out


def generate(model: Any) -> list[list[int]]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, pad_token_id=0)
    return out.tolist()  # type: ignore[no-any-return]


def rank_main(endpoint: str, rank: int, tie: bool, dtype: str, device: str, versions: list[str], queue: Any) -> None:
    """Serve ``versions`` in order; after each report the status, digests and greedy generation."""
    try:
        from dataclasses import asdict

        from weightstream import ReceiverDaemon, WeightstreamError
        from weightstream.receiver.sinks import TorchModuleSink

        model = build(tie, dtype, seed=100 + rank, device=device)
        daemon = ReceiverDaemon(endpoint, TorchModuleSink(model), rank=rank, **HB).start()
        try:
            queue.put({"event": "started", "rank": rank})
            for version in versions:
                try:
                    daemon.wait_for_version(version, timeout=90)
                except WeightstreamError as exc:
                    queue.put({"event": "failed", "rank": rank, "version": version, "error": f"{type(exc).__name__}: {exc}",
                               "status": asdict(daemon.status)})
                    continue
                tied = model.lm_head.weight is model.model.embed_tokens.weight
                queue.put({"event": "committed", "rank": rank, "version": version, "status": asdict(daemon.status),
                           "digests": state_digests(model), "tokens": generate(model), "tied": tied})
        finally:
            daemon.stop()
    except BaseException as exc:  # report, never hang the test
        queue.put({"event": "crashed", "rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})


def readme_code() -> tuple[str, str]:
    """README's "Use it" example, as (trainer part, rank part)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Use it", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    head, rest = block.split("# trainer process", 1)
    trainer, rank = rest.split("# each inference rank", 1)
    return head + trainer, head + rank


def readme_rank_main(endpoint: str, rank: int, queue: Any) -> None:
    """Run the README's rank part as written (its endpoint and rank= swapped) on a tied Llama."""
    try:
        _, code = readme_code()
        code = code.replace("ipc:///tmp/ws/gpu0.sock", endpoint).replace("rank=0", f"rank={rank}")
        model = build(True, "float32", seed=200 + rank)
        namespace: dict[str, Any] = {"model": model}
        queue.put({"event": "started", "rank": rank})
        exec(compile(code, "README.md (rank)", "exec"), namespace)  # the README's own code
        queue.put({"event": "done", "rank": rank, "committed": namespace["daemon"].committed_version,
                   "intact": namespace["daemon"].status.model_intact, "digests": state_digests(model),
                   "tokens": generate(model)})
    except BaseException as exc:
        queue.put({"event": "crashed", "rank": rank, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()})
