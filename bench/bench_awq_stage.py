"""The quantize stage (awq) of two source trees side by side: time and held-out response perplexity, per device.

    python bench/bench_awq_stage.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tree before=OLD_TREE \
        --out bench/results/awq-stage-h200.json

``OLD_TREE`` holds another revision's ``oliveflow`` package and data (e.g. ``git archive <rev> oliveflow data |
tar -x -C OLD_TREE``); this tree runs as ``now``. Each tree runs ``oliveflow stage quantize --quantize awq`` in its own process, on the GPU and on the
CPU (``CUDA_VISIBLE_DEVICES=`` and ``--cpu-threads`` threads), with the stage's own calibration (the training
data's first examples, as a run takes them). Each output is then loaded as the finetune stage loads it (Olive's
``QuantLinear``) and scored on the held-out response perplexity with the model's chat template. Unlike
``bench_awq_sizing.py`` this is the whole stage, one calibration draw: the figure a default run gets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_stage(src: Path, model: str, out: Path, device: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "oliveflow.cli", "stage", "quantize", "--model", model, "--quantize", "awq",
           "--output", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{src} quantize on {device} failed:\n{proc.stderr[-3000:]}")
    result = json.loads((out / "oliveflow-result.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - started, 1), "stage_seconds": round(result["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model spec: folder, .gguf or embedded:...")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="another source tree to compare (repeatable), e.g. before=OLD_TREE")
    parser.add_argument("--devices", nargs="+", default=["cuda", "cpu"])
    parser.add_argument("--cpu-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from olive.model import HfModelHandler
    from transformers import AutoTokenizer

    from oliveflow.config import DataConfig, QuantizeConfig
    from oliveflow.olive_ext import dequantize_once
    from oliveflow.sft import encode_rows, held_out_loss
    from oliveflow.stages.data import read_examples, resolve_template, validate_data
    from oliveflow.stages.model import resolve_model

    data_config = DataConfig()
    data = validate_data(data_config)
    base = resolve_model(args.model, QuantizeConfig())  # converted once here, then shared by both trees
    template = resolve_template(data_config, base.artifact.path)
    tokenizer = AutoTokenizer.from_pretrained(base.artifact.path)
    held_out, _ = encode_rows(tokenizer, template, read_examples(data.eval_path, data.fields), 256)
    pad = tokenizer.pad_token_id or 0
    gpu = "cuda" if torch.cuda.is_available() else "cpu"

    report: dict = {"model": args.model, "gpu": torch.cuda.get_device_name() if gpu == "cuda" else None,
                    "cpu_threads": args.cpu_threads, "runs": []}
    devices = [d for d in args.devices if d == "cpu" or gpu == "cuda"]
    trees = [(name, Path(folder).resolve()) for name, folder in (t.split("=", 1) for t in args.tree)]
    with tempfile.TemporaryDirectory(prefix="awq-stage-") as tmp:
        for device in devices:
            for name, src in [*trees, ("now", REPO)]:
                out = Path(tmp) / f"{name}-{device}"
                run = {"tree": name, "device": device, **run_stage(src, str(base.artifact.path), out, device,
                                                                    args.cpu_threads)}
                model = dequantize_once(HfModelHandler(model_path=str(out / "model")).load_model().to(gpu))
                run["response_ppl"] = round(math.exp(held_out_loss(model, held_out, pad).response_loss), 3)
                del model
                report["runs"].append(run)
                print(json.dumps(run), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
