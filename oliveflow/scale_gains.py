"""finetune.train_scales: the quantization scales learn with the LoRA (PEQA, Kim et al. 2023).

Every decoder linear of the int4 model gets one trainable ``delta`` per quantization group, and its weight becomes
``(codes - zero) * scale * (1 + delta)``: the int4 codes stay as they are, each group's step size moves. The head
(whose codes a tied embedding also reads) is left alone. After training the new scales, ``scale * (1 + delta)``,
are written into a copy of the quantized checkpoint, which the export then builds from, so the adapter is trained
against the weights that ship. Deltas start at 0 and share the LoRA's optimizer and learning rate.

The base that ships is then tuned to the task too: the ``.onnx_adapter`` file still swaps the LoRA, but the int4
graph it runs on is no longer the generic quantized model.
"""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import torch

DELTA = "scale_delta"
DELTAS_FILE = "scale_deltas.safetensors"


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    # ``scale * (1 + delta)`` in float32, then in the model's dtype: in bfloat16, 1 + delta has steps of 2^-7, and
    # the deltas this learns (about 0.005) would round to 0 or to a whole step.
    scales = (self.scales.float() * (1 + getattr(self, DELTA))).to(self.scales.dtype)
    weight = (self.__dict__["_oliveflow_centered"] * scales.unsqueeze(-1)).reshape(self.rows, self.cols)
    return torch.nn.functional.linear(x, weight.to(x.dtype), bias=self.bias).to(x.dtype)


def install(model: torch.nn.Module) -> list[str]:
    """Give every non-head ``QuantLinear`` of ``model`` a trainable per-group delta; the names of those layers."""
    from olive.common.quant.nn import QuantLinear
    from olive.common.quant.utils import unpack_from_uint8

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or name.split(".")[-1] == "lm_head":
            continue
        with torch.no_grad():
            codes = unpack_from_uint8(module.qweight, module.quantizer.bits, (module.qweight.shape[0], module.cols))
            zeros = (unpack_from_uint8(module.qzeros, module.quantizer.bits, module.scales.shape)
                     if module.qzeros is not None else torch.full_like(module.scales, module.quantizer.midq,
                                                                        dtype=torch.int32))
            centered = (codes.reshape(*module.scales.shape, -1) - zeros.unsqueeze(-1)).to(module.scales.dtype)
        module.__dict__["_oliveflow_centered"] = centered
        module.register_parameter(DELTA, torch.nn.Parameter(torch.zeros_like(module.scales, dtype=torch.float32)))
        module.forward = types.MethodType(_forward, module)
        names.append(name)
    return names


def trainable(model: torch.nn.Module) -> None:
    """After PEFT froze every base parameter: the deltas train."""
    for name, parameter in model.named_parameters():
        if name.endswith(DELTA):
            parameter.requires_grad_(True)


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{checkpoint scales name: delta}`` of a trained model (PEFT's prefixes and wrappers taken off)."""
    found = {}
    for name, parameter in model.named_parameters():
        if name.endswith(DELTA):
            layer = name[: -len(DELTA) - 1].replace(".base_layer", "")
            layer = layer.removeprefix("base_model.model.")
            found[layer + ".scales"] = parameter.detach().float().cpu().contiguous()
    return found


def write_model(quantized_dir: Path, deltas_file: Path, out_dir: Path) -> int:
    """A copy of the quantized checkpoint in ``out_dir`` with every delta folded into its scales; how many."""
    from safetensors.torch import load_file, save_file

    found = load_file(str(deltas_file))
    shutil.copytree(quantized_dir, out_dir)
    applied = 0
    for file in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(str(file))
        hits = [k for k in tensors if k in found]
        if not hits:
            continue
        for key in hits:
            tensors[key] = (tensors[key] * (1 + found[key].to(tensors[key].dtype))).contiguous()
            applied += 1
        save_file(tensors, str(file), metadata={"format": "pt"})
    if applied != len(found):
        missing = sorted(set(found) - {k for f in out_dir.glob("*.safetensors") for k in load_file(str(f))})
        raise ValueError(f"{deltas_file}: {len(found) - applied} trained scales have no tensor in {quantized_dir} "
                         f"(e.g. {missing[:3]})")
    return applied
