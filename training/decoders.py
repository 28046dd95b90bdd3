"""Causal language models as the text engine runs them: one decoding step with a key/value cache,
for the transformers architectures the suite trains (GPT-2) or imports (GPT-2, and Llama with the
architectures that share its graph: Qwen2, Mistral). The generate family and
``python -m export import huggingface`` both export through here, so a trained and an imported
model have one graph signature, one parity check against transformers and one contract shape.

The graph (``graph_version`` 4 of the generate family):

* inputs ``input_ids`` (batch, new), ``attention_mask`` (batch, past + new; 1 = a real slot),
  ``position_ids`` (batch, new; per row, so rows of different ages share a step),
  ``logit_index`` (k,): the new positions whose logits come out (the last one when decoding; every
  prompt position for prompt logprobs), and ``past.{layer}.{key|value}`` (batch, kv_heads, past,
  head_dim);
* outputs ``logits`` (batch, k, vocab), ``hidden`` (batch, new, hidden): the final-normed last
  hidden state (embeddings pool it), and ``new.{layer}.{key|value}``: the new tokens' keys/values
  only.

It runs the transformers model's own modules (embeddings, norms, projections, rotary embedding,
MLPs, head), with attention written out so the past is only read: scores against the past and
against the new tokens, one softmax, two weighted sums. Nothing in the graph copies the cache; the
engine writes each step's keys/values into its preallocated buffer. Grouped-query attention groups
the queries per key/value head instead of repeating the cache."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim

from contract import ModelContract, TensorSpec

# model_type -> the step that runs it
LLAMA_LIKE = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # a static frequency table; "dynamic" depends on the length


@dataclass(frozen=True)
class DecoderShape:
    """What the cache and contract need to know of a transformers causal LM."""

    model_type: str
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden: int
    vocab: int
    max_positions: int

    @classmethod
    def of(cls, config) -> "DecoderShape":
        if config.model_type == "gpt2":
            return cls("gpt2", config.n_layer, config.n_head, config.n_head, config.n_embd // config.n_head,
                       config.n_embd, config.vocab_size, config.n_positions)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        positions = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
            positions = min(positions, window)  # attention within the window is full attention
        return cls(config.model_type, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads or config.num_attention_heads, head_dim, config.hidden_size,
                   config.vocab_size, positions)


def unsupported(config) -> str | None:
    """Why this transformers config cannot run as a decoding step here, or None."""
    kind = config.model_type
    if kind == "gpt2":
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
            return "a GPT-2 with non-default attention scaling"
        if getattr(config, "add_cross_attention", False):
            return "a GPT-2 with cross-attention"
        return None
    if kind not in LLAMA_LIKE:
        return f"model_type {kind!r} (supported: gpt2, {', '.join(LLAMA_LIKE)})"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rope_type {rope!r} (supported: {', '.join(ROPE_TYPES)})"
    if getattr(config, "mlp_bias", False) and kind != "llama":
        return "an MLP bias outside Llama"
    return None


def cache_names(n_layer: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def attention_bias(attention_mask: torch.Tensor, new: int, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """(batch, past + new) mask -> (batch, 1, new, past + new) additive bias: a new token sees the
    row's real past slots and the real new tokens up to itself. Additive and finite, not -inf: a
    padding query that may attend to nothing gets a finite (unused) row."""
    batch = attention_mask.shape[0]
    mask = attention_mask.bool()
    causal = torch.ones(new, new, dtype=torch.bool).tril()
    allowed = torch.cat([mask[:, None, :slots].expand(batch, new, slots), mask[:, None, slots:] & causal], dim=2)
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, -1e9)[:, None]


def attend(q, k, v, past_key, past_value, bias, scale: float):
    """Attention of q (batch, heads, new, dim) over past + new keys/values (batch, kv_heads, ., dim)
    without concatenating or repeating them: queries sharing a key/value head are stacked along the
    sequence axis. -> (batch, new, heads * dim)."""
    batch, heads, new, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    slots = past_key.shape[2]
    q = q.reshape(batch, kv_heads, groups * new, dim)
    if groups > 1:
        bias = bias[:, :, None].expand(-1, -1, groups, -1, -1).reshape(batch, 1, groups * new, bias.shape[-1])
    scores = torch.cat([q @ past_key.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1) * scale + bias
    probs = scores.softmax(dim=-1)
    out = probs[..., :slots] @ past_value + probs[..., slots:] @ v  # (batch, kv_heads, groups * new, dim)
    return out.reshape(batch, heads, new, dim).transpose(1, 2).reshape(batch, new, heads * dim)


class GPT2Step(nn.Module):
    """A GPT-2 (``GPT2LMHeadModel``) as one decoding step."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.shape = DecoderShape.of(lm.config)

    def forward(self, input_ids, attention_mask, position_ids, logit_index, *past):
        model, s = self.lm.transformer, self.shape
        batch, new = input_ids.shape
        x = model.wte(input_ids) + model.wpe(position_ids)
        bias = attention_bias(attention_mask, new, past[0].shape[2], x.dtype)
        outputs = []
        for i, block in enumerate(model.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(s.n_head * s.head_dim, dim=2)
            q, k, v = (t.view(batch, new, s.n_head, s.head_dim).transpose(1, 2) for t in (q, k, v))
            attended = attend(q, k, v, past[2 * i], past[2 * i + 1], bias, 1.0 / math.sqrt(s.head_dim))
            x = x + block.attn.c_proj(attended)
            x = x + block.mlp(block.ln_2(x))
            outputs += [k, v]
        hidden = model.ln_f(x)
        return (self.lm.lm_head(hidden.index_select(1, logit_index)), hidden, *outputs)


class LlamaStep(nn.Module):
    """A Llama-architecture model (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
    ``MistralForCausalLM``) as one decoding step: RMS norms, rotary positions from the model's own
    rotary module (its rope scaling included), grouped-query attention, gated MLP."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.shape = DecoderShape.of(lm.config)
        # The modelling module's own rotation, so a variant's (Qwen2's, Mistral's) is the one used.
        self.rotate = sys.modules[type(lm.model.layers[0].self_attn).__module__].apply_rotary_pos_emb

    def forward(self, input_ids, attention_mask, position_ids, logit_index, *past):
        model, s = self.lm.model, self.shape
        batch, new = input_ids.shape
        x = model.embed_tokens(input_ids)
        cos, sin = model.rotary_emb(x, position_ids)
        bias = attention_bias(attention_mask, new, past[0].shape[2], x.dtype)
        outputs = []
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(batch, new, s.n_head, s.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(batch, new, s.n_kv_head, s.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(batch, new, s.n_kv_head, s.head_dim).transpose(1, 2)
            q, k = self.rotate(q, k, cos, sin)
            x = x + attn.o_proj(attend(q, k, v, past[2 * i], past[2 * i + 1], bias, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            outputs += [k, v]
        hidden = model.norm(x)
        return (self.lm.lm_head(hidden.index_select(1, logit_index)), hidden, *outputs)


def decoder_step(lm) -> nn.Module:
    """The decoding step of a transformers causal LM (``unsupported`` says which ones run)."""
    return (GPT2Step if lm.config.model_type == "gpt2" else LlamaStep)(lm).eval()


INPUT_NAMES = ["input_ids", "attention_mask", "position_ids", "logit_index"]


def left_padded(rows: list[torch.Tensor], past: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (input_ids, attention_mask over ``past`` all-real slots +
    the new ones, position_ids), padded on the left; pad slots hold token 0 and position 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), past + width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, :past] = 1
        mask[i, past + width - len(r):] = 1
        positions[i, width - len(r):] = torch.arange(past, past + len(r))
    return ids, mask, positions


def export_spec(lm, prompt: torch.Tensor, context_window: int):
    """The ``ExportSpec`` of ``lm``'s decoding step, checked on ``prompt`` (at least 16 tokens):
    ONNX Runtime against the step in PyTorch (a prefill, a multi-token step, a one-token step), and
    the step against transformers' own forward pass: rows of unequal lengths prefilled together
    (left-padded), then one decoding step where every row has a different past, must give each row's
    logits as the model gives them for that row alone."""
    from training.family import ExportSpec

    step = decoder_step(lm)
    s = step.shape
    names = [*INPUT_NAMES, *cache_names(s.n_layer, "past")]

    def feeds(rows: list[torch.Tensor], past: tuple = (), past_length: int = 0, logits: torch.Tensor | None = None):
        past = past or tuple(torch.zeros(len(rows), s.n_kv_head, 0, s.head_dim) for _ in range(2 * s.n_layer))
        ids, mask, positions = left_padded(rows, past_length)
        index = logits if logits is not None else torch.tensor([ids.shape[1] - 1])
        return (ids, mask, positions, index, *past)

    def extend(past: tuple, new: tuple) -> tuple:
        return tuple(torch.cat([p, n], dim=2) for p, n in zip(past, new))

    half = len(prompt) // 2
    first = feeds([prompt[:half], prompt[1:half + 1]])
    with torch.no_grad():
        past = step(*first)[2:]
        # Two logits rows (prompt logprobs read several); not the same count as the new tokens,
        # so export keeps the two axes apart.
        middle = feeds([prompt[half:-1], prompt[half + 1:]], past, half, torch.tensor([0, len(prompt) - half - 2]))
        past = extend(past, step(*middle)[2:])
    last = feeds([prompt[-1:], prompt[:1]], past, len(prompt) - 1)

    rows = [prompt, prompt[3:16], prompt[10:15]]
    prefill = feeds(rows)
    nexts = [prompt[i:i + 1] for i in (1, 2, 3)]
    with torch.no_grad():
        prefill_kv = step(*prefill)[2:]
        alone = [lm(input_ids=r[None]).logits[:, -1:] for r in rows]
        alone_next = [lm(input_ids=torch.cat([r, n])[None]).logits[:, -1:] for r, n in zip(rows, nexts)]
    _, mask, _ = left_padded(rows)
    decode = (torch.stack(nexts), torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], 1),
              torch.tensor([[len(r)] for r in rows]), torch.tensor([0]), *prefill_kv)
    references = [(prefill, (torch.cat(alone),)), (decode, (torch.cat(alone_next),))]

    b = Dim("batch", min=1, max=64)
    t, p = Dim("sequence", min=1, max=context_window), Dim("past", min=0, max=context_window)
    k = Dim("logits", min=1, max=context_window)
    dynamic = ({0: b, 1: t}, {0: b, 1: Dim.AUTO}, {0: b, 1: t}, {0: k}, tuple({0: b, 2: p} for _ in range(2 * s.n_layer)))
    outputs = ["logits", "hidden", *cache_names(s.n_layer, "new")]
    return ExportSpec(step, middle, names, outputs, dynamic, [first, middle, last], references)


def contract(name: str, family: str, architecture: str, shape: DecoderShape, limits: dict, extra: dict) -> ModelContract:
    """A decoding step's contract: its tensors, the limits, and what the engine needs in ``extra``
    (the tokenizer file, end-of-text tokens, sampling defaults, chat template)."""
    kv = shape.n_kv_head
    past = [TensorSpec(n, "float32", [-1, kv, -1, shape.head_dim], ["batch", "kv_head", "past_sequence", "head_dim"])
            for n in cache_names(shape.n_layer, "past")]
    new = [TensorSpec(n, "float32", [-1, kv, -1, shape.head_dim], ["batch", "kv_head", "sequence", "head_dim"])
           for n in cache_names(shape.n_layer, "new")]
    return ModelContract(
        name=name, family=family, task="text-generation", architecture=architecture,
        inputs=[TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"]),
                TensorSpec("attention_mask", "int64", [-1, -1], ["batch", "past_and_sequence"]),
                TensorSpec("position_ids", "int64", [-1, -1], ["batch", "sequence"]),
                TensorSpec("logit_index", "int64", [-1], ["logits"],
                           "the new positions whose logits come out (the last one when decoding)"), *past],
        outputs=[TensorSpec("logits", "float32", [-1, -1, shape.vocab], ["batch", "logits", "vocab"]),
                 TensorSpec("hidden", "float32", [-1, -1, shape.hidden], ["batch", "sequence", "hidden"],
                            "the final-normed last hidden state of the new positions"), *new],
        limits=limits,
        extra={"decoder": "kv-cache", "n_layer": shape.n_layer, "n_head": shape.n_head, "n_kv_head": kv,
               "head_dim": shape.head_dim, "hidden": shape.hidden, **extra})
