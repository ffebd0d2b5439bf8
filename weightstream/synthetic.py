"""Synthetic models for the demo and bench: realistic names, shapes and dtypes, random bytes.

Every tensor is a view into one random byte buffer (generated once, fast), so a model
of any size costs one allocation. ``bump`` changes every byte in place, cheaply, to
make the next version differ from the last.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .protocol.dtypes import from_numpy

ALIGN = 64  # views start on a cache line so copies of them are not penalised

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)

#: (name, numpy dtype, shape)
Spec = tuple[str, np.dtype, tuple[int, ...]]


@dataclass
class Model:
    """Named tensors that are views into ``buffer`` (one contiguous uint8 array)."""

    buffer: np.ndarray
    tensors: list[tuple[str, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for _, t in self.tensors)

    def specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{name: (canonical dtype name, shape)}`` as sinks/`expected=` describe a model."""
        return {name: (from_numpy(t.dtype).name, tuple(t.shape)) for name, t in self.tensors}

    def bump(self) -> None:
        """Change every byte (add 1 mod 256) in place: a new version of the weights."""
        np.add(self.buffer, 1, out=self.buffer, casting="unsafe")

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return iter(self.tensors)


def random_bytes(nbytes: int, seed: int) -> np.ndarray:
    """``nbytes`` deterministic pseudo-random bytes, ~3 GB/s.

    One 16 MiB block comes from SFC64; each further block is that block plus a
    per-block constant (mod 256), so no two blocks are equal and no per-element
    Python work is done.
    """
    block = 16 << 20
    rng = np.random.Generator(np.random.SFC64(seed))
    first = min(nbytes, block)
    base = rng.integers(0, 2**63 - 1, size=(first + 7) // 8, dtype=np.int64).view(np.uint8)[:first]
    out = np.empty(nbytes, dtype=np.uint8)
    out[:first] = base
    offsets = rng.integers(1, 256, size=max(1, -(-nbytes // block)), dtype=np.uint8)
    for i, pos in enumerate(range(block, nbytes, block)):
        n = min(block, nbytes - pos)
        np.add(base[:n], offsets[i + 1], out=out[pos : pos + n], casting="unsafe")
    return out


def build(specs: list[Spec], seed: int = 0) -> Model:
    """Lay ``specs`` out in one random buffer, each tensor a C-contiguous view."""
    offsets, pos = [], 0
    for _, dtype, shape in specs:
        pos = -(-pos // ALIGN) * ALIGN
        offsets.append(pos)
        pos += dtype.itemsize * math.prod(shape)
    buffer = random_bytes(max(pos, 1), seed)
    tensors = []
    for (name, dtype, shape), off in zip(specs, offsets):
        n = dtype.itemsize * math.prod(shape)
        tensors.append((name, buffer[off : off + n].view(dtype).reshape(shape)))
    return Model(buffer, tensors)


def transformer_specs(total_bytes: int, min_embedding_bytes: int = 0) -> list[Spec]:
    """A decoder-only transformer of about ``total_bytes``.

    Per layer: q/k/v/o (GQA, kv = hidden/4) and gate/up/down MLP in bf16, two fp32
    norms; the embedding and lm_head hold ~25% of the bytes each way (the embedding at
    least ``min_embedding_bytes``, so a bucket must chunk it); a few int64 buffers and
    two fp8 weights with fp32 scales, as a quantised model carries.
    """
    # ~24 layers hold half the bytes; a layer is ~21*hidden^2 bytes in bf16
    hidden = max(256, int(math.sqrt(total_bytes * 0.5 / 24 / 21)) // 128 * 128)
    vocab = max(1024, int(total_bytes * 0.2 / (hidden * 2)))
    if vocab * hidden * 2 < min_embedding_bytes:
        vocab = -(-min_embedding_bytes // (hidden * 2)) + 1
    vocab = -(-vocab // 64) * 64
    kv, inter = hidden // 4, hidden * 8 // 3 // 64 * 64
    layer_bytes = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) + 2 * 4 * hidden
    fp8_bytes = 2 * hidden * inter
    budget = total_bytes - vocab * hidden * 2 * 2 - fp8_bytes
    layers = max(1, budget // layer_bytes)

    specs: list[Spec] = [("model.embed_tokens.weight", BF16, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", F32, (hidden,)),
            (p + "self_attn.q_proj.weight", BF16, (hidden, hidden)),
            (p + "self_attn.k_proj.weight", BF16, (kv, hidden)),
            (p + "self_attn.v_proj.weight", BF16, (kv, hidden)),
            (p + "self_attn.o_proj.weight", BF16, (hidden, hidden)),
            (p + "post_attention_layernorm.weight", F32, (hidden,)),
            (p + "mlp.gate_proj.weight", BF16, (inter, hidden)),
            (p + "mlp.up_proj.weight", BF16, (inter, hidden)),
            (p + "mlp.down_proj.weight", BF16, (hidden, inter)),
        ]
    specs += [
        ("model.mtp.0.mlp.up_proj.weight", FP8, (inter, hidden)),
        ("model.mtp.0.mlp.up_proj.weight_scale", F32, (inter, 1)),
        ("model.mtp.0.mlp.down_proj.weight", FP8, (hidden, inter)),
        ("model.mtp.0.mlp.down_proj.weight_scale", F32, (hidden, 1)),
        ("model.rotary_emb.position_ids", I64, (1, 4096)),
        ("model.layers.0.self_attn.sliding_window_mask", I64, (64,)),
        ("model.expert_routing.counts", I64, (8,)),
        ("model.norm.weight", F32, (hidden,)),
        ("lm_head.weight", BF16, (vocab, hidden)),
    ]
    return specs


def transformer_like(total_bytes: int, seed: int = 0, min_embedding_bytes: int = 0) -> Model:
    return build(transformer_specs(total_bytes, min_embedding_bytes), seed)


def few_large(total_bytes: int, count: int = 4, seed: int = 0) -> Model:
    """``count`` big bf16 matrices of ``total_bytes`` together."""
    cols = 4096
    rows = max(1, total_bytes // count // (cols * 2))
    return build([(f"big.{i}.weight", BF16, (rows, cols)) for i in range(count)], seed)


def many_small(count: int = 100_000, nbytes: int = 4096, seed: int = 0) -> Model:
    """``count`` fp32 tensors of ``nbytes`` each (MoE-style many tiny params)."""
    n = nbytes // 4
    return build([(f"experts.{i // 64}.w{i % 64}", F32, (n,)) for i in range(count)], seed)


def digests(tensors: list[tuple[str, np.ndarray]] | Model | dict[str, np.ndarray]) -> dict[str, int]:
    """xxh3_64 of every tensor's bytes: equal digests on both sides = bit-exact copy."""
    import xxhash

    items = tensors.items() if isinstance(tensors, dict) else tensors
    out = {}
    for name, t in items:
        b = np.ascontiguousarray(t).reshape(-1).view(np.uint8)
        out[name] = xxhash.xxh3_64_intdigest(b)  # type: ignore[arg-type]  # NumPy types __buffer__ on 3.12+ only
    return out
