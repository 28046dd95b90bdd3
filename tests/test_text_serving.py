"""Text generation through a real `bentoml serve`: the official `openai` client (completions,
streaming, several prompts, errors), `tritonclient.grpc` streaming (Triton's decoupled
convention), concurrent /generate requests answered as if each were alone, and the text metrics."""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as tgrpc
from tests.conftest import RECURRENT, SECOND, scrape


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_completion_and_stream_agree(client):
    plain = client.completions.create(model="generate", prompt="The list", max_tokens=12, seed=3, temperature=0.8)
    (choice,) = plain.choices
    assert choice.finish_reason in ("length", "stop") and plain.object == "text_completion"
    assert plain.usage.completion_tokens <= 12 and plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    assert plain.model.startswith("generate:")

    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(model="generate", prompt="The list", max_tokens=12, seed=3, temperature=0.8,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        else:
            usage = chunk.usage
    assert "".join(pieces) == choice.text and finish == choice.finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_openai_prompt_list_n_echo_and_penalties(client):
    prompts = ["A dict", "import"]
    result = client.completions.create(model="generate", prompt=prompts, n=2, max_tokens=8, seed=10, echo=True,
                                       presence_penalty=0.5, frequency_penalty=0.5,
                                       extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for c in result.choices:
        assert c.text.startswith(prompts[c.index // 2])
    # Choice i of a prompt has seed + i: choice 1 equals a single request with seed 11.
    alone = client.completions.create(model="generate", prompt="A dict", max_tokens=8, seed=11, echo=True,
                                      presence_penalty=0.5, frequency_penalty=0.5,
                                      extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert alone.choices[0].text == result.choices[1].text

    streamed = {}
    for chunk in client.completions.create(model="generate", prompt=prompts, max_tokens=6, seed=4, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    plain = client.completions.create(model="generate", prompt=prompts, max_tokens=6, seed=4)
    assert streamed == {c.index: c.text for c in plain.choices}


def test_openai_errors_and_models(client, server):
    # the default, the second text model and the recurrent ones
    assert sorted(m.id for m in client.models.list()) == sorted(["generate", "generate" + SECOND, *RECURRENT])
    assert client.models.retrieve("generate").root.startswith("generate:")
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="generate", prompt="x", max_tokens=100_000)
    assert bad.value.body["param"] == "max_tokens" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="generate", prompt="x", suffix="y")
    assert unsupported.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as no_template:  # trained on plain text: no chat template
        client.chat.completions.create(model="generate", messages=[{"role": "user", "content": "hi"}])
    assert no_template.value.body["param"] == "messages" and "no chat template" in no_template.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.body["code"] == "model_not_found"
    r = requests.post(f"{server.url}/v1/completions", data=b"{oops", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def stream_text(grpc_url: str, prompt: str, parameters: dict, empty_final: bool) -> tuple[list[str], dict]:
    """One request over ModelStreamInfer -> (text of each data response, the last parameters)."""
    responses: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        text_input = tgrpc.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        client.async_stream_infer("generate", [text_input], request_id="r1", parameters=parameters,
                                  enable_empty_final_response=empty_final)
        pieces, last = [], {}
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            assert response.id == "r1"
            text = result.as_numpy("text_output")
            if text is not None:
                pieces.append(text[0].decode())
                last = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
            if response.parameters["triton_final_response"].bool_param:
                return pieces, last
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("empty_final", [False, True])
def test_grpc_stream_sends_text_as_it_comes(server, empty_final):
    params = {"max_new_tokens": 48, "seed": 8, "temperature": 0.7, "ignore_eos": True}
    native = requests.post(f"{server.url}/generate", json={"prompt": "The list", **params}, timeout=60).json()
    pieces, last = stream_text(f"127.0.0.1:{server.grpc_port}", "The list", params, empty_final)
    assert "".join(pieces) == native["text"]
    # Chunk by chunk where the reader wakes in time; how many is the scheduler's choice (a tiny model
    # may finish first), so one chunk per token is test_textengine's lock-step test, not this one's.
    assert pieces
    assert last["finish_reason"] == native["finish_reason"] and last["seed"] == 8
    assert last["completion_tokens"] == native["usage"]["completion_tokens"]


def test_grpc_stream_reports_bad_requests_in_band(server):
    responses: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        text_input = tgrpc.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([b"x"], dtype=object))
        client.async_stream_infer("generate", [text_input], parameters={"max_new_tokens": 0})
        result, error = responses.get(timeout=30)
        assert result is None and "max_new_tokens" in error.message()
        client.async_stream_infer("generate", [text_input], parameters={"max_new_tokens": 2})  # the stream goes on
        result, error = responses.get(timeout=30)
        assert error is None and result.as_numpy("text_output") is not None
    finally:
        client.stop_stream()
        client.close()


def test_concurrent_generations_equal_sequential(server):
    bodies = [{"prompt": p, "max_new_tokens": 24, "seed": i, "temperature": 0.9}
              for i, p in enumerate(["The", "A list", "import os", "def f(x):", "Classes", "The with", "x = [", "# "])]
    post = lambda body: requests.post(f"{server.url}/generate", json=body, timeout=120).json()  # noqa: E731
    alone = [post(b) for b in bodies]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(post, bodies))
    assert [t["text"] for t in together] == [a["text"] for a in alone]
    assert all(a["model"].startswith("generate:") for a in alone)


def test_stream_disconnect_frees_the_row(server):
    body = {"prompt": "The", "max_new_tokens": 100, "ignore_eos": True, "temperature": 1.0}
    with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=60) as r:
        next(r.iter_lines())  # started, then the client goes away
    # Every worker's engine ends idle: nothing live or waiting once the abandoned row is dropped.
    for _ in range(100):
        text = requests.get(f"{server.url}/metrics", timeout=30).text
        live = [line for line in text.splitlines() if line.startswith('suite_text_sequences{model="generate",state="live"}')]
        if live and float(live[0].split()[-1]) == 0:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"a row stayed live after its client left: {live}")


def test_text_metrics(server):
    """One native and one OpenAI request, each with a known number of new tokens, move the text
    series by exactly that (no other test's requests needed)."""
    before = scrape(server.url)
    native = requests.post(f"{server.url}/generate", json={"prompt": "The", "max_new_tokens": 5, "ignore_eos": True},
                           timeout=60)
    assert native.status_code == 200, native.text
    openai_style = requests.post(f"{server.url}/v1/completions", json={"model": "generate", "prompt": "The",
                                 "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert openai_style.status_code == 200, openai_style.text
    assert openai_style.json()["usage"]["completion_tokens"] == 3
    after = scrape(server.url)

    def moved(series: str) -> float:
        return after.get(series, 0.0) - before.get(series, 0.0)

    counted = {k: moved(k) for k in after if k.startswith("suite_requests_total") and moved(k)}
    assert moved('suite_requests_total{model="generate",protocol="native",status="200"}') == 1, counted
    assert moved('suite_requests_total{model="generate",protocol="openai",status="200"}') == 1, counted
    assert moved('suite_generated_tokens_total{model="generate"}') == 5 + 3
    assert moved('suite_time_to_first_token_seconds_count{model="generate"}') == 2
    # One time-per-output-token observation per finished request (its mean after the first token).
    assert moved('suite_time_per_output_token_seconds_count{model="generate"}') == 2
    assert moved('suite_text_batch_occupancy_count{model="generate"}') >= 1
    assert after['suite_text_sequences{model="generate",state="waiting"}'] == 0


def test_suite_model_logprobs_echo_chat_and_embeddings(client):
    """The suite's own GPT gets what imported models get: completions with logprobs (the prompt's
    too, with echo), chat through a template the request brings, and embeddings."""
    done = client.completions.create(model="generate", prompt="import os", max_tokens=4, logprobs=3, echo=True,
                                     temperature=0, extra_body={"ignore_eos": True})
    logprobs = done.choices[0].logprobs
    assert done.choices[0].text.startswith("import os")
    assert logprobs.token_logprobs[0] is None and all(v <= 0 for v in logprobs.token_logprobs[1:])
    assert len(logprobs.tokens) == done.usage.prompt_tokens + done.usage.completion_tokens
    assert "".join(logprobs.tokens) == done.choices[0].text
    assert all(len(top) == 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[-1] < len(done.choices[0].text)
    chat = client.chat.completions.create(
        model="generate", messages=[{"role": "user", "content": "def"}], max_tokens=5, temperature=0,
        extra_body={"chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"})
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens >= 2
    vectors = client.embeddings.create(model="generate", input=["import os", "a list", "import os"])
    assert len(vectors.data) == 3 and vectors.data[0].embedding == pytest.approx(vectors.data[2].embedding, abs=1e-6)
    assert sum(v * v for v in vectors.data[1].embedding) == pytest.approx(1.0, abs=1e-5)


def test_native_generate_takes_logprobs_and_constraints(server):
    """/generate and /generate_stream take the same logprobs and constraint fields; a recurrent
    model answers embeddings with a 400 naming the model (it has no hidden-state output)."""
    import json
    import re

    r = requests.post(f"{server.url}/generate", json={"prompt": "x = ", "max_new_tokens": 6, "seed": 1, "logprobs": 2,
                                                      "regex": "[0-9]{2,3}"}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert re.fullmatch("[0-9]{2,3}", answer["text"]) and answer["finish_reason"] == "stop"
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in answer["logprobs"])
    stream = requests.post(f"{server.url}/generate_stream", json={"prompt": "x = ", "max_new_tokens": 6, "seed": 1,
                                                                  "regex": "[0-9]{2,3}"}, timeout=60, stream=True)
    events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith(b"data: {")]
    assert "".join(e["text"] for e in events) == answer["text"]
    bad = requests.post(f"{server.url}/generate", json={"prompt": "x", "json_schema": {"type": "object", "minProperties": 3,
                                                                                      "maxProperties": 1}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["field"] == "json_schema", bad.text
    lstm = requests.post(f"{server.url}/v1/embeddings", json={"model": "generate-lstm", "input": "x"}, timeout=60)
    assert lstm.status_code == 400 and lstm.json()["error"]["param"] == "model", lstm.text
