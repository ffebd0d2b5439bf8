"""The model both example scripts build: a small Llama (tied embeddings, rotary buffers) from a
Hugging Face config, with random weights (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT = [[1, 5, 9, 17]]
CONFIG = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
)


def build_model(seed: int | None, meta: bool = False) -> Any:
    model: Any
    if meta:
        with torch.device("meta"):
            model = LlamaForCausalLM(CONFIG)
    else:
        torch.manual_seed(seed or 0)
        model = LlamaForCausalLM(CONFIG)
    return model.eval()
