"""Users' own language models (issue 25): randomly initialised GPT-2, Llama and Qwen2 folders with
tokenizers trained here on the Python docs (tests/text_models.py), imported into a store of their
own, run by the continuous-batching engine on ONNX Runtime and compared with transformers on the
same folder; then served by a real `bentoml serve` and called with the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.text_models import TEXT_MODELS

# Users' language models made and imported here, served by a real `bentoml serve` of their own.
pytestmark = pytest.mark.server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Eight prompts of different lengths (1 to ~30 tokens), multi-byte characters among them.
PROMPTS = ["The", "import os\nimport sys\n\ndef main(argv):\n    return", "A list is", "Dictionaries are mutable mappings",
           "class Foo:\n    pass", "x = [i * i for i in range(10)]\nprint(x)  # the squares of the first ten integers",
           "é ☃ 日本 — ok", "while True:"]


@dataclass
class TextImports:
    folder: Path  # the transformers folders
    store: Path  # the store they were imported into
    env: dict


@pytest.fixture(scope="module")
def text_imports(tmp_path_factory) -> TextImports:
    folder = tmp_path_factory.mktemp("text-imports")
    env = {**os.environ, "BENTOML_HOME": str(folder / "bentoml"), "SUITE_ARTIFACTS": str(folder / "artifacts")}
    done = subprocess.run([sys.executable, str(HERE / "text_models.py"), str(folder / "models")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return TextImports(folder / "models", folder / "bentoml" / "models", env)


def stored_folder(imports: TextImports, name: str) -> Path:
    (version,) = [p for p in (imports.store / name).iterdir() if p.is_dir() and (p / "model.onnx").is_file()]
    return version


def engine(imports: TextImports, name: str, **limits):
    from common.runtime import OnnxSession
    from services.textengine import EngineLimits, TextEngine

    folder = stored_folder(imports, name)
    session = OnnxSession(folder / "model.onnx", intra_op_threads=1)
    return TextEngine(name, session.run, session.contract, folder, EngineLimits(**limits))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_greedy_tokens_and_logprobs_match_transformers(text_imports, name):
    """Eight prompts of different lengths submitted together (one batch, rows of different ages)
    give token for token what transformers' generate() gives for each alone, and every generated
    token's log-probability, and its top 5, within 1e-3 of transformers' log-softmax."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from services.textgen import SamplingParams

    text = engine(text_imports, name)

    async def together():
        sequences = text.submit([(p, SamplingParams(max_new_tokens=20, temperature=0, logprobs=5)) for p in PROMPTS])
        return await asyncio.gather(*(s.complete() for s in sequences))

    try:
        done = asyncio.run(together())
    finally:
        text.close()
    lm = AutoModelForCausalLM.from_pretrained(str(text_imports.folder / name)).eval()
    tokenizer = Tokenizer.from_file(str(text_imports.folder / name / "tokenizer.json"))
    identical, worst = 0, 0.0
    for prompt, completion in zip(PROMPTS, done):
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        with torch.no_grad():
            out = lm.generate(ids, do_sample=False, max_new_tokens=20, output_logits=True, return_dict_in_generate=True,
                              temperature=None, top_p=None, top_k=None)
        expected = out.sequences[0, ids.shape[1]:].tolist()
        got = [t.token for t in completion.logprobs]
        # generate() keeps the end-of-text token it stopped at; the engine reports it too (as OpenAI does)
        identical += got == expected
        for token, logits in zip(completion.logprobs, out.logits):
            reference = torch.log_softmax(logits[0].double(), -1)
            worst = max(worst, abs(reference[token.token].item() - token.logprob),
                        *(abs(reference[t].item() - lp) for t, lp in token.top))
            assert [t for t, _ in token.top] == reference.topk(5).indices.tolist()
        assert completion.completion_tokens == len([t for t in got if t not in text.end_ids])
    print(f"\n{name}: greedy identical {identical}/{len(PROMPTS)}, max logprob error {worst:.1e}")
    assert identical == len(PROMPTS)
    assert worst <= 1e-3


def test_a_large_embedding_request_takes_turns_with_decoding(text_imports):
    """An embedding request bigger than one prefill run is split into runs that alternate with the
    decoding steps of a generation in progress, and its vectors equal each input embedded alone."""
    import numpy as np

    from services.textgen import SamplingParams

    inputs = [p + " and more words to make it longer" for p in PROMPTS]
    alone_engine = engine(text_imports, "hf-llama")
    try:
        async def each():
            return [(await alone_engine.embed([text]))[0][0] for text in inputs]

        alone = asyncio.run(each())
    finally:
        alone_engine.close()
    text = engine(text_imports, "hf-llama", prefill_tokens=48)
    order: list[str] = []  # what the engine thread ran, in order
    state = text._state
    hidden, decode = state.hidden, state.decode
    state.hidden = lambda *a: (order.append("embed"), hidden(*a))[1]
    state.decode = lambda *a: (order.append("decode"), decode(*a))[1]

    async def together():
        # queued together: the generation's 100 steps outlast the embedding's runs on this small model
        (sequence,) = text.submit([("while True:", SamplingParams(max_new_tokens=100, temperature=0, ignore_eos=True))])
        vectors, tokens = await text.embed(inputs)
        await sequence.complete()
        return vectors, tokens

    try:
        vectors, tokens = asyncio.run(together())
    finally:
        text.close()
    assert np.allclose(vectors, np.stack(alone), atol=1e-5)
    assert tokens > 48
    embeds = [i for i, what in enumerate(order) if what == "embed"]
    assert len(embeds) >= 3, order  # several runs of at most 48 padded tokens
    assert all(order[a + 1] == "decode" for a in embeds[:-1]), " ".join(order)  # a decoding step after each but the last


def test_streamed_text_is_whole_characters(text_imports):
    """Multi-byte characters split over byte-fallback (Llama's <0xE2> tokens) and byte-level
    (GPT-2) tokens come out whole from the incremental detokenizer (the tokenizers library's
    DecodeStream), token by token after a prompt, and a SentencePiece word keeps its leading space."""
    from tokenizers import Tokenizer

    from services.textgen import Detokenizer

    text = " é ☃ 日本 — naïve café ok"
    for name in ("hf-llama", "hf-gpt2"):
        tokenizer = Tokenizer.from_file(str(stored_folder(text_imports, name) / "tokenizer.json"))
        prompt = tokenizer.encode("Hello").ids
        ids = tokenizer.encode("Hello" + text).ids[len(prompt):]
        if name == "hf-llama":
            assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)  # byte fallback is exercised
        detokenizer = Detokenizer(tokenizer, (), prompt)
        pieces = []
        for token in ids:
            assert not detokenizer.push(token)
            pieces.append(detokenizer.take(final=False))
        pieces.append(detokenizer.take(final=True))
        assert "".join(pieces) == text, name
        assert not any("\ufffd" in p for p in pieces)


def test_import_refuses_what_it_cannot_serve(text_imports, tmp_path):
    """A folder without tokenizer.json, and an architecture the engine has no step for, are refused
    with one line naming why; nothing is stored."""
    import shutil

    from transformers import OPTConfig, OPTForCausalLM

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(text_imports.folder / "hf-gpt2", no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    opt = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             word_embed_proj_dim=16, max_position_embeddings=64)).save_pretrained(opt)
    for folder, reason in ((no_tokenizer, "no tokenizer.json"), (opt, "model_type 'opt'")):
        done = subprocess.run([sys.executable, "-m", "export", "import", "huggingface", str(folder), "--no-store"],
                              env=text_imports.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and reason in done.stdout, done.stdout + done.stderr[-2000:]
    assert not (text_imports.store / "no-tokenizer").exists() and not (text_imports.store / "opt").exists()


def test_mistral_imports_with_its_sliding_window_as_the_context(text_imports, tmp_path):
    """Mistral shares Llama's step; its sliding window caps the context window (attention inside
    the window is full attention), and the import's parity check against transformers passes."""
    import shutil

    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    folder = tmp_path / "mistral"
    MistralForCausalLM(MistralConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                     sliding_window=96, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(text_imports.folder / "hf-llama" / name, folder / name)
    GenerationConfig(eos_token_id=2, bos_token_id=1).save_pretrained(folder)
    done = subprocess.run([sys.executable, "-m", "export", "import", "huggingface", str(folder), "--no-store"],
                          env=text_imports.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "mistral-2layer-64wide" in done.stdout and "context window 96" in done.stdout, done.stdout


def test_int8_variant_is_gated_by_next_token_loss(text_imports, tmp_path):
    """import int8 on a text model measures the next-token loss of both graphs on the user's text
    and a decoding step's time; an impossible tolerance refuses it with the figures, storing
    nothing."""
    from tests.text_models import docs_text

    text = tmp_path / "text.txt"
    text.write_text(docs_text()[:20_000], encoding="utf-8")
    run = [sys.executable, "-m", "export", "import", "int8", "hf-llama", "--calibration", str(text), "--no-store"]
    gated = subprocess.run(run, env=text_imports.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "next-token loss, nats/token" in gated.stdout and "decoding step of 8 rows" in gated.stdout, gated.stdout
    assert gated.returncode in (0, 2)  # kept when within 0.02 nats/token and faster, else refused
    strict = subprocess.run([*run, "--max-loss", "-1"], env=text_imports.env, cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert strict.returncode == 2 and "refused: loses" in strict.stdout and "nothing was written" in strict.stdout
    assert not (text_imports.store / "hf-llama-int8").exists()
    bad = subprocess.run([*run[:-2], str(tmp_path), "--no-store"], env=text_imports.env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "UTF-8 text file" in bad.stdout, bad.stdout


def test_contract_carries_what_serving_reads(text_imports):
    from common.runtime import read_contract

    for name in TEXT_MODELS:
        contract = read_contract(stored_folder(text_imports, name) / "model.onnx")
        extra = contract.extra
        assert contract.task == "text-generation" and extra["decoder"] == "kv-cache"
        assert extra["chat_template"] and extra["eos_token_ids"]
        assert extra["sampling_defaults"] == {"temperature": 0.7, "top_p": 0.9}
        assert contract.limits["context_window"] == 256 and contract.limits["max_new_tokens"] == 128
    llama = read_contract(stored_folder(text_imports, "hf-llama") / "model.onnx")
    assert llama.extra["n_kv_head"] == 2 and llama.extra["n_head"] == 4 and llama.extra["bos_token_id"] == 1
    assert json.loads(json.dumps(llama.extra["special_tokens"]))["bos_token"] == "<s>"


# ---- served: the official openai client against a real `bentoml serve` ----------------------------

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served_text(text_imports):
    """The suite serving the imported text models only, read from their store folder as a pod
    mounts one."""
    from loadtest.servers import start_suite

    server = start_suite({"BENTOML_HOME": str(text_imports.folder.parent / "server-home"),
                          "SUITE_MODEL_DIR": str(text_imports.store), "SUITE_DEFAULT_MODELS": "false",
                          "SUITE_INTRA_OP_THREADS": "1", "SUITE_TEXT_MAX_CHOICES": "4"},
                         text_imports.folder.parent / "serve.log", timeout=180)
    try:
        yield server
    finally:
        server.stop(grace=10)


@pytest.fixture(scope="module")
def client(served_text):
    import openai

    return openai.OpenAI(base_url=f"{served_text.url}/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a list?"}]


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_chat_plain_and_streamed(client, name):
    """The same seeded chat, plain and streamed, gives the same text; the stream opens with the
    assistant's role and ends with the usage chunk; usage counts the template's tokens."""
    plain = client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, seed=7, temperature=0.8)
    events = list(client.chat.completions.create(model=name, messages=CHAT, max_tokens=12, seed=7, temperature=0.8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert events[0].choices[0].delta.role == "assistant"
    streamed = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert streamed == plain.choices[0].message.content
    assert events[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.prompt_tokens == events[-1].usage.prompt_tokens > 10
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_n_and_tokenize(client, served_text):
    import requests

    done = client.chat.completions.create(model="hf-qwen2", messages=CHAT, max_tokens=6, n=3, seed=1,
                                          logprobs=True, top_logprobs=4, temperature=1.0)
    assert sorted(c.index for c in done.choices) == [0, 1, 2]
    assert done.usage.completion_tokens == sum(len(c.logprobs.content) for c in done.choices
                                               if c.finish_reason == "length") + sum(
        len(c.logprobs.content) - 1 for c in done.choices if c.finish_reason == "stop")
    for choice in done.choices:
        for token in choice.logprobs.content:
            assert token.logprob <= 0 and len(token.top_logprobs) == 4
            assert token.top_logprobs[0].logprob >= token.top_logprobs[-1].logprob
            assert bytes(token.bytes).decode("utf-8", "backslashreplace") == token.token
    rendered = requests.post(f"{served_text.url}/tokenize", json={"model": "hf-qwen2", "messages": CHAT}, timeout=30).json()
    assert rendered["count"] == done.usage.prompt_tokens == len(rendered["tokens"])
    text = requests.post(f"{served_text.url}/detokenize", json={"model": "hf-qwen2", "tokens": rendered["tokens"]},
                         timeout=30).json()["prompt"]
    assert text.startswith("<|im_start|>system\nYou answer briefly.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    plain = requests.post(f"{served_text.url}/tokenize", json={"model": "hf-llama", "prompt": "hello world",
                                                               "return_token_strs": True}, timeout=30).json()
    assert plain["tokens"][0] == 1 and plain["max_model_len"] == 256  # Llama's tokenizer adds <s>


def test_completions_logprobs_and_echo(client):
    done = client.completions.create(model="hf-llama", prompt="def main(argv):", max_tokens=5, logprobs=2, echo=True,
                                     temperature=0, extra_body={"ignore_eos": True})
    choice = done.choices[0]
    assert choice.text.startswith("def main(argv):")
    assert choice.logprobs.token_logprobs[0] is None  # the prompt's first token: nothing before it
    assert len(choice.logprobs.tokens) == done.usage.prompt_tokens + 5
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])


def test_json_schema_outputs_always_validate(client):
    """At temperature 1, every json_schema answer parses and validates against the schema."""
    import jsonschema

    for seed in range(12):
        done = client.chat.completions.create(
            model="hf-gpt2", messages=CHAT, max_tokens=100, temperature=1.0, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        choice = done.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    anything = client.completions.create(model="hf-llama", prompt="{", max_tokens=60, temperature=1.0, seed=3,
                                         extra_body={"response_format": {"type": "json_object"}})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].text), dict)


def test_regex_grammar_and_choice(client):
    # llguidance's regexes are Rust's: \d is any Unicode digit, so ASCII digits are spelled [0-9].
    ip = client.completions.create(model="hf-qwen2", prompt="address:", max_tokens=20, temperature=1.0, seed=5,
                                   extra_body={"structured_outputs": {"regex": r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}"}})
    import re

    assert re.fullmatch(r"(\d{1,3}\.){3}\d{1,3}", ip.choices[0].text), ip.choices[0].text
    yes_no = client.chat.completions.create(model="hf-llama", messages=CHAT, max_tokens=10, temperature=1.0,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert yes_no.choices[0].message.content in ("yes", "no", "maybe")
    grammar = 'start: "(" expr ")"\nexpr: NUMBER ("+" NUMBER)*\nNUMBER: /[0-9]{1,3}/'
    sums = client.completions.create(model="hf-gpt2", prompt="sum:", max_tokens=30, temperature=1.0, seed=2,
                                     extra_body={"structured_outputs": {"grammar": grammar}})
    if sums.choices[0].finish_reason == "stop":
        assert re.fullmatch(r"\(\d{1,3}(\+\d{1,3})*\)", sums.choices[0].text), sums.choices[0].text


def test_embeddings(client):
    import base64

    import numpy as np

    batch = client.embeddings.create(model="hf-llama", input=["a list", "import os", "a list"])
    vectors = np.array([d.embedding for d in batch.data])
    assert vectors.shape == (3, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1], atol=1e-3)
    alone = client.embeddings.create(model="hf-llama", input="import os")
    assert np.allclose(alone.data[0].embedding, vectors[1], atol=1e-5)  # the same alone as in a padded batch
    packed = client.embeddings.create(model="hf-llama", input="import os", encoding_format="base64")
    assert np.allclose(np.frombuffer(base64.b64decode(packed.data[0].embedding), "<f4"), vectors[1], atol=1e-6)
    assert batch.usage.prompt_tokens > 3


def test_what_the_engine_cannot_honour_is_a_400_and_it_keeps_serving(client, served_text):
    import openai
    import requests

    cases = [
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(n=5), "n"),  # this server's text_max_choices is 4
        (dict(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "minLength": 5, "maxLength": 1}}}), "json_schema"),
        (dict(extra_body={"structured_outputs": {"regex": "a(b"}}), "regex"),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages"),  # Llama's template raises
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (dict(extra_body={"chat_template": "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}"}), "messages"),
    ]
    for extra, field in cases:
        kwargs = {"model": "hf-llama", "messages": CHAT, "max_tokens": 4, **extra}
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**kwargs)
        assert refused.value.body["param"] == field, (extra, refused.value.body)
    for body, field in (({"model": "hf-llama", "tokens": [10 ** 9]}, "tokens"),):
        r = requests.post(f"{served_text.url}/detokenize", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    still = client.chat.completions.create(model="hf-llama", messages=CHAT, max_tokens=4)
    assert still.choices[0].finish_reason in ("stop", "length")


def test_constraints_and_logprobs_over_oip(served_text):
    """The same parameters over the Open Inference Protocol: a regex and logprobs on REST, a
    choice on gRPC streaming."""
    import queue

    import numpy as np
    import requests
    import tritonclient.grpc as tgrpc

    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["n="]}],
            "parameters": {"regex": "[0-9]{3}", "logprobs": 1, "max_new_tokens": 8, "temperature": 1.0, "seed": 3}}
    r = requests.post(f"{served_text.url}/v2/models/hf-gpt2/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    text = answer["outputs"][0]["data"][0]
    assert len(text) == 3 and text.isdigit()
    logprobs = json.loads(answer["parameters"]["logprobs"])
    assert logprobs and all(len(t["top_logprobs"]) == 1 for t in logprobs)
    responses: queue.Queue = queue.Queue()
    grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{served_text.grpc_port}")
    grpc.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        text_input = tgrpc.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([b"answer:"], dtype=object))
        grpc.async_stream_infer("hf-llama", [text_input], parameters={"choice": '["alpha", "beta"]', "max_new_tokens": 8})
        pieces = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            pieces.append(result.as_numpy("text_output")[0].decode())
            if result.get_response().parameters.get("finish_reason"):
                break
    finally:
        grpc.stop_stream()
        grpc.close()
    assert "".join(pieces) in ("alpha", "beta")
