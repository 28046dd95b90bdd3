"""The user's own language models: a transformers causal LM folder (``save_pretrained``: GPT-2, and
Llama with the architectures that share its graph, Qwen2 and Mistral) stored as a text model that
the continuous-batching engine serves like the suite's own GPT.

What comes from the folder:

* the weights, exported as the decoding step of ``training/decoders.py`` (a key/value cache with
  per-row positions) by the suite's one export routine, with its parity gate: ONNX Runtime against
  the step in PyTorch, and the step against transformers' own forward pass row by row;
* ``tokenizer.json`` (byte-level BPE, or a SentencePiece model converted to a fast tokenizer),
  copied as it is: the engine tokenizes and detokenizes with it;
* from ``tokenizer_config.json``: the chat template (or ``chat_template.jinja``) and the special
  tokens it renders with;
* from ``generation_config.json`` (else ``config.json``): the end-of-text token ids and the
  sampling defaults (temperature, top_k, top_p, repetition_penalty, max_new_tokens).

``python -m export import int8 NAME --text FILE`` makes the int8 variant, kept only when its
next-token loss on the user's text stays within the gate of fp32's."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from common.files import atomic_write
from contract import ONNX_FILE, ModelContract
from export.importing import (ImportRefused, check_name, default_name, settle_int8_gate, store_import,
                              store_int8_variant)

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DEFAULT_CONTEXT_WINDOW = 2048  # a model's own window may be far larger; the cache grows with it
PARITY_TOLERANCE = 1e-3  # logits of a causal LM over a few thousand classes; float32 sums of ~1e3 terms
CHECK_TEXT = ("def main(argv):\n    total = sum(int(x) * 2 for x in argv[1:])\n    print('total:', total)\n"
              "    return 0\n\nThe quick brown fox jumps over the lazy dog. Les élèves étudient à l'école.")


def is_causal_lm(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith(CAUSAL_LM_SUFFIXES) for a in config.get("architectures") or [])


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"{path.name}: not readable JSON ({exc})") from None


def _token_text(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken-like object."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    """The folder's default chat template: ``chat_template.jinja`` (what transformers writes now),
    else tokenizer_config.json's ``chat_template`` (a string, or a list of named ones)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


def text_extra(folder: Path, config, tokenizer) -> dict[str, Any]:
    """What the engine and the chat front-end read from the folder (contract ``extra``)."""
    tokenizer_config = _json(folder / "tokenizer_config.json")
    generation = _json(folder / "generation_config.json")
    eos = generation.get("eos_token_id", getattr(config, "eos_token_id", None))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    eos_token = _token_text(tokenizer_config.get("eos_token"))
    if not eos_ids and eos_token and tokenizer.token_to_id(eos_token) is not None:
        eos_ids = [tokenizer.token_to_id(eos_token)]
    if not eos_ids:
        raise ImportRefused(f"{folder.name}: no end-of-text token (generation_config.json or config.json "
                            "eos_token_id, or tokenizer_config.json eos_token)")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if any(not 0 <= i < max(vocab, config.vocab_size) for i in eos_ids):
        raise ImportRefused(f"{folder.name}: eos_token_id {eos_ids} is outside the vocabulary")
    bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
    defaults = {k: generation[k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
                if isinstance(generation.get(k), (int, float)) and not isinstance(generation.get(k), bool)}
    if "top_k" in defaults and generation.get("do_sample") is not True and "temperature" not in defaults:
        defaults.pop("top_k")  # transformers' own default top_k 50 only applies when sampling
    return {"tokenizer_file": TOKENIZER_FILE, "end_of_text": eos_token or tokenizer.id_to_token(eos_ids[0]),
            "eos_token_ids": eos_ids, "bos_token_id": bos if isinstance(bos, int) else None,
            "special_tokens": {k: _token_text(tokenizer_config.get(k)) for k in ("bos_token", "eos_token", "unk_token",
                                                                                 "pad_token")
                               if _token_text(tokenizer_config.get(k))},
            "chat_template": chat_template(folder, tokenizer_config), "sampling_defaults": defaults,
            "pooling": "mean"}


def import_causal_lm(folder: Path, name: str | None = None, store: bool = True,
                     context_window: int = DEFAULT_CONTEXT_WINDOW, max_new_tokens: int | None = None,
                     max_batch: int = 64) -> tuple[ModelContract, str | None]:
    """A transformers causal LM folder -> (contract, store tag)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    from export.onnx_export import export_module
    from training import decoders

    config_json = _json(folder / "config.json")
    architecture = (config_json.get("architectures") or [""])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ImportRefused(f"{folder.name}: transformers {transformers.__version__} has no {architecture}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(f"{folder.name}: config.json: {str(exc).splitlines()[0][:300]}") from None
    why = decoders.unsupported(config)
    if why:
        raise ImportRefused(f"{folder.name}: {why} is not supported")
    if not (folder / TOKENIZER_FILE).is_file():
        raise ImportRefused(f"{folder.name}: no {TOKENIZER_FILE}; save a fast tokenizer with the model "
                            "(a SentencePiece model converts with transformers' AutoTokenizer(use_fast=True))")
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(f"{folder.name}: {TOKENIZER_FILE} is not a tokenizers file: {exc}") from None
    if tokenizer.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise ImportRefused(f"{folder.name}: the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} "
                            f"tokens, the model's vocabulary {config.vocab_size}")
    extra = text_extra(folder, config, tokenizer)
    try:
        lm = model_class.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval()
    except Exception as exc:  # noqa: BLE001
        raise ImportRefused(f"{folder.name}: transformers could not load it: {str(exc).splitlines()[0][:300]}") from None
    shape = decoders.DecoderShape.of(config)
    window = min(shape.max_positions, context_window)
    if window < 32:
        raise ImportRefused(f"{folder.name}: a context window of {window} tokens is too small to serve")
    cap = min(max_new_tokens or window // 2, window - 1)
    name = check_name(name or default_name(folder))
    ids = tokenizer.encode(CHECK_TEXT).ids or [0]
    while len(ids) < 24:
        ids = ids * 2
    prompt = torch.tensor(ids[:min(48, window - 8)])  # the parity check's text
    limits = {"max_new_tokens": cap, "context_window": window, "max_prompt_chars": window * 16, "max_batch": max_batch}
    contract = decoders.contract(name, "huggingface", f"{shape.model_type}-{shape.n_layer}layer-{shape.hidden}wide",
                                 shape, limits, extra)
    spec = decoders.export_spec(lm, prompt, window)
    with tempfile.TemporaryDirectory(prefix="suite-import-") as tmp:
        path = Path(tmp) / ONNX_FILE
        try:
            contract, diff = export_module(spec, contract, {"family": "huggingface"}, path, PARITY_TOLERANCE)
        except Exception as exc:  # noqa: BLE001 - torch.export's errors are long; the first line says what
            raise ImportRefused(f"exporting {architecture} failed: {type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0][:400]}") from exc
        tokenizer_copy = Path(tmp) / TOKENIZER_FILE
        tokenizer_copy.write_bytes((folder / TOKENIZER_FILE).read_bytes())
        tag = store_import(contract, path, diff, {"from": architecture, "folder": folder.name},
                           extra_files=[tokenizer_copy]) if store else None
    log.info("%s: imported %s (%d parameters, window %d), parity %.2e%s", name, architecture,
             sum(p.numel() for p in lm.parameters()), window, diff, f", stored as {tag}" if tag else "")
    return contract, tag


# ---- the int8 variant, gated by next-token loss on the user's text ----------------------------------

GATE_WINDOW = 128  # tokens per window of the gate's text
GATE_TOKENS = 4096  # the most tokens of the text the gate reads


def _nll(run, windows: list[list[int]], n_kv: int, head_dim: int, n_layer: int) -> float:
    """Mean next-token loss (nats/token) of a decoding-step graph over ``windows``, every position's
    logits in one run per window."""
    import numpy as np

    total, count = 0.0, 0
    for window in windows:
        ids = np.array([window], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(window))[None],
                 "logit_index": np.arange(len(window) - 1, dtype=np.int64),
                 **{f"past.{i}.{kv}": np.zeros((1, n_kv, 0, head_dim), np.float32)
                    for i in range(n_layer) for kv in ("key", "value")}}
        logits = run(feeds)["logits"][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        total -= float(log_probs[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return total / count


def _decode_feeds(contract: ModelContract, rows: int = 8, past: int = 128) -> dict:
    """A batched decoding step with a ``past``-slot cache: what serving runs most."""
    import numpy as np

    extra = contract.extra
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(0, 100, (rows, 1)), "attention_mask": np.ones((rows, past + 1), np.int64),
            "position_ids": np.full((rows, 1), past, np.int64), "logit_index": np.zeros(1, np.int64),
            **{f"past.{i}.{kv}": rng.standard_normal((rows, extra["n_kv_head"], past, extra["head_dim"])).astype(np.float32)
               for i in range(extra["n_layer"]) for kv in ("key", "value")}}


def import_text_int8(name: str, stored, text_path: Path, max_loss: float = 0.02, store: bool = True):
    """``<name>-int8``: ONNX Runtime's dynamic int8 quantization of a stored text model, kept only
    when its mean next-token loss on ``text_path`` (the user's own text) is within ``max_loss``
    nats/token of fp32's and a batched decoding step runs faster; else ``VariantRefused`` with the
    figures. -> (the gate, the store tag or None)."""
    import dataclasses

    from tokenizers import Tokenizer

    from common.runtime import OnnxSession, read_contract
    from export.variants import Gate, _median_ms, _with_contract, quantize_int8

    folder = Path(stored.path)
    source = folder / ONNX_FILE
    contract = read_contract(source)
    if not any(t.name == "logit_index" for t in contract.inputs):
        raise ImportRefused(f"{name}'s graph predates the gate's every-position logits; re-export it")
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportRefused(f"--calibration {text_path}: a UTF-8 text file for a text model ({exc})") from None
    tokenizer = Tokenizer.from_file(str(folder / contract.extra["tokenizer_file"]))
    ids = tokenizer.encode(text).ids[:GATE_TOKENS]
    window = min(GATE_WINDOW, contract.limits["context_window"])
    windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window - 1) if len(ids[i:i + window]) > 1]
    if sum(map(len, windows)) < 256:
        raise ImportRefused(f"--calibration {text_path}: {len(ids)} tokens; the gate needs at least 256")
    extra = contract.extra
    dims = (extra["n_kv_head"], extra["head_dim"], extra["n_layer"])
    variant_name = check_name(f"{name}-int8"[:63])
    variant_contract = dataclasses.replace(contract, name=variant_name,
                                           extra={**extra, "variant": "int8", "variant_of": name})
    done: dict = {}

    def write(tmp: Path) -> None:
        method = quantize_int8(source, tmp, [], ("MatMul", "Gemm"), "dynamic")
        _with_contract(tmp, variant_contract, {"variant": "int8"})
        base, quantized = OnnxSession(source, intra_op_threads=1), OnnxSession(tmp, intra_op_threads=1)
        step = [_decode_feeds(contract)]
        gate = Gate("int8", "next-token loss, nats/token", _nll(base.run, windows, *dims),
                    _nll(quantized.run, windows, *dims), max_loss, False, _median_ms(base.run, step),
                    _median_ms(quantized.run, step), f"{method}; measured on {sum(map(len, windows))} tokens of "
                    f"{text_path.name}", timed_on="a decoding step of 8 rows over a 128-token cache, one thread")
        settle_int8_gate(gate, f"loses {gate.loss:.4f} nats/token against fp32, more than the {max_loss:g} allowed"
                         if gate.loss > gate.tolerance else None)
        done["gate"] = gate

    with tempfile.TemporaryDirectory(prefix="suite-import-") as tmp:
        path = Path(tmp) / ONNX_FILE
        atomic_write(path, write)
        gate = done["gate"]
        tag = store_int8_variant(variant_name, stored, contract, gate, path,
                                 [folder / extra["tokenizer_file"]]) if store else None
    log.info("%s: %s; %s", variant_name, gate.reason, gate.summary())
    return gate, tag
