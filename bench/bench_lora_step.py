"""LoRA step time on the int4 model against plain LoRA on the float model, same shape, same machine, one run.

    .venv/bin/python bench/bench_lora_step.py [--model SPEC] [--steps 5] --out bench/results/lora-step-cpu.json

Three cases, each ``--steps`` timed optimizer steps (after one warm-up step) of batch x seq tokens, LoRA r 16 on
the attention and MLP projections, AdamW:
- ``float``: PEFT LoRA on the float model (the target: QuantLoRA / this <= 1.3);
- ``int4``: the quantize stage's rtn output (Olive ``QuantLinear``) with this project's ``QuantLinearLora``, the
  frozen base unpacked once (``dequantize_once``), as the finetune stage runs it;
- ``int4_unpacked_every_pass``: the same without ``dequantize_once``: QuantLinear unpacks its int4 codes on every
  forward and backward pass (the state before the fix).
Peak RSS of this process is reported after each case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch


def _time_steps(model, steps: int, batch: int, seq: int, vocab: int) -> float:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (steps + 1, batch, seq), generator=generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / steps  # the first step warms up allocators and kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model spec (default: the real model, embedded:smollm2-135m-instruct)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from olive.model import HfModelHandler
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from oliveflow.config import REAL_MODEL, DataConfig, QuantizeConfig
    from oliveflow.olive_ext import QuantLinear, QuantLinearLora, dequantize_once
    from oliveflow.stages.data import validate_data
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    qconfig = QuantizeConfig(algorithm="rtn")
    base = resolve_model(args.model or REAL_MODEL, qconfig)
    work = Path(tempfile.mkdtemp(prefix="oliveflow-lora-step-"))
    quantized = quantize(base, qconfig, work, data=validate_data(DataConfig()))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj"]

    def lora(model):
        present = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(targets))
        config = LoraConfig(r=16, lora_alpha=32, target_modules=present, bias="none")
        config._register_custom_module({QuantLinear: QuantLinearLora})
        return get_peft_model(model, config)

    def int4(unpack_once: bool):
        model = HfModelHandler(model_path=str(quantized.model_dir)).load_model()
        return lora(dequantize_once(model) if unpack_once else model)

    cases = {"float": lambda: lora(AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32)),
             "int4": lambda: int4(True), "int4_unpacked_every_pass": lambda: int4(False)}
    report: dict = {"model": base.spec, "parameters": base.parameters, "batch": args.batch, "seq": args.seq,
                    "steps": args.steps, "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                                     "platform": platform.platform(), "torch": torch.__version__},
                    "seconds_per_step": {}, "peak_rss_gb_after": {}}
    for name, build in cases.items():
        torch.manual_seed(0)
        model = build()
        vocab = model.get_input_embeddings().weight.shape[0]
        report["seconds_per_step"][name] = round(_time_steps(model, args.steps, args.batch, args.seq, vocab), 3)
        report["peak_rss_gb_after"][name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
        del model
        print(name, report["seconds_per_step"][name], flush=True)
    per_step = report["seconds_per_step"]
    report["int4_over_float"] = round(per_step["int4"] / per_step["float"], 2)
    report["unpacked_every_pass_over_float"] = round(per_step["int4_unpacked_every_pass"] / per_step["float"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
