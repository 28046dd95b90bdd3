"""Training practice: resuming equals an uninterrupted run, TensorBoard events beside the
checkpoint, the thread governor's arithmetic, a benchmark profile on a synthetic copy of its
layout (no test needs ../shared/data), and the report from quick models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.__main__ import model_name, run
from training.artifacts import CHECKPOINT_FILE
from training.loop import STATE_FILE, TENSORBOARD_DIR, ResumeError
from training.registry import FAMILIES
from training.threads import ThreadGovernor, threads_for

ONE_THREAD = {"threads": 1}  # the same float reduction order in both runs


def _state(ckpt_dir) -> dict:
    return torch.load(ckpt_dir / CHECKPOINT_FILE, weights_only=False)


@pytest.mark.parametrize("name", ["sample"])  # two optimizers, the global RNG (latents), a seeded batch stream
def test_resume_equals_an_uninterrupted_run(name, tmp_path, built_models):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(name, "quick", train_overrides=ONE_THREAD, out_dir=whole, progress=False)
    stopped = run(name, "quick", train_overrides=ONE_THREAD, out_dir=split, progress=False, stop_after=37)
    assert stopped == {"stopped_at": 37}
    assert (split / STATE_FILE).exists() and not (split / CHECKPOINT_FILE).exists()
    run(name, "quick", train_overrides=ONE_THREAD, out_dir=split, progress=False, resume=True)
    a, b = _state(whole), _state(split)
    assert not (split / STATE_FILE).exists(), "a finished run leaves nothing to resume"
    assert a["metrics"]["best_step"] == b["metrics"]["best_step"]
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], tensor, rtol=0, atol=1e-6, msg=key)
    logged = lambda d: [line.split('"seconds"')[0] for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert logged(whole) == logged(split)


def test_resume_refuses_a_different_configuration(tmp_path, built_models):
    run("denoise", "quick", train_overrides=ONE_THREAD, out_dir=tmp_path, progress=False, stop_after=5)
    with pytest.raises(ResumeError, match="training config"):
        run("denoise", "quick", train_overrides={**ONE_THREAD, "lr": 1e-2}, out_dir=tmp_path, progress=False,
            resume=True)
    with pytest.raises(ResumeError, match="no train_state"):
        run("denoise", "quick", out_dir=tmp_path / "elsewhere", progress=False, resume=True)


def test_tensorboard_events_beside_the_checkpoint(built_models):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.artifacts import family_dir

    for name in ("generate", "denoise"):
        events = EventAccumulator(str(family_dir(name) / TENSORBOARD_DIR), size_guidance={"images": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        assert "train/loss" in tags["scalars"] and "train/learning_rate" in tags["scalars"], tags
        assert f"val/{FAMILIES[name].primary_metric}" in tags["scalars"]
        assert tags["images"] if name == "denoise" else tags["tensors"], tags  # the samples (text is a tensor)


def test_thread_governor_steps_aside_and_comes_back():
    assert threads_for(2, 0.0, 2) == 2
    assert threads_for(2, 0.9, 2) == 1  # a busy core taken
    assert threads_for(2, 0.3, 2) == 2  # a light background load is not worth a thread
    assert threads_for(8, 3.0, 8) == 5
    assert threads_for(2, 5.0, 2) == 1  # never zero
    now, machine, own, calls = [0.0], [0.0], [0.0], []
    gov = ThreadGovernor(2, interval_s=1.0, clock=lambda: now[0], machine_busy=lambda: machine[0],
                         own_busy=lambda: own[0], set_threads=calls.append)
    gov.cores = 2
    for others in (1.0, 1.0, 0.0):  # a process busy on a core for two seconds, then gone
        now[0] += 1.0
        own[0] += 1.0
        machine[0] += 1.0 + others
        gov.poll()
    assert calls == [2, 1, 2]
    assert [threads for _, threads in gov.changes] == [1, 2]


def _denoise_benchmark_layout(root):
    rng = np.random.default_rng(0)
    for folder, count, size in (("train400", 44, 72), ("set12", 2, 64)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            smooth = np.kron(rng.uniform(40, 215, (size // 8, size // 8)), np.ones((8, 8)))
            Image.fromarray(smooth.astype(np.uint8)).save(root / folder / f"{i:03d}.png")


def test_denoise_benchmark_profile_on_its_layout(tmp_path, built_models):
    """The benchmark profile's data path, store name and Set12-style figures, on a tiny synthetic
    copy of the Train400/Set12 layout with quick-sized settings."""
    _denoise_benchmark_layout(tmp_path / "data" / "denoise")
    family = FAMILIES["denoise"]
    metrics = run("denoise", "benchmark", data=tmp_path / "data", out_dir=tmp_path / "model", progress=False,
                  train_overrides={"steps": 30, "eval_every": 15, "batch_size": 4, "threads": 1},
                  model_overrides={"base_channels": 8, "depth": 2, "patch_size": 32, "eval_crop": 64})
    for sigma in family.benchmark_sigmas:
        assert 10 < metrics[f"benchmark_set12_psnr_sigma{sigma:g}"] < 60
    assert model_name(family, "benchmark") == "denoise-bsd"
    checkpoint = _state(tmp_path / "model")
    assert checkpoint["name"] == "denoise-bsd" and "Set12" in checkpoint["data"]["description"]

    from export.onnx_export import export_onnx

    result = export_onnx(family, tmp_path / "model")  # the U-Net pads odd sizes inside the graph
    assert result.contract.name == "denoise-bsd" and result.contract.architecture.startswith("unet")


def test_benchmark_profile_names_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="denoise"):
        run("denoise", "benchmark", data=tmp_path / "nowhere", progress=False)


def test_report_from_quick_models(tmp_path, built_models):
    from training.report import write_report

    report = write_report(out=tmp_path)
    text = report.read_text()
    for name in FAMILIES:
        assert f"## {name}\n" in text
        assert (tmp_path / f"{name}-curves.png").stat().st_size > 1000
    for figure in ("denoise-figure0.png", "segment-figure0.png", "sample-figure0.png"):
        assert Image.open(tmp_path / figure).size[0] > 100
    assert "Generated from a held-out prompt" in text
    assert "## Benchmarks beside the published figures" in text and "BM3D" in text and "nanoGPT" in text


@pytest.mark.parametrize("family_name, architecture, overrides", [
    ("classify", "alexnet", {}),
    ("denoise", "conv-dae", {"base_channels": 16, "depth": 2}),
    ("denoise", "unet", {"base_channels": 8, "depth": 2}),
])
def test_added_architectures_learn_and_export(family_name, architecture, overrides, tmp_path, built_models):
    """The canon's other members on the same loop, export and contract: quick training beats
    chance (classify: 10 %; denoise: no gain) and ONNX Runtime matches PyTorch."""
    from export.onnx_export import PARITY_TOLERANCE, export_onnx

    family = FAMILIES[family_name]
    metrics = run(family_name, "quick", model_overrides={"architecture": architecture, **overrides},
                  out_dir=tmp_path, progress=False)
    assert metrics[family.primary_metric] > (0.3 if family_name == "classify" else 1.0), metrics
    result = export_onnx(family, tmp_path)
    assert result.parity_max_abs_diff <= PARITY_TOLERANCE
    assert result.contract.architecture.startswith(architecture.split("-")[0])
