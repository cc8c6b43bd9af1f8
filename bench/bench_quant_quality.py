"""Quantization quality on a real model: every quantizer and setting, before and after the LoRA, side by side.

    python bench/bench_quant_quality.py --model PATH.gguf --parts sweep devices finetune --out-dir OUT

Everything goes through the pipeline's own stage functions, the model's chat template and the bundled
travel data; held-out figures are on the 46 examples of ``data/travel_eval.jsonl``, response tokens only.

Parts (each written to ``OUT/quant-quality-<part>-<tag>.json`` as soon as it ends):

- ``sweep``: every (algorithm, group size, symmetry) with every layer at 4 bits, and the default
  mixed-precision plan: held-out response perplexity before fine-tuning, estimated shipped bytes, seconds.
- ``devices``: the default quantizer run on the GPU and on the CPU (a child process with CUDA hidden):
  share of identical codes and scales per tensor, largest scale difference, perplexity of each.
- ``weighting``: awq and awq+gptq (all 4-bit) with AWQ's search error weighted by token: ``prompt_weight``
  empty (packed text), 1, 0.25 and 0 (response tokens only).
- ``fingerprint``: the default quantizer and awq alone, with a hash of every tensor and AWQ's alphas, to
  compare with another machine's (``--compare A.json B.json``).
- ``finetune``: LoRA (default settings, 100 steps) on the float model, on the default quantized model, on
  the all-4-bit model, for each seed; and the reverse order (LoRA on the float model, merged, then
  quantized). The default chain is exported and smoke-tested: shipped bytes, ROUGE-L, answers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")
# The float LoRA row, the reference issue 14 measures against: no trained scales, error init or distillation.
FLOAT_LORA = {"train_scales": False, "init": "standard", "distill": 0.0}


def held_out_ppl(model_dir: Path, data, template: str) -> float:
    """Response perplexity of a (quantized or float) HF folder on the held-out file, in float32."""
    from olive.model import HfModelHandler
    from transformers import AutoTokenizer

    from oliveflow.olive_ext import dequantize_once
    from oliveflow.sft import encode_rows, held_out_loss
    from oliveflow.stages.data import read_examples

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_rows(tokenizer, template, read_examples(data.eval_path, data.fields), 512, "response")
    model = dequantize_once(HfModelHandler(model_path=str(model_dir), load_kwargs={"dtype": "float32"}
                                           ).load_model().to(device))
    loss = held_out_loss(model, examples, tokenizer.pad_token_id or 0, 8)
    del model
    return loss.response_perplexity


def float_as_quantized(base, out: Path):
    """The float base wrapped as a QuantizedModel (the stage functions' input type), for the float LoRA row."""
    from oliveflow.results import QuantizedModel
    from oliveflow.stages import artifact_of

    shutil.copytree(base.artifact.path, out / "model")
    return QuantizedModel(artifact=artifact_of(out), algorithm="none", bits=16, group_size=0,
                          size_before_bytes=base.artifact.size_bytes, size_after_bytes=base.artifact.size_bytes,
                          seconds=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model spec: a .gguf, a folder, or embedded:...")
    parser.add_argument("--parts", nargs="+", default=["sweep", "devices", "finetune"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--symmetric", nargs="+", type=int, default=[1, 0], help="sweep: 1 symmetric, 0 asymmetric")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--default", default="awq+gptq", help="the quantizer the finetune part ships")
    parser.add_argument("--default-symmetric", type=int, default=1)
    parser.add_argument("--default-group", type=int, default=32)
    parser.add_argument("--default-budget", type=float, help="the shipped size budget (default: QuantizeConfig's; "
                                                             "0 for none: every layer at 4 bits)")
    parser.add_argument("--finetune-overrides", default="{}",
                        help='finetune: JSON of FinetuneConfig fields for every row, e.g. \'{"precision": "float32"}\'; '
                             'a JSON list of such objects runs each variant on every path and seed')
    parser.add_argument("--target-modules", nargs="+", help="finetune: LoRA target modules (default: Olive's)")
    parser.add_argument("--lora-r", type=int, help="finetune: LoRA rank (default: FinetuneConfig's)")
    parser.add_argument("--rows", nargs="+", default=["float", "shipped", "uniform", "reverse", "export"],
                        help="finetune: which rows (float LoRA, shipped, all 4-bit, reverse order)")
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--quantize-only", help=argparse.SUPPRESS)  # child: quantize into this folder, print JSON
    parser.add_argument("--compare", nargs=2, type=Path, help="compare two fingerprint JSONs and exit")
    args = parser.parse_args()
    if args.compare:
        compare_fingerprints(*args.compare)
        return
    if not args.model or not args.out_dir:
        parser.error("--model and --out-dir are required")

    work = Path(tempfile.mkdtemp(prefix="oliveflow-qq-"))
    os.environ.setdefault("OLIVEFLOW_HOME", str(work / "home"))
    from oliveflow.config import DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig, SmokeTestConfig
    from oliveflow.errors import StageError
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.export import export
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    data = validate_data(DataConfig())
    default = QuantizeConfig(algorithm=args.default, group_size=args.default_group,
                             symmetric=bool(args.default_symmetric))
    if args.default_budget is not None:
        default = default.model_copy(update={"size_budget": args.default_budget or None})
    base = resolve_model(args.model, default)
    template = resolve_template(DataConfig(), base.artifact.path)

    if args.quantize_only:
        config = QuantizeConfig.model_validate_json(args.quantize_only)
        q = quantize(base, config, Path(os.environ["QQ_OUT"]), data=data)
        print("QUANTIZED " + q.model_dump_json())
        return

    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    counter = iter(range(10**6))

    def folder(name: str) -> Path:
        path = work / f"{next(counter)}-{name}"
        path.mkdir(parents=True)
        return path

    def save(part: str, result: dict) -> None:
        out = args.out_dir / f"quant-quality-{part}-{args.tag}.json"
        out.write_text(json.dumps({"model": args.model, "machine": machine, **result}, indent=1) + "\n")
        print(f"wrote {out}", flush=True)

    def run_quantize(config: QuantizeConfig) -> dict:
        started = time.perf_counter()
        q = quantize(base, config, folder(f"q-{config.algorithm}-{config.group_size}"), data=data)
        row = {"algorithm": config.algorithm, "group_size": config.group_size, "symmetric": config.symmetric,
               "size_budget": config.size_budget, "promoted": q.promoted, "size_bytes": q.size_after_bytes,
               "seconds": round(time.perf_counter() - started, 1)}
        row["response_ppl"] = held_out_ppl(q.model_dir, data, template)
        print(json.dumps(row), flush=True)
        return {"row": row, "model": q}

    ppl_float = held_out_ppl(base.artifact.path, data, template)
    print(f"float response ppl {ppl_float:.3f}", flush=True)

    if "sweep" in args.parts:
        rows = []
        for group in args.group_sizes:
            for algorithm in args.algorithms:
                for symmetric in map(bool, args.symmetric):
                    config = QuantizeConfig(algorithm=algorithm, group_size=group, symmetric=symmetric,
                                            size_budget=None)
                    try:
                        rows.append(run_quantize(config)["row"])
                    except Exception as exc:  # a failed setting is a result too
                        rows.append({"algorithm": algorithm, "group_size": group, "symmetric": symmetric,
                                     "error": str(exc).splitlines()[0][:300]})
            save("sweep", {"float_response_ppl": ppl_float, "rows": rows})
        rows.append(run_quantize(default)["row"] | {"default": True})
        save("sweep", {"float_response_ppl": ppl_float, "rows": rows})

    if "weighting" in args.parts:
        # AWQ's search error weighted by token: the packed text (None), the examples one by one with every token
        # weighing 1, and with the prompt's tokens weighing less than the response's.
        rows = []
        for algorithm in ("awq", "awq+gptq"):
            for weight in (None, 1.0, 0.25, 0.0):
                config = default.model_copy(update={"algorithm": algorithm, "size_budget": None,
                                                    "prompt_weight": weight})
                rows.append(run_quantize(config)["row"] | {"prompt_weight": weight})
                save("weighting", {"float_response_ppl": ppl_float, "rows": rows})

    if "fingerprint" in args.parts:
        # What a quantizer produced on this machine, small enough to bring back and compare with another's
        # (--compare A.json B.json): promoted units, AWQ's alphas, a hash per tensor, held-out perplexity.
        rows = []
        for config in (default, default.model_copy(update={"algorithm": "awq"})):
            q = run_quantize(config)
            rows.append({**q["row"], **fingerprint(q["model"].model_dir)})
            save("fingerprint", {"rows": rows})

    if "devices" in args.parts:
        gpu = run_quantize(default)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "QQ_OUT": str(folder("q-cpu"))}
        started = time.perf_counter()
        child = subprocess.run([sys.executable, __file__, "--model", args.model, "--out-dir", str(args.out_dir),
                                "--quantize-only", default.model_dump_json()], env=env, capture_output=True,
                               text=True)
        if child.returncode:
            save("devices", {"error": child.stderr[-3000:]})
        else:
            from oliveflow.results import QuantizedModel

            line = next(x for x in child.stdout.splitlines() if x.startswith("QUANTIZED "))
            cpu = QuantizedModel.model_validate_json(line[len("QUANTIZED "):])
            compare = compare_checkpoints(gpu["model"].model_dir, cpu.model_dir)
            save("devices", {"config": default.model_dump(), "gpu": gpu["row"],
                             "cpu": {"promoted": cpu.promoted, "seconds": round(time.perf_counter() - started, 1),
                                     "response_ppl": held_out_ppl(cpu.model_dir, data, template)},
                             "comparison": compare})

    if "finetune" in args.parts:
        rows = []
        paths = []
        if "float" in args.rows:
            paths.append(("float LoRA", float_as_quantized(base, folder("float"))))
        if "shipped" in args.rows:
            paths.append(("shipped: " + args.default, run_quantize(default)["model"]))
        if "uniform" in args.rows:
            paths.append(("all 4-bit " + args.default,
                          run_quantize(default.model_copy(update={"size_budget": None}))["model"]))
        variants = json.loads(args.finetune_overrides)
        for seed, overrides, (name, model) in itertools.product(
                args.seeds, variants if isinstance(variants, list) else [variants], paths):
            lora = dict(overrides)
            if name == "float LoRA":  # the reference: the plain LoRA, without what only a quantized model needs
                lora.update(FLOAT_LORA)
            if args.target_modules:
                lora["target_modules"] = args.target_modules
            if args.lora_r:
                lora["r"] = args.lora_r
            started = time.perf_counter()
            adapter = finetune(base, model, data, template, FinetuneConfig(seed=seed, **lora), folder("f"))
            row = {"path": name, "seed": seed, "target_modules": args.target_modules, "lora_r": args.lora_r,
                   "finetune_overrides": overrides,
                   "size_bytes": model.size_after_bytes,
                   "response_ppl_before": adapter.response_ppl_quantized,
                   "response_ppl_after": adapter.response_ppl_finetuned,
                   "response_ppl_original": adapter.response_ppl_original,
                   "response_ppl_teacher": adapter.response_ppl_teacher,
                   "seconds": round(time.perf_counter() - started, 1)}
            if name.startswith("shipped") and seed == args.seeds[0] and "export" in args.rows:
                onnx = export(model, adapter, ExportConfig(), folder("e"))
                row["onnx_model_bytes"] = sum(p.stat().st_size for p in onnx.model_dir.iterdir()
                                              if p.name.startswith("model.onnx"))
                row["adapter_bytes"] = onnx.adapter_file.stat().st_size
                try:
                    from oliveflow.stages.smoke_test import smoke_test

                    smoke = smoke_test(onnx, base, data, template, SmokeTestConfig(num_samples=16))
                    row.update(rouge_l_base=smoke.rouge_l_base, rouge_l_finetuned=smoke.rouge_l_finetuned,
                               answers=[s.model_dump(include={"prompt", "reference", "base_answer",
                                                              "finetuned_answer"}) for s in smoke.samples[:3]])
                except StageError as exc:
                    row["smoke_refused"] = str(exc)
                except ImportError as exc:  # the GPU machine has no MLflow, which the smoke test imports
                    row["smoke_skipped"] = str(exc)
            if name == "float LoRA" and "reverse" in args.rows:
                row["reverse"] = reverse_order(base, adapter, default, data, template, folder("rev"))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
            save("finetune", {"float_response_ppl": ppl_float, "rows": rows})


def reverse_order(base, adapter, config, data, template, work: Path) -> dict:
    """LoRA on the float model, merged into it, then quantized with ``config``: its held-out perplexity."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    merged_dir = work / "merged"
    model = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter.adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base.artifact.path).save_pretrained(merged_dir)
    merged_base = resolve_model(str(merged_dir), config)
    q = quantize(merged_base, config, work / "q", data=data)
    return {"merged_float_ppl": held_out_ppl(merged_dir, data, template),
            "merged_quantized_ppl": held_out_ppl(q.model_dir, data, template), "promoted": q.promoted}


def fingerprint(model_dir: Path) -> dict:
    import hashlib

    from safetensors.torch import load_file

    report = model_dir / "awq_report.json"
    alphas = ([g["alpha"] for layer in json.loads(report.read_text())["layers"] for g in layer["groups"]]
              if report.is_file() else [])
    hashes = {k: hashlib.sha256(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
              for p in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    return {"alphas": alphas, "hashes": hashes}


def compare_fingerprints(a: Path, b: Path) -> None:
    ra, rb = (json.loads(Path(p).read_text())["rows"] for p in (a, b))
    for x, y in zip(ra, rb):
        same_hash = sum(x["hashes"][k] == y["hashes"].get(k) for k in x["hashes"])
        same_alpha = sum(p == q for p, q in zip(x["alphas"], y["alphas"]))
        print(json.dumps({"algorithm": x["algorithm"], "promoted": [x["promoted"], y["promoted"]],
                          "alphas_same": f"{same_alpha}/{len(x['alphas'])}",
                          "tensors_same": f"{same_hash}/{len(x['hashes'])}",
                          "response_ppl": [x["response_ppl"], y["response_ppl"]]}))


def compare_checkpoints(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta = {k: v for p in sorted(a.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    tb = {k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    same_codes = total_codes = 0
    worst_scale = 0.0
    differing = []
    for key in sorted(ta):
        x, y = ta[key], tb.get(key)
        if y is None or x.shape != y.shape:
            differing.append(key)
            continue
        if key.endswith("qweight"):
            same_codes += int((x == y).sum())
            total_codes += x.numel()
        elif key.endswith("scales"):
            worst_scale = max(worst_scale, float(((x.float() - y.float()).abs() / y.float().abs().clamp(min=1e-12)
                                                  ).max()))
        if not torch.equal(x, y):
            differing.append(key)
    alphas = {}
    reports = [p / "awq_report.json" for p in (a, b)]
    if all(r.is_file() for r in reports):
        ra, rb = (json.loads(r.read_text()) for r in reports)
        ga = [g for layer in ra["layers"] for g in layer["groups"]]
        gb = [g for layer in rb["layers"] for g in layer["groups"]]
        same = sum(x["alpha"] == y["alpha"] for x, y in zip(ga, gb))
        alphas = {"groups": len(ga), "same_alpha": same,
                  "first_different": [(x["name"], x["alpha"], y["alpha"]) for x, y in zip(ga, gb)
                                      if x["alpha"] != y["alpha"]][:6]}
    return {"awq_alphas": alphas, "tensors": len(ta), "tensors_differing": len(differing),
            "differing_examples": differing[:8],
            "packed_code_bytes_identical": same_codes / max(total_codes, 1), "largest_relative_scale_diff": worst_scale}


if __name__ == "__main__":
    main()
