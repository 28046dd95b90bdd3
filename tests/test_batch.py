"""The offline batch command (services/batch.py) on the session's quick models: a folder, JSONL and
Parquet manifests, image answers, text, shards, refusals per item, and an exact resume after
kill -9 of the whole command (every process of it, as when a pod is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from loadtest.payloads import png_bytes
from services.batch import Item, Output, image_name, read_items
from tests.conftest import REPO


def digit_folder(folder: Path, count: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = np.kron((digits.images[i % len(digits.images)] / 16 * 255).astype(np.uint8), np.ones((4, 4), np.uint8))
        (folder / f"{i // 100:03d}").mkdir(exist_ok=True)
        (folder / f"{i // 100:03d}" / f"{i:05d}.png").write_bytes(png_bytes(pixels))
    return folder


def batch(*args: str, check: bool = True, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "services.batch", *args, "--quiet"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_last_line_is_cut_off_and_its_item_runs_again(tmp_path):
    output = Output(tmp_path / "out.jsonl")
    output.partial.mkdir()
    (output.partial / "part-1-0.jsonl").write_bytes(b'{"index":0,"id":"a"}\n{"index":2,"id":"c"}\n{"index":1,"i')
    assert output.done() == {0, 2}
    assert (output.partial / "part-1-0.jsonl").read_bytes().endswith(b'"c"}\n')
    assert image_name(Item(7, "a/b c.png", None, {})) == "00000007-a_b_c.png"


def test_manifests_in_order(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "x", "image": "a.png", "top_k": 2}\n\n{"prompt": "hi"}\n')
    items = list(read_items(tmp_path / "m.jsonl"))
    assert [(i.index, i.id, i.image, i.fields) for i in items] == [
        (0, "x", tmp_path / "a.png", {"top_k": 2}), (1, "1", None, {"prompt": "hi"})]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, built_models) -> Path:
    return digit_folder(tmp_path_factory.mktemp("batch") / "digits", 4000)


def test_kill_9_then_resume_is_exact(digits, tmp_path):
    clean = tmp_path / "clean.jsonl"
    batch("classify", str(digits), str(clean))
    reference = {line["index"]: line for line in lines(clean)}
    assert sorted(reference) == list(range(4000)) and reference[0]["id"] == "000/00000.png"

    resumed = tmp_path / "resumed.jsonl"
    process = batch("classify", str(digits), str(resumed), "--processes", "2", "--concurrency", "8",
                    start_new_session=True)
    partial = Output(resumed).partial
    deadline = time.monotonic() + 120
    while sum(p.stat().st_size for p in partial.glob("part-*.jsonl")) < 150_000:  # some hundreds of lines in
        assert process.poll() is None, process.stdout.read().decode()  # finished before it could be killed
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the command and both its processes, mid-write
    process.wait()
    assert not resumed.exists()
    done_before = len(Output(resumed).done())
    assert 0 < done_before < 4000
    result = batch("classify", str(digits), str(resumed))
    assert f"{4000 - done_before} to run" in result.stdout
    answers = lines(resumed)
    assert sorted(a["index"] for a in answers) == list(range(4000))  # none missing, none twice
    for answer in answers:
        expected = reference[answer["index"]]
        assert answer["id"] == expected["id"]
        assert answer["predictions"][0]["class_id"] == expected["predictions"][0]["class_id"]
        assert answer["predictions"][0]["probability"] == pytest.approx(expected["predictions"][0]["probability"],
                                                                        abs=1e-5)
    assert not Output(resumed).partial.exists()
    assert "nothing to do" in batch("classify", str(digits), str(resumed)).stdout


def test_manifest_fields_refusals_and_parquet(digits, tmp_path):
    files = sorted(digits.rglob("*.png"))[:5]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"id": f"d{i}", "image": str(path), "top_k": 2} for i, path in enumerate(files)]
    rows += [{"id": "broken", "image": "broken.png"}, {"id": "missing", "image": "nope.png"}, {"id": "none"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    batch("classify", str(manifest), str(out), "--field", "top_k=3")
    answers = {a["id"]: a for a in lines(out)}
    assert len(answers["d0"]["predictions"]) == 2  # the item's field over --field
    assert answers["broken"]["status"] == 415 or answers["broken"]["status"] == 400
    assert answers["missing"]["status"] == 400 and "nope.png" in answers["missing"]["error"]
    assert answers["none"]["status"] == 400 and "image" in answers["none"]["error"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows[:5]), parquet)
    batch("classify", str(parquet), str(tmp_path / "pq.jsonl"))
    assert [a["predictions"][0]["class_id"] for a in sorted(lines(tmp_path / "pq.jsonl"), key=lambda a: a["index"])] == \
        [answers[f"d{i}"]["predictions"][0]["class_id"] for i in range(5)]


def test_image_answers_text_and_shards(digits, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"ROMEO {i}:", "seed": i, "max_new_tokens": 8}) + "\n"
                               for i in range(6)))
    shards = [tmp_path / f"text-{k}.jsonl" for k in range(3)]
    for k, out in enumerate(shards):
        batch("generate", str(prompts), str(out), "--shard", f"{k}/3")
    texts = {a["index"]: a for out in shards for a in lines(out)}
    assert sorted(texts) == list(range(6)) and all(a["index"] % 3 == k for k, out in enumerate(shards)
                                                    for a in lines(out))
    assert all(a["seed"] == a["index"] and a["text"] for a in texts.values())

    samples = tmp_path / "samples.jsonl"
    (tmp_path / "s.jsonl").write_text('{"n": 4, "seed": 1}\n{"n": 2, "seed": 2}\n')
    batch("sample", str(tmp_path / "s.jsonl"), str(samples))
    answers = sorted(lines(samples), key=lambda a: a["index"])
    assert [a["seed"] for a in answers] == [1, 2]
    for answer in answers:
        png = tmp_path / answer["image"]
        assert png.read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "samples-images").glob(".*"))  # no temporary file left behind
