"""A stand-in for the parts of vLLM that a worker extension touches, small enough to read.

- ``LlamaForCausalLM``: a vLLM-shaped decoder built from a Hugging Face ``LlamaConfig``. Like
  vLLM's it holds FUSED parameters (``qkv_proj`` = q|k|v rows, ``gate_up_proj`` = gate|up rows)
  and loads Hugging Face names through ``load_weights(weights)`` with vLLM's
  ``stacked_params_mapping``: each unfused tensor goes into its shard of the fused parameter
  through ``param.weight_loader(param, loaded_weight, shard_id)``. One process holds the whole
  model (tensor parallel size 1), so a loader never narrows a tensor to a TP shard.
- ``Worker`` (holding ``model_runner.model``) and ``LLM``, an engine that loads a worker
  extension class BY DOTTED NAME (``worker_extension_cls="vllm_worker.WeightstreamWorkerExtension"``),
  mixes it into its Worker class and calls its methods through ``collective_rpc(method, args=...)``.

Nothing here is weightstream: examples/vllm_worker.py is the part a user writes. This module has
no command line of its own; see that file for how to run the pair.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig

from weightstream import ConfigError

# (fused parameter, Hugging Face name, shard id), as in vLLM's llama.py
STACKED_PARAMS_MAPPING: list[tuple[str, str, str | int]] = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]


@dataclass(frozen=True)
class Dims:
    """A Hugging Face Llama config's sizes, as plain numbers (the config types most as optional)."""

    vocab: int
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    tied: bool

    @classmethod
    def of(cls, config: LlamaConfig) -> Dims:
        heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
        rope: Any = config.rope_parameters or {}
        return cls(
            vocab=int(config.vocab_size), hidden=hidden, inter=int(config.intermediate_size),
            layers=int(config.num_hidden_layers), heads=heads, kv_heads=int(config.num_key_value_heads or heads),
            head_dim=int(config.head_dim or hidden // heads), eps=float(config.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 10000.0)), tied=bool(config.tie_word_embeddings),
        )


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
    """Copy a whole tensor into ``param`` (the view dies when the iterator advances: copy, never keep)."""
    if param.shape != loaded_weight.shape or param.dtype != loaded_weight.dtype:
        raise ConfigError(
            f"weight: expected {param.dtype}{list(param.shape)}, got {loaded_weight.dtype}{list(loaded_weight.shape)}; "
            "fix: build the engine's model from the trainer's config"
        )
    param.data.copy_(loaded_weight)


class _FusedRows(nn.Module):
    """A bias-free linear layer whose weight stacks several outputs by rows (vLLM's
    ``MergedColumnParallelLinear`` / ``QKVParallelLinear``, at tensor parallel size 1)."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_ids: Sequence[str | int]) -> None:
        super().__init__()
        self.output_sizes = list(output_sizes)  # vLLM's attribute of the same name
        self.shard_ids = list(shard_ids)
        self.weight = nn.Parameter(torch.empty(sum(output_sizes), in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]  # vLLM tags params this way

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str | int) -> None:
        """Copy one unfused tensor into its rows of the fused ``param``."""
        if shard_id not in self.shard_ids:
            raise ConfigError(f"weight_loader: expected a shard id in {self.shard_ids}, got {shard_id!r}; fix: the stacked-params mapping")
        index = self.shard_ids.index(shard_id)
        start, size = sum(self.output_sizes[:index]), self.output_sizes[index]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded_weight.shape or target.dtype != loaded_weight.dtype:
            raise ConfigError(
                f"shard {shard_id!r}: expected {target.dtype}{list(target.shape)}, "
                f"got {loaded_weight.dtype}{list(loaded_weight.shape)}; fix: build the engine's model from the trainer's config"
            )
        target.copy_(loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight.requires_grad_(False)
    return layer


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = dims.heads, dims.kv_heads, dims.head_dim
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv_proj = _FusedRows(dims.hidden, [q, kv, kv], ["q", "k", "v"])
        self.o_proj = _linear(q, dims.hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, scale=self.head_dim**-0.5)
        return cast(torch.Tensor, self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)))


class MLP(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.gate_up_proj = _FusedRows(dims.hidden, [dims.inter, dims.inter], [0, 1])
        self.down_proj = _linear(dims.inter, dims.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # vLLM's SiluAndMul
        return cast(torch.Tensor, self.down_proj(F.silu(gate) * up))


class DecoderLayer(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.self_attn = Attention(dims)
        self.post_attention_layernorm = RMSNorm(dims.hidden, dims.eps)
        self.mlp = MLP(dims)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + cast(torch.Tensor, self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(dims.vocab, dims.hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(dims) for _ in range(dims.layers))
        self.norm = RMSNorm(dims.hidden, dims.eps)
        inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, dims.head_dim, 2, dtype=torch.float) / dims.head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # computed here, never loaded

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return cast(torch.Tensor, self.norm(x))


class LlamaForCausalLM(nn.Module):
    """A vLLM-shaped Llama: fused qkv_proj and gate_up_proj, Hugging Face names on load."""

    # which Hugging Face layers each fused one packs, in row order (vLLM's class attribute)
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.dims = dims = Dims.of(config)
        self.model = LlamaModel(dims)
        self.lm_head = _linear(dims.hidden, dims.vocab)
        if dims.tied:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor: named_parameters() lists it once

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for every position of ``input_ids`` (batch, length)."""
        return cast(torch.Tensor, self.lm_head(self.model(input_ids)))

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding without a KV cache (enough for a check, not for speed)."""
        tokens = list(prompt)
        for _ in range(max_new_tokens):
            logits = self.forward(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
        return tokens[len(prompt):]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader: Hugging Face names in, fused parameters filled shard by shard.

        Each ``(name, tensor)`` may be a view that dies when the iterator advances, so every
        loader copies. Returns the parameter names loaded (vLLM's convention).
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, loaded_weight in weights:
            if "rotary_emb.inv_freq" in name:  # computed by the engine, never loaded
                continue
            if self.dims.tied and name == "lm_head.weight":
                continue  # the same tensor as model.embed_tokens.weight
            for param_name, weight_name, shard_id in STACKED_PARAMS_MAPPING:
                if weight_name not in name:
                    continue
                fused = name.replace(weight_name, param_name)
                param = _param(params, fused, name)
                param.weight_loader(param, loaded_weight, shard_id)  # type: ignore[attr-defined]
                loaded.add(fused)
                break
            else:
                param = _param(params, name, name)
                getattr(param, "weight_loader", default_weight_loader)(param, loaded_weight)
                loaded.add(name)
        return loaded


def _param(params: dict[str, nn.Parameter], name: str, sent: str) -> nn.Parameter:
    found = params.get(name)
    if found is None:
        raise ConfigError(
            f"load_weights: tensor {sent!r}: expected a name of this model (as {name!r}), got none; "
            "fix: send Hugging Face names of the same architecture"
        )
    return found


# --- the engine ------------------------------------------------------------------------------


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model = model


class Worker:
    """One GPU's worker in vLLM; here one process's whole model, on the CPU."""

    def __init__(self, config: LlamaConfig, rank: int, seed: int) -> None:
        self.rank = rank
        self.local_rank = rank
        self.device = torch.device("cpu")
        torch.manual_seed(seed)  # the engine's own (dummy) weights until the first update
        model = LlamaForCausalLM(config)
        for param in model.parameters():
            param.data.normal_(0.0, 0.02)
        self.model_runner = ModelRunner(model.eval())


def resolve_obj_by_qualname(qualname: str) -> Any:
    """``"package.module.Name"`` -> the object, as vLLM resolves ``worker_extension_cls``."""
    module_name, _, attr = qualname.rpartition(".")
    if not module_name:
        raise ConfigError(f"worker_extension_cls: expected a dotted name like 'pkg.module.Class', got {qualname!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"worker_extension_cls={qualname!r}: expected an importable class, got {type(exc).__name__}: {exc}; "
            "fix: put its module on sys.path (PYTHONPATH)"
        ) from None


class LLM:
    """The engine: one worker per process, an extension class mixed in by dotted name."""

    def __init__(self, config: LlamaConfig, *, worker_extension_cls: str, rank: int = 0, seed: int = 1) -> None:
        extension = resolve_obj_by_qualname(worker_extension_cls)
        clashes = sorted(n for n in vars(extension) if not n.startswith("__") and hasattr(Worker, n))
        if clashes:  # vLLM refuses an extension that would shadow the worker's own attributes
            raise ConfigError(f"worker_extension_cls: expected new method names, got {clashes} that Worker already has")
        worker_cls = type("Worker", (Worker, extension), {})
        self.workers = [worker_cls(config, rank=rank, seed=seed)]

    def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> list[Any]:
        """Call ``method`` on every worker; one result per worker, as in vLLM."""
        return [getattr(worker, method)(*args, **(kwargs or {})) for worker in self.workers]

    def generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        model: LlamaForCausalLM = self.workers[0].model_runner.model
        return model.generate(prompt, max_new_tokens)
