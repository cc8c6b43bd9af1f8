"""AWQ's search size against its quality: calibration tokens x alpha grid, on the real model.

    python bench/bench_awq_sizing.py --model SmolLM2-135M-Instruct.Q4_1.gguf --out bench/results/awq-sizing-h200.json

For each (max_calibration_tokens, grid) variant: AWQ (this project's `apply_awq`, clipping on) on a fresh float
copy, then every decoder linear and the head fake-quantized to Olive's RTN grid (int4, group 32, symmetric; the
head untied from the embeddings, as the quantize stage ships it), then the held-out response perplexity with the
model's chat template. Timed twice: the whole search on the GPU, and the first ``--cpu-layers`` decoder layers on
the CPU with ``--cpu-threads`` threads (a 2-core laptop's share), scaled to the whole model. RTN alone (no
search) is the floor. Where the time goes is (grid + 1) x tokens forwards of each layer's blocks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from pathlib import Path

import torch


def _fake_quantize_all(model, quantizer) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied, as Rtn(lm_head=True) ships it
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantizer.fake_quantize(module.weight))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model spec: folder, .gguf or embedded:... (default: the real model)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 2048, 1024, 512])
    parser.add_argument("--grid", nargs="+", type=int, default=[20, 10, 5])
    parser.add_argument("--cpu-layers", type=int, default=2)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow.awq import AwqSettings, apply_awq
    from oliveflow.config import REAL_MODEL, DataConfig, QuantizeConfig
    from oliveflow.sft import encode_rows, held_out_loss
    from oliveflow.stages.data import read_examples, resolve_template, validate_data
    from oliveflow.stages.model import resolve_model

    data_config = DataConfig()
    data = validate_data(data_config)
    base = resolve_model(args.model or REAL_MODEL, QuantizeConfig())
    template = resolve_template(data_config, base.artifact.path)
    tokenizer = AutoTokenizer.from_pretrained(base.artifact.path)
    held_out, _ = encode_rows(tokenizer, template, read_examples(data.eval_path, data.fields), 256)
    pad = tokenizer.pad_token_id or 0
    # Calibration as the quantize stage takes it: the data's fields (not the template), one sample per example.
    calibration = [torch.tensor(tokenizer(" ".join(str(row[f]) for f in data.fields))["input_ids"])
                   for row in read_examples(data.train_path, data.fields)]
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    float_model = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32)
    quantizer = AwqSettings().quantizer()
    layers = len(float_model.model.layers)

    def ppl(model) -> float:
        return math.exp(held_out_loss(model.to(gpu), held_out, pad).response_loss)

    report: dict = {"model": base.spec, "machine": {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version()},
        "cpu_threads": args.cpu_threads, "layers": layers, "variants": []}
    report["float_response_ppl"] = ppl(copy.deepcopy(float_model))
    rtn = copy.deepcopy(float_model)
    _fake_quantize_all(rtn, quantizer)
    report["rtn_response_ppl"] = ppl(rtn)
    del rtn
    for tokens in args.tokens:
        for grid in args.grid:
            settings = AwqSettings(grid=grid, max_calibration_tokens=tokens)
            model = copy.deepcopy(float_model).to(gpu)
            started = time.perf_counter()
            apply_awq(model, [c.to(gpu) for c in calibration], settings)
            if gpu.type == "cuda":
                torch.cuda.synchronize()
            gpu_seconds = time.perf_counter() - started
            _fake_quantize_all(model, quantizer)
            quality = ppl(model)
            del model
            # CPU time: the first layers only (each layer costs about the same), scaled to all of them.
            torch.set_num_threads(args.cpu_threads)
            cpu_model = copy.deepcopy(float_model)
            cpu_model.model.layers = cpu_model.model.layers[:args.cpu_layers]
            started = time.perf_counter()
            apply_awq(cpu_model, calibration, AwqSettings(grid=grid, max_calibration_tokens=tokens, lm_head=False))
            cpu_per_layer = (time.perf_counter() - started) / args.cpu_layers
            torch.set_num_threads(os.cpu_count() or 1)
            del cpu_model
            variant = {"tokens": tokens, "grid": grid, "response_ppl": quality, "gpu_seconds": round(gpu_seconds, 1),
                       "cpu_seconds_per_layer": round(cpu_per_layer, 2),
                       "cpu_seconds_all_layers": round(cpu_per_layer * layers, 1)}
            report["variants"].append(variant)
            print(json.dumps(variant), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
