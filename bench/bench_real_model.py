"""Quality on a real pretrained model: SmolLM2-135M-Instruct through the pipeline's own stage functions.

    python bench/bench_real_model.py --out bench/results/real-model-h200.json                  # a GPU machine
    python bench/bench_real_model.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf --out ...   # a GGUF at hand

One quantized model per algorithm, then one fine-tune per (learning rate, loss_on) variant on it, each
exported and smoke-tested: held-out response perplexity of the float, quantized and fine-tuned model,
ROUGE-L of the answers with and without the adapter, and three answers quoted. The model's own chat
template (ChatML) and the bundled travel data. Stages run on the GPU when torch sees one (export and
generation always on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the model's .gguf (default: embedded:smollm2-135m-instruct)")
    parser.add_argument("--quantize", nargs="+", default=["awq"], help="quantize.algorithm values")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--lr", nargs="+", type=float, default=[2e-4, 5e-4, 1e-3, 2e-3])
    parser.add_argument("--loss-on", nargs="+", default=["response"], help="finetune.loss_on values")
    parser.add_argument("--whole-text-lr", type=float, help="also fine-tune with loss_on=all at this rate")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=16, help="held-out prompts answered for ROUGE-L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oliveflow-real-model-"))
    os.environ.setdefault("OLIVEFLOW_HOME", str(work / "home"))
    from oliveflow.config import (REAL_MODEL, DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig,
                                  SmokeTestConfig)
    from oliveflow.errors import StageError
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.export import export
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize
    from oliveflow.stages.smoke_test import smoke_test

    data_config = DataConfig()
    data = validate_data(data_config)
    spec = str(args.gguf) if args.gguf else REAL_MODEL
    results: dict = {"model": spec, "runs": [], "machine": {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__}}

    def folder(name: str) -> Path:
        path = work / name
        path.mkdir(parents=True)
        return path

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    variants = [(lr, loss_on) for lr in args.lr for loss_on in args.loss_on]
    if args.whole_text_lr:
        variants.append((args.whole_text_lr, "all"))
    for algorithm in args.quantize:
        qconfig = QuantizeConfig(algorithm=algorithm, group_size=args.group_size)
        base = resolve_model(spec, qconfig)
        template = resolve_template(data_config, base.artifact.path)
        results["template"] = template
        started = time.perf_counter()
        quantized = quantize(base, qconfig, folder(f"q-{algorithm}"), data=data)
        q_seconds = time.perf_counter() - started
        for lr, loss_on in variants:
            fconfig = FinetuneConfig(learning_rate=lr, loss_on=loss_on, max_steps=args.max_steps, seed=args.seed)
            run: dict = {"quantize": algorithm, "group_size": args.group_size, "quantize_seconds": round(q_seconds, 1),
                         "learning_rate": lr, "loss_on": loss_on, "steps": args.max_steps}
            started = time.perf_counter()
            adapter = finetune(base, quantized, data, template, fconfig, folder(f"f-{algorithm}-{lr}-{loss_on}"))
            run.update(finetune_seconds=round(time.perf_counter() - started, 1),
                       train_loss_first=adapter.train_loss[0], train_loss_last=adapter.train_loss[-1],
                       response_ppl={"float": adapter.response_ppl_original, "quantized": adapter.response_ppl_quantized,
                                     "finetuned": adapter.response_ppl_finetuned},
                       eval_loss={"float": adapter.eval_loss_original, "quantized": adapter.eval_loss_quantized,
                                  "finetuned": adapter.eval_loss_finetuned})
            onnx = export(quantized, adapter, ExportConfig(), folder(f"e-{algorithm}-{lr}-{loss_on}"))
            try:
                smoke = smoke_test(onnx, base, data, template, SmokeTestConfig(num_samples=args.samples))
                run.update(rouge_l={"base": smoke.rouge_l_base, "finetuned": smoke.rouge_l_finetuned},
                           decode_tokens_per_second=smoke.decode_tokens_per_second,
                           answers=[s.model_dump(include={"prompt", "reference", "base_answer", "finetuned_answer"})
                                    for s in smoke.samples[:3]])
            except StageError as exc:
                run["smoke_refused"] = str(exc)
            results["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "answers"}), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
