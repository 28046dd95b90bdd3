"""Text generation pieces that need no model: the sampling parameter parser, per-row sampling with
penalties, and incremental detokenization with stop strings."""

from __future__ import annotations

import numpy as np
import pytest

from services.errors import ServingError
from services.textgen import Detokenizer, RowSampler, SamplingParams, parse_sampling


def test_parse_sampling_fields_and_errors():
    p = parse_sampling({"max_new_tokens": 5, "temperature": 0.5, "repetition_penalty": 1.2, "presence_penalty": -1,
                        "frequency_penalty": 0.5, "ignore_eos": True, "stop": '["a", "b"]', "seed": 7}, cap=10)
    assert (p.max_new_tokens, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (5, 1.2, -1.0, 0.5)
    assert p.ignore_eos and p.stop == ("a", "b") and p.seed == 7
    assert parse_sampling({}, cap=10).seed is not None  # a random seed, echoed to the client
    for values, field in [({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
                          ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 5e-324},
                                                                             "repetition_penalty"),
                          ({"ignore_eos": 1}, "ignore_eos"),
                          ({"max_new_tokens": 11}, "max_new_tokens"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ServingError) as info:
            parse_sampling(values, cap=10)
        assert info.value.field == field and info.value.status == 400


def test_extreme_temperatures_stay_a_distribution():
    """Found by the fuzzer: the smallest positive temperature overflowed the scaled logits to
    inf - inf = NaN. It now tends to greedy, and the largest allowed one still samples."""
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    for seed in range(5):
        tiny = RowSampler(SamplingParams(temperature=5e-324, repetition_penalty=0.01, seed=seed), [1], vocab=4)
        assert tiny.next(logits) == 3
        assert 0 <= RowSampler(SamplingParams(temperature=10, seed=seed), [], vocab=4).next(logits) < 4


def test_penalties_follow_their_definitions():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    rep = RowSampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[0, 1], vocab=4)
    np.testing.assert_allclose(rep.penalized(logits), [1.0, -2.0, 0.5, 3.0])  # positive / 2, negative * 2
    counted = RowSampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), [0], vocab=4)
    assert counted.next(logits) == 3
    assert counted.next(logits) == 3  # 3 - 0.5 - 0.25 = 2.25 still beats 2.0
    np.testing.assert_allclose(counted.penalized(logits), [2.0, -1.0, 0.5, 3.0 - 0.5 - 0.5])
    assert counted.next(logits) == 0  # a tie at 2.0 goes to the lower id: the penalty moved the choice


def test_sampling_is_reproducible_and_respects_filters():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    a = RowSampler(SamplingParams(seed=11), [1], 50)
    b = RowSampler(SamplingParams(seed=11), [1], 50)
    assert [a.next(logits) for _ in range(20)] == [b.next(logits) for _ in range(20)]
    top3 = set(np.argsort(-logits)[:3].tolist())
    sampler = RowSampler(SamplingParams(seed=1, top_k=3), [1], 50)
    assert {sampler.next(logits) for _ in range(200)} <= top3
    sampler = RowSampler(SamplingParams(seed=1, top_p=1e-6), [1], 50)
    assert {sampler.next(logits) for _ in range(50)} == {int(np.argmax(logits))}
    assert RowSampler(SamplingParams(temperature=0), [1], 50).next(logits) == int(np.argmax(logits))


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat. " * 20], trainer)
    return tok


def test_detokenizer_sends_whole_characters_only(tokenizer):
    text = "héllo wörld — ✓ 🙂 the cat"
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) // 2  # multi-byte characters span several byte-level tokens
    detok = Detokenizer(tokenizer, ())
    pieces = []
    for token in ids:
        assert not detok.push(token)
        pieces.append(detok.take(final=False))
    pieces.append(detok.take(final=True))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_cuts_at_stop_and_never_sends_its_start(tokenizer):
    text = "the cat sat on the mat"
    detok = Detokenizer(tokenizer, ("on the",))
    sent, stopped = [], False
    for token in tokenizer.encode(text).ids:
        stopped = detok.push(token)
        if stopped:
            break
        sent.append(detok.take(final=False))
    sent.append(detok.take(final=True))
    assert stopped and "".join(sent) == "the cat sat "
