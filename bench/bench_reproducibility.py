"""Are the stages reproducible on this machine? Each stage run twice on the same inputs, outputs compared.

    python bench/bench_reproducibility.py --out bench/results/reproducibility-h200.json [--gguf F] [--quantize awq]

The real model (SmolLM2-135M-Instruct) through the pipeline's own stage functions, on the GPU when torch sees
one: quantize twice, fine-tune twice (same seed) on the first quantized model, export both adapters. For each
pair: whether the artifact hashes agree and, where they do not, the largest absolute difference per tensor and
the held-out response perplexity of each. The CPU case is a test (`test_the_finetune_is_bit_reproducible`).
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


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        found.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(path).items()})
    return found


def _compare(a: Path, b: Path) -> dict:
    from oliveflow.store import content_sha256

    ta, tb = _tensors(a), _tensors(b)
    diffs = {k: float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if k in tb}
    return {"same_hash": content_sha256(a) == content_sha256(b), "tensors": len(ta),
            "tensors_differing": sum(d > 0 for d in diffs.values()),
            "max_abs_diff": max(diffs.values(), default=0.0),
            "largest_scale": max((float(t.double().abs().max()) for t in ta.values()), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="the model's .gguf (default: embedded:smollm2-135m-instruct)")
    parser.add_argument("--quantize", default="awq")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oliveflow-repro-"))
    os.environ.setdefault("OLIVEFLOW_HOME", str(work / "home"))
    from oliveflow.config import REAL_MODEL, DataConfig, FinetuneConfig, QuantizeConfig
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    def folder(name: str) -> Path:
        path = work / name
        path.mkdir(parents=True)
        return path

    data_config = DataConfig()
    data = validate_data(data_config)
    qconfig = QuantizeConfig(algorithm=args.quantize)
    base = resolve_model(str(args.gguf) if args.gguf else REAL_MODEL, qconfig)
    template = resolve_template(data_config, base.artifact.path)
    report: dict = {"machine": {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                "cpus": os.cpu_count(), "torch": torch.__version__,
                                "python": platform.python_version()},
                    "quantize": args.quantize, "steps": args.max_steps}
    started = time.perf_counter()
    q1 = quantize(base, qconfig, folder("q1"), data=data)
    q2 = quantize(base, qconfig, folder("q2"), data=data)
    report["quantize_seconds_both"] = round(time.perf_counter() - started, 1)
    report["quantize_pair"] = _compare(q1.artifact.path, q2.artifact.path)
    fconfig = FinetuneConfig(max_steps=args.max_steps).for_model(base.parameters)
    adapters = [finetune(base, q1, data, template, fconfig, folder(f"f{i}")) for i in (1, 2)]
    report["finetune_pair"] = _compare(adapters[0].artifact.path, adapters[1].artifact.path)
    report["finetune_pair"]["response_ppl"] = [a.response_ppl_finetuned for a in adapters]
    report["finetune_pair"]["train_loss_last"] = [a.train_loss[-1] for a in adapters]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
