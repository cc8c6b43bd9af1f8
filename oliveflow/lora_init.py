"""LoRA that starts from what quantization took out (``finetune.init: error``).

Each adapted layer's A and B begin as the best rank-r copy of its quantization error ``W - Q(W)``, measured
on the layer's inputs: with ``d`` the root mean square of each input channel on training examples, the
truncated SVD of ``(W - Q(W)) diag(d)`` is mapped back by ``diag(1 / d)`` (LoftQ's initialisation, with
LQER's activation weighting). The fine-tune then starts from a model closer to the float one, and the
adapter ships the correction with the rest of what it learns.

``W`` is the float weight in the quantized model's frame: the base's weight, times the per-channel scales
that AWQ folded into it (``oliveflow.awq`` records them; rtn and gptq fold none).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from oliveflow.tied_head import tensor_file

# Written by the quantize stage beside an AWQ-scaled model: "<module>.input_scale" multiplies the float
# weight's columns, "<module>.output_scale" its rows. Safetensors inside, but not named *.safetensors: loaders
# and the stage's size count take every such file for model weights.
AWQ_TRANSFORMS = "awq_transforms.tensors"
log = logging.getLogger(__name__)


def save_transforms(path: Path, transforms: dict[str, dict[str, Tensor]]) -> None:
    """``transforms[module] = {"input_scale": ..., "output_scale": ...}`` into ``path`` (float32)."""
    flat = {f"{name}.{kind}": t.detach().float().cpu().contiguous()
            for name, kinds in transforms.items() for kind, t in kinds.items()}
    save_file(flat, str(path))


class FloatWeights:
    """Each quantized module's float weight as the quantized model in ``model_dir`` sees it, read one at a time
    from the float base (``base_dir``) and multiplied by the scales AWQ folded into it."""

    def __init__(self, base_dir: Path, model_dir: Path):
        self.base_dir = Path(base_dir)
        transforms = Path(model_dir) / AWQ_TRANSFORMS
        self.transforms = load_file(str(transforms)) if transforms.is_file() else {}

    def __call__(self, name: str, shape: tuple[int, int], device: torch.device, dtype: torch.dtype) -> Tensor:
        key = f"{name}.weight"
        file = tensor_file(self.base_dir, key)
        if file is None:
            raise ValueError(f"the float base {self.base_dir} has no {key}; finetune.init error needs the model "
                             "the quantized one was made from (or set finetune.init standard)")
        with safe_open(str(file), "pt") as handle:
            weight = handle.get_tensor(key).to(device=device, dtype=dtype)
        if tuple(weight.shape) != tuple(shape):
            raise ValueError(f"{key} is {tuple(weight.shape)} in the float base {self.base_dir} and {tuple(shape)} "
                             "in the quantized model: not the model it was quantized from (or set finetune.init "
                             "standard)")
        columns, rows = (self.transforms.get(f"{name}.{kind}") for kind in ("input_scale", "output_scale"))
        if columns is not None:
            weight = weight * columns.to(device=device, dtype=dtype)[None, :]
        if rows is not None:
            weight = weight * rows.to(device=device, dtype=dtype)[:, None]
        return weight


@torch.no_grad()
def input_mean_squares(model: nn.Module, examples: list[list[int]], layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Per input channel of each layer: the mean of ``x**2`` over every token of ``examples`` (float64)."""
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def record(_: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] += x.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        for ids in examples:
            model(input_ids=torch.tensor([ids], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in layers}


@dataclass(frozen=True)
class LowRankError:
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    kept: float  # share of the input-weighted error energy the rank-r copy removes


def low_rank_error(float_weight: Tensor, quant_weight: Tensor, mean_square: Tensor, rank: int) -> LowRankError:
    """``b @ a``: the rank-``rank`` matrix closest to ``float_weight - quant_weight`` in the norm weighted by
    the inputs' root mean square per channel (exact for the expected output error when channels are
    uncorrelated). Computed in ``float_weight``'s dtype (at least float32)."""
    dtype = torch.promote_types(float_weight.dtype, torch.float32)
    error = float_weight.to(dtype) - quant_weight.to(dtype)
    scale = mean_square.to(dtype).clamp(min=0).sqrt()
    scale = scale.clamp(min=1e-6 * float(scale.max().clamp(min=1e-30)))
    scale = scale / scale.square().mean().sqrt()  # RMS 1: a and b come out of the same size
    u, s, vh = torch.linalg.svd(error * scale[None, :], full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    energy = float(s.square().sum())
    kept = float(s[:rank].square().sum()) / energy if energy > 0 else 0.0
    return LowRankError(a=(root[:, None] * vh[:rank]) / scale[None, :], b=u[:, :rank] * root[None, :], kept=kept)


@torch.no_grad()
def init_from_error(model: nn.Module, base_dir: Path, model_dir: Path, examples: list[list[int]],
                    adapter: str = "default") -> dict[str, float]:
    """Set the A and B of every LoRA layer over a quantized linear of ``model`` (a PEFT model) to the low-rank
    copy of that layer's quantization error; returns each layer's kept share. Layers over float linears are
    left as PEFT made them (a float layer has no error to copy)."""
    from oliveflow.olive_ext import QuantLinearLora

    layers = {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
              if isinstance(module, QuantLinearLora) and adapter in module.lora_A}
    if not layers:
        return {}
    mean_squares = input_mean_squares(model, examples, layers)
    float_weight = FloatWeights(base_dir, model_dir)
    kept = {}
    for name, layer in layers.items():
        quant = layer.get_base_layer()
        quant_weight = quant.unpack_and_dequantize(quant.qweight, quant.scales, quant.qzeros)
        for what, values in (("the inputs", mean_squares[name]), ("the int4 weight", quant_weight)):
            if not torch.isfinite(values).all():
                raise FloatingPointError(f"finetune.init error: {what} of {name} are not finite (nan or inf) on "
                                         "the training examples: the quantized model is broken")
        # float64 where it is cheap (a CPU, or a small model); float32 on a GPU
        dtype = torch.float64 if quant_weight.device.type == "cpu" else torch.float32
        found = low_rank_error(float_weight(name, quant_weight.shape, quant_weight.device, dtype), quant_weight,
                               mean_squares[name], layer.r[adapter])
        root = math.sqrt(layer.scaling[adapter])  # the layer adds scaling * b @ a
        for linear, value in ((layer.lora_A[adapter], found.a), (layer.lora_B[adapter], found.b)):
            linear.weight.copy_((value / root).to(linear.weight.dtype))
        kept[name] = found.kept
    log.info("finetune: LoRA starts from the quantization error of %d layers (%.1f%% of its input-weighted "
             "energy on average)", len(kept), 100 * sum(kept.values()) / len(kept))
    return kept

