"""The models of the FastDeploy-style examples (examples/fastdeploy_rank.py, examples/paddle_trainer.py):
a small Paddle decoder (the main model) and a multi-token-prediction (MTP) draft model that
proposes the token after next from the main model's last hidden state, as DeepSeek/ERNIE MTP
layers do. The draft shares the main model's embedding and head; its own parameters travel under
the ``mtp.`` prefix. Random weights from a seed, nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paddle
import paddle.nn.functional as F
from paddle import nn

from weightstream.receiver.snapshot_writer import SnapshotWriter

VOCAB, HIDDEN, HEADS, FFN, LAYERS = 128, 64, 4, 256, 2
MTP_PREFIX = "mtp."
PROMPT = [3, 14, 15, 92, 65]


class Block(nn.Layer):
    """Pre-norm causal self-attention and a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.ffn_norm = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        batch, length = x.shape[0], x.shape[1]
        q, k, v = (
            t.reshape([batch, length, HEADS, HIDDEN // HEADS]).transpose([0, 2, 1, 3])
            for t in paddle.split(self.qkv(self.attn_norm(x)), 3, axis=-1)
        )
        scores = (q @ k.transpose([0, 1, 3, 2])) * (HIDDEN // HEADS) ** -0.5
        mask = paddle.triu(paddle.full([length, length], float("-inf")), diagonal=1)
        attn = (F.softmax(scores + mask, axis=-1) @ v).transpose([0, 2, 1, 3]).reshape([batch, length, HIDDEN])
        x = x + self.out(attn)
        out: paddle.Tensor = x + self.down(F.gelu(self.up(self.ffn_norm(x))))
        return out


class MainModel(nn.Layer):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.LayerList([Block() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias_attr=False)

    def forward(self, ids: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(logits, last hidden states) for ``ids`` (batch, length)."""
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        hidden = self.norm(x)
        return self.lm_head(hidden), hidden


class MTPDraft(nn.Layer):
    """Position t: the main model's hidden state at t and the embedding of token t+1 -> token t+2."""

    def __init__(self) -> None:
        super().__init__()
        self.enorm = nn.LayerNorm(HIDDEN)
        self.hnorm = nn.LayerNorm(HIDDEN)
        self.eh_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias_attr=False)
        self.block = Block()
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, main: MainModel, hidden: paddle.Tensor, next_ids: paddle.Tensor) -> paddle.Tensor:
        x = self.eh_proj(paddle.concat([self.enorm(main.embed(next_ids)), self.hnorm(hidden)], axis=-1))
        logits: paddle.Tensor = main.lm_head(self.norm(self.block(x)))
        return logits


def build_models(seed: int | None, lazy: bool = False) -> tuple[MainModel, MTPDraft]:
    """The main model and its draft: from ``seed``, or with no data at all (``lazy``: built under
    ``paddle.LazyGuard``, as an engine does before it loads a checkpoint)."""
    if lazy:
        with paddle.LazyGuard():
            return MainModel(), MTPDraft()
    paddle.seed(seed or 0)
    return MainModel(), MTPDraft()


def named_tensors(main: MainModel, draft: MTPDraft) -> list[tuple[str, Any]]:
    """What the trainer sends: the main model's state dict, then the draft's under ``mtp.``."""
    return [*main.state_dict().items(), *((MTP_PREFIX + n, t) for n, t in draft.state_dict().items())]


@paddle.no_grad()
def greedy(main: MainModel, draft: MTPDraft, prompt: list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    """Greedy tokens of the main model, and what the draft proposed one step ahead of each."""
    tokens, proposals = list(prompt), []
    for _ in range(new_tokens):
        logits, hidden = main(paddle.to_tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
        proposals.append(int(draft(main, hidden[:, -1:], paddle.to_tensor([[tokens[-1]]]))[0, -1].argmax()))
    return tokens[len(prompt):], proposals


def write_model_dir(model_dir: str | Path, main: MainModel, draft: MTPDraft, step: int, ranks: int = 1) -> None:
    """Save the models as a model dir every rank can start from: ``version.yaml`` (``step: N``) and
    one ``model_state.tp{rank}.{step}`` safetensors set per rank, the layout ``daemon.restore`` reads."""
    for rank in range(ranks):
        with SnapshotWriter(model_dir, rank) as writer:
            writer.begin()
            for name, tensor in named_tensors(main, draft):
                writer.load_one(name, tensor)
            writer.commit(str(step))
