"""AWQ's search cost against its quality, on the real model, over several calibration draws.

    python bench/bench_awq_sizing.py --model SmolLM2-135M-Instruct.Q4_1.gguf [--before old_awq.py] \
        --out bench/results/awq-sizing-h200.json

Variants: this tree's default `AwqSettings()`, the same with the attention/MLP blocks scored on every calibration
token (`search_tokens=0`), with half the alpha grid, with 512 search tokens, and, with `--before`, the default of another
`oliveflow/awq.py` (e.g. `git show <rev>:oliveflow/awq.py`) for a side-by-side comparison.

For each calibration draw (draw 0: the training file in order, as the quantize stage reads it; draw k: shuffled
with seed k) and each variant: AWQ on a fresh float copy on the GPU, then every decoder linear and the head
fake-quantized to Olive's RTN grid (int4, group 32, symmetric; the head untied from the embeddings, as the
quantize stage ships it), then the held-out response perplexity with the model's chat template. The draws
matter: one draw's spread between variants was wider than any trend. Comparisons are paired (same draw).

CPU time: the first ``--cpu-layers`` decoder layers searched on the CPU with ``--cpu-threads`` threads (a 2-core
laptop's share), scaled to the whole model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import torch


def _fake_quantize_all(model, quantizer) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied, as Rtn(lm_head=True) ships it
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantizer.fake_quantize(module.weight))


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("awq_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model spec: folder, .gguf or embedded:... (default: the real model)")
    parser.add_argument("--before", type=Path, help="another awq.py whose default settings to compare")
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--cpu-layers", type=int, default=2)
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow import awq
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
    train = read_examples(data.train_path, data.fields)
    gpu = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    float_model = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32)
    quantizer = awq.AwqSettings().quantizer()
    layers = len(float_model.model.layers)

    variants: dict[str, tuple[ModuleType, object]] = {
        "default": (awq, awq.AwqSettings()),
        "all-tokens": (awq, awq.AwqSettings(search_tokens=0)),
        "grid-10": (awq, awq.AwqSettings(grid=10)),
        "grid-10-512": (awq, awq.AwqSettings(grid=10, search_tokens=512)),
        "grid-20-512": (awq, awq.AwqSettings(grid=20, search_tokens=512)),
    }
    if args.before:
        before = _load_module(args.before)
        variants = {"before": (before, before.AwqSettings()), **variants}
    reference = "before" if args.before else "default"

    def calibration(draw: int) -> list[torch.Tensor]:
        # As the quantize stage feeds it: the data's fields on separate lines, one sample per example.
        rows = list(train)
        if draw:
            random.Random(draw).shuffle(rows)
        return [torch.tensor(tokenizer("\n".join(str(row[f]) for f in data.fields))["input_ids"]) for row in rows]

    def ppl(model) -> float:
        return math.exp(held_out_loss(model.to(gpu), held_out, pad).response_loss)

    report: dict = {"model": base.spec, "machine": {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpus": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version()},
        "cpu_threads": args.cpu_threads, "layers": layers, "draws": args.draws,
        "settings": {name: {k: v for k, v in vars(s).items()} for name, (_, s) in variants.items()},
        "runs": [], "summary": {}}
    report["float_response_ppl"] = ppl(copy.deepcopy(float_model))
    rtn = copy.deepcopy(float_model)
    _fake_quantize_all(rtn, quantizer)
    report["rtn_response_ppl"] = ppl(rtn)
    del rtn

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")

    for draw in range(args.draws):
        samples = calibration(draw)
        for name, (module, settings) in variants.items():
            model = copy.deepcopy(float_model).to(gpu)
            started = time.perf_counter()
            module.apply_awq(model, [c.to(gpu) for c in samples], settings)
            if gpu.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            _fake_quantize_all(model, quantizer)
            run = {"draw": draw, "variant": name, "response_ppl": ppl(model), "gpu_seconds": round(seconds, 2)}
            del model
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()

    samples = calibration(0)
    torch.set_num_threads(args.cpu_threads)
    for name, (module, settings) in variants.items():
        cpu_model = copy.deepcopy(float_model)
        cpu_model.model.layers = cpu_model.model.layers[:args.cpu_layers]
        started = time.perf_counter()
        module.apply_awq(cpu_model, samples, settings)
        per_layer = (time.perf_counter() - started) / args.cpu_layers
        del cpu_model
        ppls = [r["response_ppl"] for r in report["runs"] if r["variant"] == name]
        paired = [r["response_ppl"] / ref["response_ppl"] - 1
                  for r in report["runs"] if r["variant"] == name
                  for ref in report["runs"] if ref["variant"] == reference and ref["draw"] == r["draw"]]
        report["summary"][name] = {
            "response_ppl_mean": round(statistics.mean(ppls), 3),
            "response_ppl_sd": round(statistics.stdev(ppls), 3) if len(ppls) > 1 else None,
            f"relative_to_{reference}_mean": round(statistics.mean(paired), 4),
            f"relative_to_{reference}_sd": round(statistics.stdev(paired), 4) if len(paired) > 1 else None,
            "gpu_seconds_mean": round(statistics.mean(r["gpu_seconds"] for r in report["runs"]
                                                      if r["variant"] == name), 2),
            "cpu_seconds_per_layer": round(per_layer, 2),
            "cpu_seconds_all_layers": round(per_layer * layers, 1)}
        print(name, json.dumps(report["summary"][name]), flush=True)
        save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
