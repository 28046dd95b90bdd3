"""Third-party models for the import tests, built at test time (nothing is downloaded): randomly
initialised transformers models with small configs saved with ``save_pretrained`` beside their
image processors, a plain torch module, an ONNX classifier with its TOML spec, and a two-input
ONNX graph made with ``onnx.helper``.

``python tests/imported_models.py FOLDER`` builds them in FOLDER and imports each into the model
store at $BENTOML_HOME (a process of its own, so the tests' shared store never sees them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TORCH_LABELS = ["cat", "dog", "bird", "fish"]
# store name -> what it is; every model the tests serve
HF_MODELS = ("hf-vit", "hf-resnet", "hf-convnext", "hf-segformer", "hf-swin2sr")


def huggingface_models(folder: Path) -> dict[str, Path]:
    import torch
    from transformers import (ConvNextConfig, ConvNextForImageClassification, ConvNextImageProcessor, ResNetConfig,
                              ResNetForImageClassification, SegformerConfig, SegformerForSemanticSegmentation,
                              SegformerImageProcessor, Swin2SRConfig, Swin2SRForImageSuperResolution,
                              Swin2SRImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor)

    torch.manual_seed(0)
    labels = {i: f"class-{i}" for i in range(10)}
    # A wide initialisation spreads the random logits, so the top-5 order is not decided by noise.
    made = {
        "hf-vit": (ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=64, id2label=labels,
                                                       label2id={v: k for k, v in labels.items()},
                                                       initializer_range=0.2)),
                   ViTImageProcessor(size={"height": 32, "width": 32})),
        # microsoft/resnet-50 ships ConvNextImageProcessor: shortest edge / crop_pct, then the centre crop.
        "hf-resnet": (ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                                layer_type="basic", id2label=labels,
                                                                label2id={v: k for k, v in labels.items()})),
                      ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875, image_mean=IMAGENET_MEAN,
                                             image_std=IMAGENET_STD, resample=3)),
        "hf-convnext": (ConvNextForImageClassification(ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                                                      id2label=labels,
                                                                      label2id={v: k for k, v in labels.items()},
                                                                      initializer_range=0.2)),
                        ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=0.875)),
        "hf-segformer": (SegformerForSemanticSegmentation(SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
            decoder_hidden_size=32, num_labels=5, initializer_range=0.2)),
            SegformerImageProcessor(size={"height": 64, "width": 64})),
        "hf-swin2sr": (Swin2SRForImageSuperResolution(Swin2SRConfig(image_size=32, embed_dim=16, depths=[1], num_heads=[2],
                                                                    window_size=8, upscale=2)),
                       Swin2SRImageProcessor()),
    }
    out = {}
    for name, (model, processor) in made.items():
        target = folder / name
        model.eval().save_pretrained(target)
        processor.save_pretrained(target)
        out[name] = target
    return out


def tiny_classifier(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, len(TORCH_LABELS))).eval()


TORCH_SPEC = dict(task="classify", size=(16, 16), mean=IMAGENET_MEAN, std=IMAGENET_STD, labels=TORCH_LABELS,
                  resample="bilinear")


def onnx_classifier(folder: Path) -> tuple[Path, Path]:
    """A user's ONNX classifier (exported elsewhere) and its spec, with a labels file."""
    import torch

    path = folder / "user-classifier.onnx"
    program = torch.onnx.export(tiny_classifier(1), (torch.rand(2, 3, 16, 16),), input_names=["input"],
                                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                dynamo=True, external_data=False)
    program.save(str(path))
    (folder / "labels.txt").write_text("\n".join(TORCH_LABELS) + "\n")
    spec = folder / "user-classifier.toml"
    spec.write_text('task = "image-classification"\n\n[input]\nname = "input"\nlayout = "NCHW"\nsize = [16, 16]\n'
                    'color = "RGB"\nmean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n\n'
                    '[output]\nname = "logits"\nkind = "logits"\nlabels = "labels.txt"\n')
    return path, spec


def two_input_graph(path: Path) -> Path:
    """sum = a + b and product = a * b, both (batch, 4) float32: a graph no task knows."""
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4])
    total = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4])
    product = helper.make_tensor_value_info("product", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"])],
                              "two-inputs", [a, b], [total, product])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def nhwc_uint8_graph(path: Path) -> Path:
    """An NHWC uint8 classifier input (what an NCHW float spec must be refused for)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["batch", 32, 32, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["xf"], ["y"], axes=[1, 2], keepdims=0)]
    model = helper.make_model(helper.make_graph(nodes, "nhwc", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def import_all(folder: Path) -> dict:
    """Builds every model in ``folder`` and imports it; -> {name: store tag}."""
    from export.imports import import_huggingface, import_onnx, import_torch_module, read_spec

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    tags = {}
    for name, path in huggingface_models(folder).items():
        tags[name] = import_huggingface(path, name)[1]
    tags["torch-tiny"] = import_torch_module(tiny_classifier(0), torch.rand(2, 3, 16, 16), dict(TORCH_SPEC), "torch-tiny")[1]
    onnx_path, spec = onnx_classifier(folder)
    tags["onnx-classifier"] = import_onnx(onnx_path, read_spec(spec), "onnx-classifier")[1]
    two_input_graph(folder / "two-inputs.onnx")  # imported by the test through the CLI
    nhwc_uint8_graph(folder / "nhwc-uint8.onnx")
    return tags


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(import_all(Path(sys.argv[1]))))
