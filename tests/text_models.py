"""Third-party language models for the text-import tests, built at test time (nothing is
downloaded): randomly initialised ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and
``Qwen2ForCausalLM`` saved with ``save_pretrained`` beside a tokenizer trained here on the Python
docs text (``pydoc_data``), a chat template and a generation config.

* GPT-2 and Qwen2 get a byte-level BPE tokenizer with ChatML-style special tokens;
* Llama gets a SentencePiece-style BPE with byte fallback (``<0xE2>`` tokens) built the way
  transformers converts a Llama ``tokenizer.model``: a ``▁`` word marker, a beginning-of-text token
  added by the post-processor, and a template that raises on an unknown role.

``python tests/text_models.py FOLDER`` builds them in FOLDER and imports each into the model store
at $BENTOML_HOME (a process of its own, so the tests' shared store never sees them)."""

from __future__ import annotations

import sys
from pathlib import Path

TEXT_MODELS = ("hf-gpt2", "hf-llama", "hf-qwen2")


def docs_text() -> str:
    from loadtest.random_lms import docs_text as text

    return text()


def text_models(folder: Path) -> dict[str, Path]:
    import torch

    from loadtest.random_lms import CHATML, LLAMA_CHAT, byte_level_tokenizer, save_tokenizer, sentencepiece_tokenizer
    from transformers import (GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    chatml = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    llama_tok = sentencepiece_tokenizer()
    v_chatml, v_llama = chatml.get_vocab_size(), llama_tok.get_vocab_size()
    end, im_end = chatml.token_to_id("<|endoftext|>"), chatml.token_to_id("<|im_end|>")
    # A wide initialisation spreads the random logits, so greedy choices are not decided by float noise.
    made = {
        "hf-gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=v_chatml, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                               bos_token_id=end, eos_token_id=end, initializer_range=0.2)),
                    chatml, CHATML, {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, [end, im_end], end),
        "hf-llama": (LlamaForCausalLM(LlamaConfig(vocab_size=v_llama, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                                  initializer_range=0.2)),
                     llama_tok, LLAMA_CHAT, {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}, [2], 1),
        "hf-qwen2": (Qwen2ForCausalLM(Qwen2Config(vocab_size=v_chatml, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                                  max_position_embeddings=256, bos_token_id=end, eos_token_id=im_end,
                                                  tie_word_embeddings=True, initializer_range=0.2)),
                     chatml, CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, [im_end, end], None),
    }
    out = {}
    for name, (model, tok, template, specials, eos, bos) in made.items():
        target = folder / name
        model.eval().save_pretrained(target)
        save_tokenizer(tok, target, template, **specials)
        GenerationConfig(eos_token_id=eos, bos_token_id=bos, do_sample=True, temperature=0.7, top_p=0.9).save_pretrained(target)
        out[name] = target
    return out


def main(folder: Path) -> None:
    from export.imports import import_huggingface

    folder.mkdir(parents=True, exist_ok=True)
    for name, path in text_models(folder).items():
        import_huggingface(path, name, context_window=256, max_new_tokens=128, max_batch=16)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
