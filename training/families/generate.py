"""Text generation: a GPT-2 architecture from Hugging Face transformers, trained from scratch with a
byte-level BPE tokenizer, exported with a key/value cache for batched incremental decoding; or a
recurrent language model (LSTM, GRU; ``training/families/recurrent.py``) on the same tokenizer, data
and loss, exported with its recurrent state."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from contract import ModelContract, TensorSpec
from training.data import load_text
from training.families.recurrent import STATE_PARTS, RecurrentLM, RecurrentStep, state_names
from training import decoders
from training.decoders import cache_names
from training.family import Data, ExportSpec, Family

TOKENIZER_FILE = "tokenizer.json"
HF_DIR = "hf"
END_OF_TEXT = "<|endoftext|>"


@dataclass
class GenerateConfig:
    architecture: str = "gpt2"  # gpt2 | lstm | gru
    vocab_size: int = 2048
    # Training window; the GPT's context window (prompt + new tokens must fit in it). A recurrent
    # model's state has no window: it serves up to recurrent_context tokens.
    n_positions: int = 256
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    heldout_fraction: float = 0.1
    max_new_tokens_cap: int = 200
    recurrent_context: int = 4096


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return tok


def gpt2_config(cfg: GenerateConfig, **options):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                      bos_token_id=0, eos_token_id=0, **options)


class GPT(nn.Module):
    """Holds the transformers model; the family talks to it through plain tensors."""

    def __init__(self, cfg: GenerateConfig):
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.cfg = cfg
        self.lm = GPT2LMHeadModel(gpt2_config(cfg, attn_implementation="sdpa"))  # PyTorch's fused attention

    def forward(self, input_ids):  # (B, T) -> (B, T, V)
        return self.lm(input_ids=input_ids).logits


@torch.no_grad()
def sample_text(model: GPT, tokenizer, prompt: torch.Tensor, new_tokens: int, seed: int = 0) -> str:
    """``prompt|continuation``: top-k 40 sampling at temperature 0.8, the served defaults' style."""
    gen = torch.Generator().manual_seed(seed)
    out = prompt[None]
    for _ in range(new_tokens):
        logits = model(out[:, -model.cfg.n_positions:])[:, -1] / 0.8
        top = logits.topk(min(40, logits.shape[-1]))
        choice = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
        out = torch.cat([out, top.indices.gather(1, choice)], dim=1)
    return tokenizer.decode(prompt.tolist()) + "|" + tokenizer.decode(out[0, len(prompt):].tolist())


class GraphLM:
    """The exported decoder standing in for the PyTorch model in ``evaluate``: full logits
    (1, T, V) for a row of ids, one token per call, carrying the key/value cache or the recurrent
    state from call to call as the text engine does."""

    def __init__(self, run, cfg: GenerateConfig):
        self.run, self.cfg = run, cfg

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cfg, logits = self.cfg, []
        if cfg.architecture == "gpt2":
            head_dim = cfg.n_embd // cfg.n_head
            past = {n: np.zeros((1, cfg.n_head, 0, head_dim), np.float32) for n in cache_names(cfg.n_layer, "past")}
            for t, token in enumerate(ids[0].tolist()):
                out = self.run({"input_ids": np.array([[token]]), "attention_mask": np.ones((1, t + 1), np.int64),
                                "position_ids": np.array([[t]]), "logit_index": np.zeros(1, np.int64), **past})
                past = {n: np.concatenate([v, out[n.replace("past", "new")]], axis=2) for n, v in past.items()}
                logits.append(out["logits"])
        else:
            state = {n: np.zeros((1, cfg.n_layer, cfg.n_embd), np.float32)
                     for n in state_names(STATE_PARTS[cfg.architecture], "state")}
            for token in ids[0].tolist():
                out = self.run({"input_ids": np.array([[token]]), **state})
                state = {n: out["new_" + n] for n in state}
                logits.append(out["logits"])
        return torch.from_numpy(np.concatenate(logits, axis=1))


class GenerateFamily(Family):
    name = "generate"
    task = "text-generation"
    config_cls = GenerateConfig
    primary_metric = "heldout_nats_per_char"
    higher_is_better = False
    floor = 1.7
    benchmark_columns = {"heldout_nats_per_char": "validation nats/char"}
    anchors = {"nanoGPT, 10.7M-parameter GPT, GPU": {"heldout_nats_per_char": 1.47},
               "nanoGPT baby GPT, about 3 min on a laptop CPU": {"heldout_nats_per_char": 1.88}}
    benchmark_goal = "at most 1.55 nats/char on tiny-shakespeare's last 10 %"
    graph_version = 4  # 4: logit_index in, hidden out (training/decoders.py); 3: attention_mask + per-row positions
    profiles = {
        "quick": {"train": {"steps": 150, "eval_every": 75, "lr": 3e-3, "batch_size": 8, "warmup_steps": 5},
                  "model": {"vocab_size": 512, "n_embd": 64, "n_layer": 2, "n_positions": 128}},
        "standard": {"train": {"steps": 500, "eval_every": 125, "lr": 2e-3, "batch_size": 16, "warmup_steps": 50,
                               "weight_decay": 0.1}, "model": {}},
        # tiny-shakespeare, last 10 % as validation (nanoGPT's split): about 40 minutes here.
        "benchmark": {"name": "generate-shakespeare", "data": "text/tinyshakespeare.txt",
                      "train": {"steps": 1250, "eval_every": 125, "lr": 1e-3, "batch_size": 32, "warmup_steps": 60,
                                "weight_decay": 0.1},
                      "model": {"vocab_size": 2048, "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 128,
                                "dropout": 0.2}},
    }

    def build(self, cfg: GenerateConfig) -> nn.Module:
        return GPT(cfg) if cfg.architecture == "gpt2" else RecurrentLM(cfg)

    # Dynamic int8 on the projections (and the LSTM's own kernel); a recurrent graph's LSTM/GRU stay
    # fp32 in fp16, where the check runs on a CPU that has no fp16 kernel for them.
    int8_method = "dynamic"
    int8_ops = ("MatMul", "Gemm", "LSTM")
    fp16_keep_fp32 = ("LSTM", "GRU")
    variant_tolerance = 0.02  # nats per character
    GATE_TOKENS = 2048

    def graph_model(self, run, cfg: GenerateConfig):
        return GraphLM(run, cfg)

    def gate_data(self, data: Data) -> Data:
        """The first GATE_TOKENS held-out tokens (token by token through the graph is slow)."""
        ids, n_chars = data.heldout
        short = ids[:self.GATE_TOKENS]
        return dataclasses.replace(data, heldout=(short, len(data.extra["tokenizer"].decode(short.tolist()))))

    def calibration_inputs(self, data: Data, cfg, batches: int = 8):
        return []  # dynamic quantization measures activations at run time

    def load_data(self, cfg: GenerateConfig, train_cfg, data_path, seed) -> Data:
        text, fp, desc = load_text(data_path)
        cut = int(len(text) * (1 - cfg.heldout_fraction))
        train_text, heldout_text = text[:cut], text[cut:]
        tokenizer = train_tokenizer(train_text, cfg.vocab_size)
        cfg.vocab_size = tokenizer.get_vocab_size()
        train_ids = np.asarray(tokenizer.encode(train_text).ids, dtype=np.int64)
        heldout_ids = torch.tensor(tokenizer.encode(heldout_text).ids, dtype=torch.long)
        return Data(self._windows(train_ids, cfg.n_positions, train_cfg.batch_size, seed),
                    (heldout_ids, len(heldout_text)), fp, desc,
                    meta={"chars_per_token": round(len(train_text) / len(train_ids), 3)},
                    extra={"tokenizer": tokenizer})

    @staticmethod
    def _windows(ids: np.ndarray, block: int, batch_size: int, seed: int):
        rng = np.random.default_rng(seed)
        while True:
            starts = rng.integers(0, len(ids) - block - 1, size=batch_size)
            chunk = torch.from_numpy(np.stack([ids[s:s + block + 1] for s in starts]))
            yield chunk[:, :-1], chunk[:, 1:]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model, data: Data) -> dict[str, float]:
        """Total NLL of the held-out text over its characters; windows overlap by one token so
        every token but the first is predicted."""
        ids, n_chars = data.heldout
        block = model.cfg.n_positions
        total_nll, n_tokens = 0.0, 0
        windows = [ids[s:s + block] for s in range(0, len(ids) - 1, block - 1)]
        for w in windows:
            w = w[None]
            if w.shape[1] < 2:
                continue
            logits = model(w[:, :-1])
            total_nll += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            n_tokens += w.shape[1] - 1
        return {"heldout_nats_per_char": total_nll / n_chars, "heldout_nats_per_token": total_nll / n_tokens,
                "heldout_perplexity_per_token": math.exp(min(50.0, total_nll / n_tokens))}

    @torch.no_grad()
    def tensorboard_samples(self, model: GPT, data: Data) -> dict:
        ids, _ = data.heldout
        text = sample_text(model, data.extra["tokenizer"], ids[:16], 80)
        # Markdown: TensorBoard's text plugin renders it; a code block keeps the line breaks.
        return {"samples/generated": f"```\n{text}\n```"}

    def report_figures(self, model: GPT, checkpoint: dict, ckpt_dir: Path) -> dict:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(ckpt_dir / TOKENIZER_FILE))
        (prompt,) = checkpoint["heldout_examples"][0]
        return {"Generated from a held-out prompt (prompt|continuation; top-k 40, temperature 0.8, seed 0)":
                sample_text(model, tokenizer, prompt[0, :16], 200)}

    def save_extra(self, model: GPT, data: Data, out_dir: Path) -> None:
        from common.files import atomic_write

        atomic_write(out_dir / TOKENIZER_FILE, lambda p: data.extra["tokenizer"].save(str(p)))
        if isinstance(model, GPT):
            model.lm.save_pretrained(out_dir / HF_DIR)  # the transformers-native copy, for users of transformers

    def extra_files(self) -> list[str]:
        return [TOKENIZER_FILE]

    def heldout_examples(self, data: Data):
        ids, _ = data.heldout
        return [(ids[None, :24],)]

    def export_spec(self, model: nn.Module, cfg: GenerateConfig, checkpoint: dict) -> ExportSpec:
        if isinstance(model, RecurrentLM):
            return self._recurrent_export_spec(model, cfg, checkpoint)
        (prompt,) = checkpoint["heldout_examples"][0]
        return decoders.export_spec(model.lm, prompt[0], cfg.n_positions)

    @staticmethod
    def _recurrent_export_spec(model: RecurrentLM, cfg: GenerateConfig, checkpoint: dict) -> ExportSpec:
        step = RecurrentStep(model).eval()
        (prompt,) = checkpoint["heldout_examples"][0]
        prompt = prompt[0]
        parts = model.state_parts

        def zero(batch: int) -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(batch, cfg.n_layer, cfg.n_embd) for _ in parts)

        # A prefill from the zero state, then a multi-token and a one-token call carrying its state.
        half = len(prompt) // 2
        first = (torch.stack([prompt[:half], prompt[1:half + 1]]), *zero(2))
        with torch.no_grad():
            state = step(*first)[1:]
            middle = (torch.stack([prompt[half:-1], prompt[half + 1:]]), *state)
            state = step(*middle)[1:]
        last = (torch.stack([prompt[-1:], prompt[:1]]), *state)
        # Incremental equals whole: the prompt's first tokens, then the rest one call at a time,
        # must give the logits the model gives the whole prompt in one pass.
        with torch.no_grad():
            whole = model(prompt[None])[:, -1:]
            state = step(prompt[None, :half], *zero(1))[1:]
            for i in range(half, len(prompt) - 1):
                state = step(prompt[None, i:i + 1], *state)[1:]
        references = [((prompt[None, -1:], *state), (whole,))]
        b, t = Dim("batch", min=1, max=64), Dim("sequence", min=1, max=cfg.recurrent_context)
        dynamic = ({0: b, 1: t}, tuple({0: b} for _ in parts))
        return ExportSpec(step, middle, ["input_ids", *state_names(parts, "state")],
                          ["logits", *state_names(parts, "new_state")], dynamic, [first, middle, last], references)

    def contract(self, cfg: GenerateConfig, checkpoint: dict, ckpt_dir: Path) -> ModelContract:
        if cfg.architecture != "gpt2":
            return self._recurrent_contract(cfg)
        return decoders.contract(
            self.name, self.name, f"gpt2-{cfg.n_layer}layer-{cfg.n_embd}wide", decoders.DecoderShape.of(gpt2_config(cfg)),
            limits={"max_new_tokens": cfg.max_new_tokens_cap, "context_window": cfg.n_positions,
                    "max_prompt_chars": 20_000, "max_batch": 64},
            extra={"tokenizer_file": TOKENIZER_FILE, "end_of_text": END_OF_TEXT})

    def _recurrent_contract(self, cfg: GenerateConfig) -> ModelContract:
        parts = STATE_PARTS[cfg.architecture]
        axes = ["batch", "layer", "hidden"]
        state = [TensorSpec(n, "float32", [-1, cfg.n_layer, cfg.n_embd], axes) for n in state_names(parts, "state")]
        new = [TensorSpec(n, "float32", [-1, cfg.n_layer, cfg.n_embd], axes) for n in state_names(parts, "new_state")]
        return ModelContract(
            name=self.name, family=self.name, task=self.task,
            architecture=f"{cfg.architecture}-{cfg.n_layer}layer-{cfg.n_embd}wide",
            inputs=[TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"]), *state],
            outputs=[TensorSpec("logits", "float32", [-1, 1, cfg.vocab_size], ["batch", "last", "vocab"]), *new],
            limits={"max_new_tokens": cfg.max_new_tokens_cap, "context_window": cfg.recurrent_context,
                    "max_prompt_chars": 20_000, "max_batch": 64},
            extra={"decoder": "recurrent", "tokenizer_file": TOKENIZER_FILE, "end_of_text": END_OF_TEXT,
                   "n_layer": cfg.n_layer, "hidden": cfg.n_embd, "state": list(parts),
                   "trained_window": cfg.n_positions},
        )
