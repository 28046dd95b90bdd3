"""Text generation benchmark: streams through the suite's OpenAI route against transformers'
``generate()`` in process, same checkpoint, in one run on one machine.

    python -m loadtest.bench_text                     # what `make bench-text` runs (BENTOML_HOME: the models)
    python -m loadtest.bench_text --streams 1,8 --seconds 10
    python -m loadtest.bench_text --models generate,generate-lstm,generate-gru   # the GPT against the recurrent models
    python -m loadtest.bench_text --models llama-30m --reference FOLDER --constrained --schema-requests 100
        # an imported model (python -m loadtest.random_lms llama-30m FOLDER; python -m export import huggingface FOLDER)

1. In process, before any server starts: transformers ``generate()`` (PyTorch eager, sampling at
   temperature 1, exactly ``--tokens`` new tokens) from ``artifacts/generate/hf`` at batch 1 and at
   batch 8; tokens/s = new tokens / wall time, the median of ``--repeats`` runs.
2. ``bentoml serve`` with its default settings. A greedy completion from the server must equal
   greedy ``generate()`` from the checkpoint (the served model is that checkpoint).
3. For each stream count: that many clients, each sending ``POST /v1/completions`` with
   ``stream: true`` (``--tokens`` tokens, ``ignore_eos``, temperature 1, its own prompt) back to back
   for ``--seconds``. The clients are raw asyncio HTTP/1.1 connections (little CPU, as the load
   generator shares the machine). tokens/s = completion tokens of the finished requests / wall time;
   time to first token = request sent -> first ``data:`` event, p50 and p99 over the requests.
   With ``--models``, step 3 runs for each named text model of the store (the same server serves
   them all), so the GPT and the LSTM/GRU language models are measured in one run.
Prints a table and the issue's goals with the measured ratios."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["The Python standard library", "import os\nimport sys\n\n", "A list is a mutable sequence",
           "Dictionaries map keys to values", "class Point:\n    def __init__(self", "The with statement",
           "Exceptions are raised when", "for item in items:\n"]


# ---- in process ---------------------------------------------------------------------------------

def load_reference(reference: Path):
    """The reference transformers model and its tokenizer, loaded once for both uses: a transformers
    folder (what ``python -m export import huggingface`` imported), or a training checkpoint (its
    ``hf/`` copy and ``tokenizer.json``)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder = reference if (reference / "config.json").is_file() else reference / "hf"
    return (AutoModelForCausalLM.from_pretrained(folder).eval(),
            Tokenizer.from_file(str(reference / "tokenizer.json")))


def transformers_rates(model, tokenizer, tokens: int, repeats: int) -> dict[int, float]:
    import torch

    rates = {}
    for batch in (1, 8):
        # Equal-length prompts (the first tokens of one prompt) so no padding is needed.
        ids = tokenizer.encode(PROMPTS[0]).ids
        x = torch.tensor([ids] * batch)
        runs = []
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=True, pad_token_id=0)
            for _ in range(repeats):
                started = time.perf_counter()
                out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0)
                runs.append((out.shape[1] - x.shape[1]) * batch / (time.perf_counter() - started))
        rates[batch] = statistics.median(runs)
        print(f"transformers generate() batch {batch}: {rates[batch]:.0f} tokens/s (runs: "
              f"{', '.join(f'{r:.0f}' for r in runs)})", flush=True)
    return rates


def transformers_greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    """Greedy tokens past any end-of-text token (the server's ignore_eos), decoded."""
    import copy

    import torch

    x = torch.tensor([tokenizer.encode(prompt).ids])
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.do_sample, config.temperature, config.top_p, config.top_k = None, False, None, None, None
    config.max_new_tokens, config.pad_token_id = tokens, 0
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return tokenizer.decode(out[0, x.shape[1]:].tolist())


# ---- the load generator ---------------------------------------------------------------------------

@dataclass
class StreamStats:
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)


# Constrained decoding's cost: JSON records (each one checked against RECORD, as json_schema
# checks) in a list of 201, which no request finishes within its tokens, so every request runs its
# full length and the two runs differ only in the masks. (A list the model may close ends requests
# early: shorter requests, more prefill per token, which is not the masks' cost.)
RECORD = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"], "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
RECORDS_GRAMMAR = 'start: "[" record (", " record)~200 "]"\nrecord: %json ' + json.dumps(RECORD)
# The schema-validity check: every answer must parse and validate (bounded, so it can finish).
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org)$"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}, "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "active"], "additionalProperties": False}


async def one_stream(port: int, prompt: str, tokens: int, deadline: float, stats: StreamStats,
                     model: str = "generate", constrained: bool = False, vary: random.Random | None = None) -> None:
    """Back-to-back streamed completions on a keep-alive connection until ``deadline`` (a new
    connection when the server asks to close one). ``vary``: each request's length drawn from
    tokens/2 .. 3*tokens/2 (mean ``tokens``), so streams do not finish, and arrive, in step."""

    def request_bytes() -> bytes:
        length = vary.randint(tokens // 2, tokens * 3 // 2) if vary else tokens
        request_body = {"model": model, "prompt": prompt, "max_tokens": length, "temperature": 1.0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if constrained:
            request_body["structured_outputs"] = {"grammar": RECORDS_GRAMMAR}
        body = json.dumps(request_body).encode()
        return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    connection = None
    while time.perf_counter() < deadline:
        if connection is None:
            connection = await asyncio.open_connection("127.0.0.1", port)
        reader, writer = connection
        request = request_bytes()
        sent = time.perf_counter()
        writer.write(request)
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        if not status.startswith(b"HTTP/1.1 200"):
            stats.errors += 1
            await reader.readexactly(int(headers.get("content-length", 0)))
            await asyncio.sleep(0.1)
        else:
            first, usage = None, None
            while True:  # chunked transfer encoding; the server sends each event as one chunk
                size = int((await reader.readline()).strip(), 16)
                if size == 0:
                    await reader.readline()
                    break
                data = await reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
                if b'"usage"' in data and b'"usage":null' not in data:
                    usage = data
            if first is not None:
                stats.ttft.append(first - sent)
            if usage is None:
                stats.errors += 1
            else:
                events = [json.loads(e[6:]) for e in usage.split(b"\n\n") if e.startswith(b"data: {")]
                stats.tokens += next(e["usage"] for e in events if e.get("usage"))["completion_tokens"]
                stats.requests += 1
        if headers.get("connection", "").lower() == "close":
            writer.close()
            connection = None
    if connection is not None:
        connection[1].close()


async def run_streams(port: int, streams: int, tokens: int, seconds: float, model: str = "generate",
                      constrained: bool = False, vary: bool = False) -> tuple[float, StreamStats]:
    stats = StreamStats()
    started = time.perf_counter()
    await asyncio.gather(*(one_stream(port, PROMPTS[i % len(PROMPTS)], tokens, started + seconds, stats, model,
                                      constrained, random.Random(i) if vary else None) for i in range(streams)))
    return stats.tokens / (time.perf_counter() - started), stats


def schema_validity(port: int, model: str, requests_count: int, concurrency: int = 8) -> tuple[int, int, int]:
    """``requests_count`` chat completions (a completion prompt for a model without a chat
    template) under ``PERSON`` at temperature 1, eight at a time -> (valid, finished by the
    grammar, requests)."""
    import concurrent.futures

    import jsonschema
    import requests

    def one(seed: int) -> tuple[bool, bool]:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        answer = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300, json={
            "model": model, "prompt": PROMPTS[seed % len(PROMPTS)], "max_tokens": 200, "temperature": 1.0,
            "seed": seed, "response_format": fmt}).json()
        choice = answer["choices"][0]
        try:
            jsonschema.validate(json.loads(choice["text"]), PERSON)
            return True, choice["finish_reason"] == "stop"
        except (ValueError, jsonschema.ValidationError):
            return False, choice["finish_reason"] == "stop"

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_count)))
    return sum(v for v, _ in results), sum(s for _, s in results), requests_count


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,8,32", help="comma-separated concurrent stream counts")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--seconds", type=float, default=20.0, help="per stream count")
    parser.add_argument("--repeats", type=int, default=3, help="generate() runs per batch size (median)")
    parser.add_argument("--reference", "--checkpoint", dest="checkpoint", type=Path,
                        default=REPO / "artifacts" / "generate",
                        help="what generate() runs: a training checkpoint (hf/ and tokenizer.json) or the transformers "
                             "folder the first model was imported from")
    parser.add_argument("--models", default="generate",
                        help="comma-separated stored text models to stream from (the first is the reference's)")
    parser.add_argument("--constrained", action="store_true",
                        help="also stream under a JSON grammar (records checked by a schema) and report its cost in "
                             "tokens/s")
    parser.add_argument("--schema-requests", type=int, default=0,
                        help="this many json_schema completions at temperature 1, each answer validated")
    parser.add_argument("--vary", action="store_true",
                        help="each request's length drawn from --tokens/2 .. 3x/2 (seeded per stream), as real "
                             "requests differ; without it every request has exactly --tokens")
    parser.add_argument("--workers", type=int, default=0, help="the server's workers (0: its default, one per core)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime threads per session (0: the server's default, cores / workers)")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    os.environ.setdefault("BENTOML_HOME", str(REPO / ".bentoml"))
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    if not (args.checkpoint / "hf").is_dir() and not (args.checkpoint / "config.json").is_file():
        print(f"{args.checkpoint}: neither a checkpoint with hf/ nor a transformers folder (make models, or "
              "python -m export import huggingface FOLDER)", file=sys.stderr)
        return 2

    print(f"machine: {os.cpu_count()} cores; {args.tokens} new tokens per request\n", flush=True)
    model, tokenizer = load_reference(args.checkpoint)
    reference = transformers_rates(model, tokenizer, args.tokens, args.repeats)

    import requests

    from loadtest.servers import start_suite

    # fp32 for a plain model name (the reference is the fp32 checkpoint); variants by their own names
    # Only the measured models are served (a store may hold more).
    settings = {"SUITE_VARIANT": "fp32", "SUITE_MODELS": ",".join(m.partition(":")[0] for m in models),
                "SUITE_WORKERS": str(args.workers), "SUITE_INTRA_OP_THREADS": str(args.threads)}
    print(f"server: {args.workers or 'default'} workers, {args.threads or 'default'} threads per session", flush=True)
    server = start_suite(settings,
                         Path(tempfile.mkdtemp(prefix="bench-text-")) / "suite.log", cwd=REPO)
    port = int(server.url.rsplit(":", 1)[1])
    rows, validity = [], None
    try:
        served = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": models[0], "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}).json()
        expected = transformers_greedy(model, tokenizer, PROMPTS[1], 24)
        same = served["choices"][0]["text"] == expected
        print(f"served model {served['model']}: greedy text {'equals' if same else 'DIFFERS FROM'} the checkpoint's "
              f"generate()", flush=True)
        for name in models:
            asyncio.run(run_streams(port, 2, 16, 1.0, name))  # warm-up
            for streams in [int(s) for s in args.streams.split(",")]:
                for constrained in ((False, True) if args.constrained else (False,)):
                    rate, stats = asyncio.run(run_streams(port, streams, args.tokens, args.seconds, name, constrained,
                                                          args.vary))
                    label = name + (" +JSON grammar" if constrained else "")
                    rows.append((label, streams, rate, stats))
                    print(f"suite {label} {streams} streams: {rate:.0f} tokens/s, {stats.requests} requests, "
                          f"{stats.errors} errors", flush=True)
        if args.schema_requests:
            validity = schema_validity(port, models[0], args.schema_requests)
            print(f"json_schema at temperature 1: {validity[0]}/{validity[2]} answers valid "
                  f"({validity[1]} ended by the grammar)", flush=True)
    finally:
        server.stop()

    print("\n| client | model | streams | tokens/s | TTFT p50 ms | TTFT p99 ms | requests | errors | vs generate() b1 | vs generate() b8 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, rate in reference.items():
        print(f"| transformers generate() in process, batch {batch} | {args.checkpoint.name} | - | {rate:.0f} | - | - | - | - | "
              f"{rate / reference[1]:.2f}x | {rate / reference[8]:.2f}x |")
    for name, streams, rate, stats in rows:
        print(f"| suite /v1/completions stream=true | {name} | {streams} | {rate:.0f} | "
              f"{percentile(stats.ttft, 0.5) * 1e3:.0f} | {percentile(stats.ttft, 0.99) * 1e3:.0f} | {stats.requests} | "
              f"{stats.errors} | {rate / reference[1]:.2f}x | {rate / reference[8]:.2f}x |")
    by = {streams: (rate, stats) for name, streams, rate, stats in rows if name == models[0]}
    guided = {streams: rate for name, streams, rate, _ in rows if name == models[0] + " +JSON grammar"}
    print(f"\nGoals ({models[0]}):")
    if 1 in by:
        print(f"- one stream >= 4x generate() batch 1: {by[1][0] / reference[1]:.2f}x")
    if by.get(1) and 8 in by:
        print(f"- 8 streams >= 3x one stream: {by[8][0] / by[1][0]:.2f}x; >= 2x generate() batch 8: "
              f"{by[8][0] / reference[8]:.2f}x")
        print(f"- TTFT p50 at 8 streams <= 1.5x one stream's: "
              f"{percentile(by[8][1].ttft, 0.5) / percentile(by[1][1].ttft, 0.5):.2f}x")
    if by.get(8) and 32 in by:
        print(f"- 32 streams not below 8 streams: {by[32][0] / by[8][0]:.2f}x")
    for streams, rate in guided.items():
        print(f"- constrained decoding (JSON records) costs <= 15 % of tokens/s at {streams} streams: "
              f"{(1 - rate / by[streams][0]) * 100:.1f} %")
    if validity:
        print(f"- 100 % schema-valid JSON at temperature 1: {validity[0]}/{validity[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
