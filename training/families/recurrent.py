"""Recurrent language models (LSTM, GRU) for the text-generation family: token embedding, a stacked
``nn.LSTM``/``nn.GRU`` and a head tied to the embedding, trained on the same tokenizer, windows and
loss as the GPT. The exported graph is one decoding call that carries the recurrent state in and
out, so serving decodes incrementally with a fixed-size state per row (no cache that grows)."""

from __future__ import annotations

import torch
from torch import nn

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
# What each cell carries from step to step: LSTM the hidden and the cell state, GRU the hidden only.
STATE_PARTS = {"lstm": ("h", "c"), "gru": ("h",)}


class RecurrentLM(nn.Module):
    """``forward(input_ids) -> logits`` like the GPT, so the family's loss, evaluation and sampling
    are shared; ``n_embd`` is both the embedding and the hidden width (the head is tied)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.architecture not in CELLS:
            raise ValueError(f"architecture: {cfg.architecture!r}; choose gpt2, {', '.join(CELLS)}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = CELLS[cfg.architecture](cfg.n_embd, cfg.n_embd, cfg.n_layer, batch_first=True,
                                           dropout=cfg.dropout if cfg.n_layer > 1 else 0.0)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, as the GPT's head is

    @property
    def state_parts(self) -> tuple[str, ...]:
        return STATE_PARTS[self.cfg.architecture]

    def run(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None):
        """(B, T) ids and a (layers, B, hidden) state per part -> (B, T, V) logits and the new state."""
        if state is not None and len(state) == 1:
            state = state[0]  # nn.GRU takes its one state tensor bare
        out, new = self.rnn(self.drop(self.embed(input_ids)), state)
        return self.head(self.drop(out)), (new if isinstance(new, tuple) else (new,))

    def forward(self, input_ids):  # (B, T) -> (B, T, V), from a zero state
        return self.run(input_ids)[0]


class RecurrentStep(nn.Module):
    """The exported graph: given new tokens (B, T) and each state part batch-first (B, layers,
    hidden), returns the last position's logits (B, 1, V) and the state after the last token. A
    prefill is a call with the prompt and a zero state; a decoding step is a call with one token.
    Batch-first so the engine's rows are the first axis of every array it keeps."""

    def __init__(self, model: RecurrentLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *state):
        logits, new = self.model.run(input_ids, tuple(s.transpose(0, 1).contiguous() for s in state))
        return (logits[:, -1:], *(s.transpose(0, 1) for s in new))


def state_names(parts: tuple[str, ...], prefix: str) -> list[str]:
    return [f"{prefix}.{part}" for part in parts]
