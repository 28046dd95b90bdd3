"""Randomly initialised transformers language models with tokenizers trained here on the Python
docs text (``pydoc_data``): what the text-import tests serve (tests/text_models.py) and what the
text benchmark measures (``python -m loadtest.random_lms llama-30m FOLDER``). Nothing is
downloaded.

* a byte-level BPE (GPT-2's kind) with ChatML special tokens;
* a SentencePiece-style BPE with byte fallback (``<0xE2>`` tokens), built the way transformers
  converts a Llama ``tokenizer.model``: a ``▁`` word marker, a beginning-of-text token added by the
  post-processor; with a chat template that raises on an unknown role."""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
LLAMA_CHAT = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
              "{{ raise_exception('Conversation roles must be system, user or assistant, not ' + message['role']) }}"
              "{% endif %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
VOCAB = 2048


def docs_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def byte_level_tokenizer(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = docs_text()
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)],
                            trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def sentencepiece_tokenizer(size: int = VOCAB):
    """Llama's converted tokenizer, in small: BPE over ``▁``-marked words with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    text = docs_text()
    # Only ASCII letters in the alphabet: everything else goes through the byte-fallback tokens.
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)],
                            trainers.BpeTrainer(vocab_size=size - 256, special_tokens=["<unk>", "<s>", "</s>"],
                                                show_progress=False, limit_alphabet=90))
    raw = json.loads(tok.to_str())
    vocab = raw["model"]["vocab"]
    for b in range(256):  # the byte tokens are ordinary vocabulary entries, as in Llama's
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(raw))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_tokenizer(tok, folder: Path, template: str, **specials) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **specials).save_pretrained(folder)


def llama_30m(folder: Path, seed: int = 0) -> Path:
    """A Llama-architecture model of about 30 M parameters (8 layers, 512 wide, grouped-query
    attention with 4 key/value heads, an 8k vocabulary), randomly initialised, saved with its
    tokenizer, chat template and generation config: the text benchmark's imported model."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = sentencepiece_tokenizer(8192)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=512, intermediate_size=1376,
                                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2))
    model.eval().save_pretrained(folder)
    save_tokenizer(tokenizer, folder, LLAMA_CHAT, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    GenerationConfig(eos_token_id=2, bos_token_id=1).save_pretrained(folder)
    print(f"{folder}: LlamaForCausalLM, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "llama-30m":
        sys.exit("usage: python -m loadtest.random_lms llama-30m FOLDER")
    llama_30m(Path(sys.argv[2]))
