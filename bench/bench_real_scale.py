"""The lab at real scale: a random-weight model of Phi-3.5-mini's shape through every stage, measured.

    python bench/bench_real_scale.py --out bench/results/real-scale-h100.json            # on the GPU machine
    python bench/bench_real_scale.py --small --out /tmp/small.json                         # same code, tiny shape

The model is built on the machine itself (no download): Phi3ForCausalLM with hidden 3072, 32 layers,
32 heads, intermediate 8192, vocab 32064 (context 4096, so the short-RoPE variant), random bf16 weights.
Stages are the pipeline's own functions, called directly (no Prefect). For each stage: wall seconds,
peak GPU memory (torch), peak host RSS of this process (sampled every 50 ms) and bytes on disk of
everything the chain has written so far. Quality numbers on random weights mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
PHI35 = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
             original_max_position_embeddings=4096)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, original_max_position_embeddings=512)


class PeakRss:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRss:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def disk_bytes(*roots: Path) -> int:
    return sum(p.stat().st_size for root in roots if root.exists() for p in root.rglob("*") if p.is_file())


def build_model(shape: dict, folder: Path, pad_is_bos: bool = False) -> None:
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from oliveflow.tiny_model import TinyModelParams, build_tiny_model

    tokenizer_src = build_tiny_model([REPO / "data" / "travel_train.jsonl"], folder.parent / "tokenizer-src",
                                     params=TinyModelParams(steps=1, num_threads=4))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_src)
    # A pad token of its own: with pad = bos, transformers zeroes the bos embedding row of random weights
    # (padding_idx), and RMSNorm's gradient at a zero input is 1/sqrt(eps), which blew the fine-tune up.
    if not pad_is_bos:  # --pad-is-bos rebuilds the old bench, to show the cause
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        assert tokenizer.pad_token_id != tokenizer.bos_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Phi3Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(folder.parent / "tokenizer-src")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def raw_olive_finetune(base_dir: Path, train: Path, template: str, steps: int, out: Path,
                       special_tokens: bool = False) -> dict:
    """``olive finetune --method lora`` with its defaults on the same base and data; its per-step losses."""
    cmd = ["olive", "finetune", "--method", "lora", "-m", str(base_dir), "-o", str(out), "--data_name", "json",
           "--data_files", str(train), "--text_template", template, "--max_steps", str(steps),
           "--max_seq_len", "1024", "--torch_dtype", "bfloat16", "--disable_telemetry", "--logging_steps", "1"]
    if special_tokens:  # argparse type=bool: any non-empty value is True, so the flag is only passed to set it
        cmd += ["--add_special_tokens", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"})
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.eE+-]+|nan)'?", proc.stdout + proc.stderr)]
    shutil.rmtree(out, ignore_errors=True)
    return {"returncode": proc.returncode, "steps_logged": len(losses), "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "mean_first_10": sum(losses[:10]) / max(len(losses[:10]), 1),
            "mean_last_10": sum(losses[-10:]) / max(len(losses[-10:]), 1),
            "all_finite": bool(losses) and all(map(math.isfinite, losses)),
            "tail": (proc.stdout + proc.stderr)[-400:] if proc.returncode or not losses else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shape, for checking the script on a CPU")
    parser.add_argument("--quantize", default="awq", help="quantize.algorithm")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--raw-olive", action="store_true", help="also run `olive finetune` on the same base and data")
    parser.add_argument("--raw-olive-special-tokens", action="store_true",
                        help="raw olive with --add_special_tokens (each packed stream starts with bos)")
    parser.add_argument("--pad-is-bos", action="store_true", help="the old bench's tokenizer: pad = bos")
    parser.add_argument("--only-finetune", action="store_true", help="stop after the fine-tunes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from oliveflow.config import DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig, SmokeTestConfig
    from oliveflow.errors import StageError
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.export import export_onnx
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize
    from oliveflow.stages.smoke_test import smoke_test

    work = args.workdir or Path(tempfile.mkdtemp(prefix="oliveflow-real-scale-"))
    os.environ.setdefault("OLIVEFLOW_HOME", str(work / "home"))
    base_dir, stage_root = work / "base", work / "stages"
    data_config = DataConfig()
    data = validate_data(data_config)
    qconfig = QuantizeConfig(algorithm=args.quantize, group_size=args.group_size)
    # The lab's LoRA shape (r 64, alpha 16) at the learning rate LORA_DEFAULTS picks for a model this size.
    fconfig = FinetuneConfig(r=64, alpha=16, batch_size=8, max_seq_len=1024, max_steps=args.max_steps,
                             gradient_checkpointing=args.gradient_checkpointing)
    results: dict = {"stages": {}}
    products: dict = {}

    def measure(name: str, fn):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with PeakRss() as rss:
            value = fn()
        results["stages"][name] = {
            "seconds": round(time.perf_counter() - started, 1),
            "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "peak_host_rss_gb": round(rss.peak / 2**30, 2),
            "disk_gb_after": round(disk_bytes(base_dir, stage_root, work / "home") / 2**30, 2),
        }
        print(name, json.dumps(results["stages"][name]), flush=True)
        return value

    def fresh(name: str) -> Path:
        path = stage_root / name
        path.mkdir(parents=True)
        return path

    measure("build_base", lambda: build_model(SMALL if args.small else PHI35, base_dir, args.pad_is_bos))
    base = resolve_model(str(base_dir), qconfig)
    products["quantized"] = measure("quantize", lambda: quantize(base, qconfig, fresh("quantize"), data=data))
    template = resolve_template(data_config, base_dir)
    products["adapter"] = measure("finetune", lambda: finetune(base, products["quantized"], data,
                                                               template, fconfig, fresh("finetune")))
    loss = products["adapter"].train_loss
    results["finetune_loss"] = {"first": loss[0], "last": loss[-1], "mean_first_10": sum(loss[:10]) / 10,
                                "mean_last_10": sum(loss[-10:]) / 10, "all_finite": all(map(math.isfinite, loss)),
                                "steps": len(loss), "learning_rate": fconfig.for_model(base.parameters).learning_rate}
    if args.raw_olive:
        results["raw_olive_finetune"] = measure("raw_olive_finetune", lambda: raw_olive_finetune(
            base_dir, data.train_path, template, args.max_steps, work / "raw-olive", args.raw_olive_special_tokens))
    if args.only_finetune:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results, indent=1))
        return
    products["onnx"] = measure("export", lambda: export_onnx(products["quantized"], products["adapter"],
                                                             ExportConfig(), fresh("export")))
    try:  # random weights answer nonsense: the degenerate-output check may rightly refuse them
        smoke = measure("smoke_test", lambda: smoke_test(products["onnx"], base, data, template,
                                                         SmokeTestConfig(num_samples=3, max_new_tokens=48)))
    except StageError as exc:
        results["smoke_refused"] = str(exc)
        smoke = None
    gpu = (subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else None)
    results.update({
        "shape": SMALL if args.small else PHI35,
        "settings": {"quantize": qconfig.model_dump(), "finetune": fconfig.model_dump(), "export": "cpu int4"},
        "machine": {"gpu": gpu, "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
                    "python": platform.python_version(), "torch": torch.__version__},
        "sizes_gb": {"base_weights": round(base.artifact.size_bytes / 1e9, 3),
                     "quantized_weights": round(products["quantized"].size_after_bytes / 1e9, 3),
                     "onnx_model": round(disk_bytes(products["onnx"].model_dir) / 1e9, 3),
                     "onnx_adapter_mb": round(products["onnx"].adapter_file.stat().st_size / 1e6, 1),
                     "peft_adapter_mb": round(disk_bytes(products["adapter"].adapter_dir) / 1e6, 1)},
        "size_reduction": round(smoke.size_reduction, 2) if smoke else None,
        "train_steps_logged": len(products["adapter"].train_loss),
        "smoke": {"passed": smoke.passed, "load_seconds": round(smoke.load_seconds, 2),
                  "ttft_seconds": round(smoke.ttft_seconds, 3),
                  "decode_tokens_per_second": round(smoke.decode_tokens_per_second, 1),
                  "decode_tokens_per_second_no_adapter": round(smoke.decode_tokens_per_second_base, 1)} if smoke else None,
        "disk_gb_whole_chain": round(disk_bytes(base_dir, stage_root, work / "home") / 2**30, 2),
        "total_seconds_stages": round(sum(s["seconds"] for s in results["stages"].values()), 1),
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
