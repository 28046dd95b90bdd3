"""Quantization-aware fine-tuning (Jacob et al. 2018) for the int8 variant.

Post-training quantization rounds weights and activations that were never trained to be rounded;
a deep stack of 3x3 convolutions (the default denoiser) adds up those errors to 0.7 dB. Here the
trained model is fine-tuned for a few hundred steps with the rounding simulated (fake quantization,
gradients passed straight through): weights per output channel, symmetric int8; each convolution's
input, and the last one's output, per tensor, asymmetric uint8 over a running range. That is what
ONNX Runtime's static QDQ quantization does to the graph (export/variants.py), so the weights learn
to sit where rounding costs least. Batch norms are folded into their convolutions first, as the
quantized graph has them, so the weights that are rounded are the ones that are trained.
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from training.family import Data, Family

log = logging.getLogger(__name__)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Every Conv2d directly followed by a BatchNorm2d in an ``nn.Sequential`` becomes one Conv2d
    with the norm's eval-time scale and shift in its weights and bias; the norm becomes Identity."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
            with torch.no_grad():
                folded.weight.copy_(conv.weight * scale[:, None, None, None])
                bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
                folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
            seq[i], seq[i + 1] = folded, nn.Identity()
    return model


class _WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric int8, the scale from the channel's largest magnitude."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = (weight.detach().abs().amax(dim=tuple(range(1, weight.dim()))) / 127).clamp(min=1e-8)
        zero = torch.zeros(weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -128, 127)


class _ActivationFakeQuant:
    """Per-tensor asymmetric uint8 over a running range that always holds zero (as the calibrated
    ranges of ONNX Runtime do)."""

    def __init__(self, momentum: float = 0.1):
        self.momentum, self.low, self.high = momentum, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low, high = float(x.detach().min().clamp(max=0)), float(x.detach().max().clamp(min=0))
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low += self.momentum * (low - self.low)
            self.high += self.momentum * (high - self.high)
        scale = max((self.high - self.low) / 255, 1e-8)
        zero = int(round(min(max(-self.low / scale, 0), 255)))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


def fake_quantized(model: nn.Module) -> list:
    """Puts fake quantization on every Conv2d of ``model`` (in place) -> handles to take it off."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles = []
    for conv in convs:
        parametrize.register_parametrization(conv, "weight", _WeightFakeQuant())
        quant = _ActivationFakeQuant()
        handles.append(conv.register_forward_pre_hook(lambda module, args, q=quant: (q(args[0]), *args[1:])))
    last = _ActivationFakeQuant()
    handles.append(convs[-1].register_forward_hook(lambda module, args, out, q=last: q(out)))
    return handles


def finetune_for_int8(family: Family, model: nn.Module, data: Data, steps: int = 300, lr: float = 1e-4) -> nn.Module:
    """A copy of ``model`` with batch norms folded, fine-tuned ``steps`` steps with the int8
    rounding simulated, on the family's own loss and training batches; returned with plain float
    weights (the quantizer rounds them) -> ready for the one export routine."""
    # eval: folded, there are no batch statistics to update; dropout, where any, stays off
    tuned = fold_batch_norms(copy.deepcopy(model).eval())
    handles = fake_quantized(tuned)
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for step, batch in enumerate(itertools.islice(data.train_batches, steps)):
        loss = family.loss(tuned, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0:
            log.info("int8 fine-tuning step %d: loss %.6f", step, loss.item())
    for handle in handles:
        handle.remove()
    for conv in [m for m in tuned.modules() if parametrize.is_parametrized(m, "weight")]:
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=False)
    return tuned
