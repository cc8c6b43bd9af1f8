"""Olive's min/max quantizer on a CPU and on a CUDA GPU, tensor by tensor, over a real model's float weights.

    python bench/bench_quantizer_devices.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--olive] --out OUT.json

Counts the int4 codes and scales that differ between the two devices, with the first differing weights (their
``w / scale`` on each device). ``--olive`` uses Olive's own ``find_qparams`` (which divides by a Python int, a
multiplication by its reciprocal on CUDA); without it, ``oliveflow.olive_ext.find_qparams`` (a true division).
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model spec: a .gguf, a folder, or embedded:...")
    parser.add_argument("--olive", action="store_true", help="Olive's own find_qparams, not oliveflow's")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    from olive.common.quant.utils import WeightQuantizer
    from transformers import AutoModelForCausalLM

    from oliveflow import olive_ext
    from oliveflow.config import QuantizeConfig
    from oliveflow.stages.model import resolve_model

    if args.olive:
        WeightQuantizer.find_qparams = olive_ext.OLIVE_FIND_QPARAMS
    base = resolve_model(args.model, QuantizeConfig())
    model = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype="auto")
    quantizer = WeightQuantizer(bits=4, symmetric=True, group_size=args.group_size, signed=False)
    codes = codes_differing = scales = scales_differing = 0
    examples = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.data
        cpu_scales, cpu_zeros = quantizer.find_qparams(w)
        cpu_codes = quantizer.quantize(w, cpu_scales, cpu_zeros)
        gpu_scales, gpu_zeros = quantizer.find_qparams(w.cuda())
        gpu_codes = quantizer.quantize(w.cuda(), gpu_scales, gpu_zeros).cpu()
        gpu_scales = gpu_scales.cpu()
        differ = cpu_codes != gpu_codes
        codes += differ.numel()
        codes_differing += int(differ.sum())
        scales += cpu_scales.numel()
        scales_differing += int((cpu_scales != gpu_scales).sum())
        if differ.any() and len(examples) < 5:
            row, col = differ.nonzero()[0].tolist()
            group = col // args.group_size if args.group_size > 0 else 0
            x, sc, sg = w[row, col], cpu_scales[row, group], gpu_scales[row, group]
            examples.append({"tensor": name, "weight": float(x), "scale_cpu": float(sc), "scale_gpu": float(sg),
                             "w_over_s_cpu": float(x / sc), "w_over_s_gpu": float((x.cuda() / sg.cuda()).cpu()),
                             "code_cpu": int(cpu_codes[row, col]), "code_gpu": int(gpu_codes[row, col])})
    result = {"model": args.model, "find_qparams": "olive" if args.olive else "oliveflow",
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": str(model.dtype),
              "codes": codes, "codes_differing": codes_differing, "scales": scales,
              "scales_differing": scales_differing, "examples": examples}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))


if __name__ == "__main__":
    main()
