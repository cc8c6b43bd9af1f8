"""The lab at real scale: a random-weight Phi-3.5-mini-shaped model through every stage, beside raw Olive 0.13.

On the GPU machine (one H200), one run, detached so that a dropped session does not kill it:

    setsid nohup python bench/bench_real_scale.py --gpu-site /tmp/gpusite --out-dir $OUT > $OUT/run.log 2>&1 &
    # poll: ls $OUT; tail $OUT/run.log       render afterwards (also printed at the end of the run):
    python bench/bench_real_scale.py --table $OUT/real-scale-h200.json [--write-readme]

On a CPU, the same code at a tiny shape (a few minutes on 2 cores):

    python bench/bench_real_scale.py --small --max-steps 3 --tag small-cpu --out-dir /tmp/rs --workdir /tmp/rs-work

``--gpu-site PATH`` is a folder holding onnxruntime-gpu and onnxruntime-genai-cuda (``pip install --target``):
they replace the CPU onnxruntime / onnxruntime_genai modules, so the GPU build's generation runs in a child
process of this script (``--generation-only --job JOB --out X.json``) with PYTHONPATH prefixed by that folder.
Without it, or without CUDA, the gpu generation part records ``{"skipped": why}``.

The model is built on the machine itself (no download): Phi3ForCausalLM with hidden 3072, 32 layers, 32 heads,
intermediate 8192, vocab 32064 (context 4096, so the short-RoPE variant), random bf16 weights. The training file
is written into the work folder: 64 examples whose responses (consecutive answers of data/travel_train.jsonl
joined) reach ``--max-seq-len`` tokens, so every step is batch 8 x max_seq_len (default 8 x 1024).

Parts, in order, each measured and each written as soon as it ends to ``<out-dir>/real-scale-<part>-<tag>.json``
(and the whole run to ``<out-dir>/real-scale-<tag>.json``), so a run killed midway still leaves its results:

  build_base, data, quantize (our stage), finetune-24gb (FinetuneConfig.gpu_memory_gb=24: planned and capped),
  finetune-whole-card, export-cpu, export-gpu (both from the whole-card adapter), generation-cpu (in-process),
  generation-gpu (child process), raw-olive-quantize (olive quantize rtn int4), raw-olive-finetune (olive
  finetune --method lora), raw-olive-export (olive auto-opt --use_model_builder int4 with the raw adapter).

A part that fails records ``{"error": one line, "tail": traceback or output tail}`` and the run goes on; a part
whose input failed records ``{"skipped": why}``. In-process parts: wall seconds, torch's peak GPU memory
allocated and reserved, the GPU memory nvidia-smi sees in use above the reading before the part, peak host RSS
of this process (sampled every 50 ms), disk used by the chain. Subprocesses: wall seconds, peak RSS of the child
process tree and nvidia-smi's GPU memory above the reading before the start (both sampled every 100 ms), return
code, output tail on failure. Generation: load seconds, time to first token (prompt + first token), decode
tokens/s over a fixed number of new tokens (EOS held back with min_length), with and without the adapter, over
3 held-out prompts after one warm-up each. Quality numbers on random weights mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PHI35 = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
             original_max_position_embeddings=4096)
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, original_max_position_embeddings=512)
PARTS = ("build_base", "data", "quantize", "finetune-24gb", "finetune-whole-card", "export-cpu", "export-gpu",
         "generation-cpu", "generation-gpu", "raw-olive-quantize", "raw-olive-finetune", "raw-olive-export")
ADAPTER_NAME = "finetuned"
README = REPO / "bench" / "results" / "README.md"
BEGIN, END = "<!-- bench_real_scale:begin -->", "<!-- bench_real_scale:end -->"
HEADING = "## Real scale on one H200 (random-weight Phi-3.5-mini shape)"
GB = 2**30


class Skip(Exception):
    """A part that cannot run (its input failed, or the machine lacks what it needs)."""


def _gb(value: float | int | None, digits: int = 2) -> float | None:
    return None if value is None else round(value / GB, digits)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _jsonable(value):
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


# ---------------------------------------------------------------------------------------------- measuring


class PeakRss:
    """Peak resident memory of one process, or of a process and all its descendants (``tree``)."""

    def __init__(self, pid: int | None = None, tree: bool = False, interval: float = 0.05) -> None:
        self.peak = 0
        self.tree, self.interval = tree, interval
        self._stop = threading.Event()
        self._proc = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        procs = [self._proc] + (self._proc.children(recursive=True) if self.tree else [])
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._sample())
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        try:
            self.peak = self._sample()
        except psutil.Error:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def nvidia_smi_used_mib() -> list[int] | None:
    """memory.used of every GPU, in MiB; None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return [int(float(x)) for x in out.split()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class GpuUsed:
    """Peak GPU memory in use (all GPUs summed, nvidia-smi every 100 ms) above the reading taken at the start."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.baseline = nvidia_smi_used_mib()
        self.peak = sum(self.baseline) if self.baseline else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = nvidia_smi_used_mib()
            if used:
                self.peak = max(self.peak or 0, sum(used))
            time.sleep(self.interval)

    def __enter__(self) -> GpuUsed:
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> dict:
        if self.baseline is None:
            return {"peak_gpu_used_gb": None}
        return {"peak_gpu_used_gb": round((self.peak - sum(self.baseline)) / 1024, 2),
                "gpu_used_before_gb": round(sum(self.baseline) / 1024, 2)}


def disk_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        if root.is_file():
            total += root.stat().st_size
        elif root.exists():
            total += sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return total


def run_measured(cmd: list[str], log: Path, *, env: dict | None = None, cwd: Path | None = None,
                 timeout: float | None = None) -> dict:
    """Run ``cmd`` (output to ``log``): seconds, peak RSS of its process tree, GPU memory it added, return code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timed_out = False
    with open(log, "w") as out, GpuUsed() as gpu:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        with PeakRss(proc.pid, tree=True, interval=0.1) as rss:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (start_new_session)
                proc.wait()
    output = log.read_text(errors="replace")
    result = {"cmd": " ".join(cmd), "returncode": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
              "peak_host_rss_gb": _gb(rss.peak), **gpu.result()}
    if timed_out:
        result["timed_out_after_s"] = timeout
    if proc.returncode or timed_out:
        result["tail"] = output[-2000:]
    result["_output"] = output  # for the caller; dropped before writing
    return result


# ------------------------------------------------------------------------------------------- the parts


def build_model(shape: dict, folder: Path, pad_is_bos: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from oliveflow.tiny_model import TinyModelParams, build_tiny_model

    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.parent / "tokenizer-src", ignore_errors=True)
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


def write_long_train(source: Path, target: Path, tokenizer, template: str, max_seq_len: int,
                     examples: int = 64) -> dict:
    """``examples`` rows whose response (consecutive answers of ``source`` joined with spaces, the first row's
    prompt kept) makes the rendered example at least ``max_seq_len`` tokens."""
    from oliveflow.sft import render

    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = []
    with open(target, "w", encoding="utf-8") as out:
        for i in range(examples):
            start = (i * 5) % len(rows)
            answers: list[str] = []
            while True:
                answers.append(rows[(start + len(answers)) % len(rows)]["response"])
                row = {"prompt": rows[start]["prompt"], "response": " ".join(answers)}
                tokens = len(tokenizer(render(template, row))["input_ids"])
                if tokens >= max_seq_len or len(answers) >= 4 * len(rows):
                    break
            lengths.append(tokens)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"examples": examples, "tokens_min": min(lengths), "tokens_max": max(lengths),
            "tokens_mean": round(sum(lengths) / len(lengths), 1), "max_seq_len": max_seq_len}


def loss_summary(losses: list[float]) -> dict:
    return {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
            "mean_first_10": sum(losses[:10]) / len(losses[:10]) if losses else None,
            "mean_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "all_finite": bool(losses) and all(map(math.isfinite, losses)), "steps": len(losses)}


def held_out_prompts(template: str, count: int = 3, eval_path: Path | None = None) -> list[str]:
    from oliveflow.config import template_fields
    from oliveflow.stages.data import prompt_and_reference, read_examples

    rows = read_examples(eval_path or REPO / "data" / "travel_eval.jsonl", template_fields(template))
    return [prompt_and_reference(template, row)[0] for row in rows[:count]]


def measure_generation(model_dir: Path, adapter_file: Path, prompts: list[str], new_tokens: int = 64) -> dict:
    """Load seconds, TTFT and decode tokens/s of an onnxruntime-genai folder, with the adapter and without it.

    The same calls as smoke_test's ``_generate``; min_length holds EOS back so every run decodes ``new_tokens``.
    One warm-up generation (8 tokens) each way before the measured ones.
    """
    import onnxruntime_genai as og

    result: dict = {"og_version": getattr(og, "__version__", None), "new_tokens": new_tokens,
                    "prompts": len(prompts)}
    started = time.perf_counter()
    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(adapter_file), ADAPTER_NAME)
    result["load_seconds"] = round(time.perf_counter() - started, 3)
    notes: list[str] = []

    def one(prompt: str, active: bool, count: int) -> dict:
        ids = tokenizer.encode(prompt)
        params = og.GeneratorParams(model)
        total = len(ids) + count
        try:
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
        except Exception as exc:  # an onnxruntime-genai without min_length: EOS may end a run early
            if not notes:
                notes.append(f"min_length refused ({_one_line(exc)}); runs may stop at EOS")
            params.set_search_options(max_length=total, do_sample=False)
        generator = og.Generator(model, params)
        if active:
            generator.set_active_adapter(adapters, ADAPTER_NAME)
        tick = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        generator.get_next_tokens()
        ttft = time.perf_counter() - tick
        tick, produced = time.perf_counter(), 1
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
            produced += 1
        decode = time.perf_counter() - tick
        del generator
        return {"prompt_tokens": len(ids), "ttft_s": ttft, "decode_s": decode, "tokens": produced}

    for label, active in (("adapter", True), ("no_adapter", False)):
        warm = time.perf_counter()
        one(prompts[0], active, 8)
        runs = [one(prompt, active, new_tokens) for prompt in prompts]
        decoded = sum(r["tokens"] - 1 for r in runs)
        seconds = sum(r["decode_s"] for r in runs)
        result[label] = {
            "warmup_seconds": round(time.perf_counter() - warm - sum(r["ttft_s"] + r["decode_s"] for r in runs), 3),
            "ttft_s": round(sum(r["ttft_s"] for r in runs) / len(runs), 4),
            "decode_tokens_per_s": round(decoded / seconds, 1) if seconds > 0 else None,
            "tokens_per_run": [r["tokens"] for r in runs],
            "prompt_tokens": [r["prompt_tokens"] for r in runs]}
    if notes:
        result["note"] = notes[0]
    return result


def smoke_summary(report) -> dict:
    return {"passed": report.answered, "load_seconds": round(report.load_seconds, 3),
            "ttft_seconds": round(report.ttft_seconds, 4), "ttft_seconds_base": round(report.ttft_seconds_base, 4),
            "decode_tokens_per_second": round(report.decode_tokens_per_second, 1),
            "decode_tokens_per_second_base": round(report.decode_tokens_per_second_base, 1),
            "size_reduction": round(report.size_reduction, 2)}


def run_smoke(onnx, base, data, template: str) -> dict:
    from oliveflow.config import SmokeTestConfig
    from oliveflow.errors import StageError
    from oliveflow.stages.smoke_test import smoke_test

    started = time.perf_counter()
    try:
        report = smoke_test(onnx, base, data, template, SmokeTestConfig(num_samples=3, max_new_tokens=48))
    except StageError as exc:  # random weights answer nonsense: the degenerate-output check rightly refuses
        return {"refused": str(exc), "seconds": round(time.perf_counter() - started, 1)}
    return {**smoke_summary(report), "seconds": round(time.perf_counter() - started, 1)}


def generation_child(args) -> None:
    """``--generation-only``: smoke_test + measure_generation for one exported folder; JSON to ``--out``."""
    result: dict = {"pid": os.getpid()}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    job = json.loads(args.job.read_text()) if args.job else {}
    try:
        import onnxruntime_genai as og

        result["og_version"] = getattr(og, "__version__", None)
        result["og_file"] = og.__file__
        try:
            result["og_cuda_available"] = bool(og.is_cuda_available())
        except Exception as exc:
            result["og_cuda_available"] = _one_line(exc)
        try:
            import onnxruntime as ort

            result["ort_version"], result["ort_providers"] = ort.__version__, ort.get_available_providers()
        except Exception as exc:
            result["ort_version"] = _one_line(exc)
    except Exception as exc:
        result["error"], result["tail"] = _one_line(exc), traceback.format_exc()[-2000:]
        save()
        raise SystemExit(1)
    save()
    model_dir = args.model_dir or Path(job["model_dir"])
    adapter = args.adapter or Path(job["adapter"])
    prompts = job.get("prompts") or held_out_prompts(job.get("template") or _default_template(model_dir))
    for attempt in (1, 2):
        if job.get("onnx"):
            from oliveflow.results import BaseModelRef, DataReport, OnnxModel

            try:
                onnx, base = OnnxModel.model_validate(job["onnx"]), BaseModelRef.model_validate(job["base"])
                result["smoke"] = run_smoke(onnx, base, DataReport.model_validate(job["data"]), job["template"])
            except Exception as exc:
                result["smoke"] = {"error": _one_line(exc), "tail": traceback.format_exc()[-2000:]}
            save()
        try:
            result["generation"] = measure_generation(model_dir, adapter, prompts,
                                                      job.get("new_tokens", args.new_tokens))
        except Exception as exc:
            result["generation"] = {"error": _one_line(exc), "tail": traceback.format_exc()[-2000:]}
        save()
        # CUDA libraries not found (cuDNN, cuBLAS): onnxruntime can preload those of the nvidia-* wheels; once.
        failed = "error" in result["generation"] and "Failed to load" in result["generation"]["error"]
        if attempt == 2 or not failed:
            break
        result["first_attempt"] = {"smoke": result.pop("smoke", None), "generation": result.pop("generation")}
        try:
            import onnxruntime as ort

            ort.preload_dlls()
            result["preload_dlls"] = "retried after onnxruntime.preload_dlls()"
        except Exception as exc:
            result["preload_dlls"] = f"failed: {_one_line(exc)}"
            result.update(result.pop("first_attempt"))
            save()
            break
    if "error" in result.get("generation", {}):
        result["error"] = f"generation: {result['generation']['error']}"
    save()


def _default_template(model_dir: Path) -> str:
    from oliveflow.config import DataConfig
    from oliveflow.stages.data import resolve_template

    return resolve_template(DataConfig(), model_dir)


def olive_exe() -> str:
    local = Path(sys.executable).parent / "olive"
    return str(local) if local.exists() else (shutil.which("olive") or "olive")


def raw_losses(output: str) -> dict:
    losses = [float(x) for x in re.findall(r"'loss': '?([0-9.eE+-]+|nan)'?", output)]
    return {"steps_logged": len(losses), **loss_summary(losses)}


def find_adapter(root: Path) -> Path | None:
    """The folder under ``root`` holding a PEFT adapter (adapter_config.json)."""
    found = sorted(root.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    return found[0].parent if found else None


def find_hf_model(root: Path) -> Path | None:
    found = sorted((p.parent for p in root.rglob("config.json") if any(p.parent.glob("*.safetensors"))),
                   key=lambda p: len(p.parts))
    return found[0] if found else None


# ------------------------------------------------------------------------------------------- the run


class Bench:
    def __init__(self, args, work: Path, settings: dict, machine: dict) -> None:
        self.args, self.work = args, work
        self.out_dir, self.tag = args.out_dir, args.tag
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"tag": args.tag, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "finished": False, "workdir": str(work), "machine": machine, "settings": settings,
                              "parts": {}}
        self.save()

    def save(self, part: str | None = None) -> None:
        self.results["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if part is not None:
            path = self.out_dir / f"real-scale-{part}-{self.tag}.json"
            path.write_text(json.dumps({"part": part, "tag": self.tag, **self.results["parts"][part]}, indent=1)
                            + "\n")
        (self.out_dir / f"real-scale-{self.tag}.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def disk(self) -> float | None:
        return _gb(disk_bytes(self.work / "base", self.work / "stages", self.work / "home"))

    def part(self, name: str, fn, child: bool = False):
        """Run ``fn`` (returns ``(product, details)``), measured; record and write; the product or None.

        ``child``: the work is a subprocess whose own numbers are in ``details``; this process's go under
        ``this_process``.
        """
        torch = _torch()
        cuda = torch is not None and torch.cuda.is_available()
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        product, record = None, {}
        try:
            with PeakRss() as rss, GpuUsed() as gpu:
                product, details = fn()
            here = {"peak_gpu_allocated_gb": _gb(torch.cuda.max_memory_allocated()) if cuda else None,
                    "peak_gpu_reserved_gb": _gb(torch.cuda.max_memory_reserved()) if cuda else None,
                    **gpu.result(), "peak_host_rss_gb": _gb(rss.peak)}
            record = {"ok": True, "seconds": round(time.perf_counter() - started, 1),
                      **({"this_process": here} if child else here), "disk_gb_after": self.disk(),
                      **(details or {})}
            if "error" in record:  # a subprocess that failed: its numbers kept beside the error
                record["ok"] = False
        except Skip as exc:
            record = {"skipped": str(exc)}
        except Exception as exc:
            record = {"error": _one_line(exc), "tail": traceback.format_exc()[-2000:],
                      "seconds": round(time.perf_counter() - started, 1)}
        finally:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
        self.results["parts"][name] = _jsonable(record)
        self.save(name)
        shown = {k: v for k, v in record.items() if k != "tail"}
        print(f"   {name}: {json.dumps(_jsonable(shown))[:1500]}", flush=True)
        if "tail" in record:
            print(record["tail"], flush=True)
        return product


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def machine_info() -> dict:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    gpu = None
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() or None
    torch = _torch()
    return {"gpu": gpu, "cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / GB),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": getattr(torch, "__version__", None),
            "torch_cuda": getattr(getattr(torch, "version", None), "cuda", None),
            "cuda_available": bool(torch and torch.cuda.is_available()),
            "onnxruntime_genai": version("onnxruntime-genai"), "onnxruntime": version("onnxruntime"),
            "olive_ai": version("olive-ai"), "transformers": version("transformers"), "peft": version("peft"),
            "disk_free_gb": round(shutil.disk_usage(REPO).free / GB, 1)}


def run_bench(args) -> None:
    from oliveflow.config import DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="oliveflow-real-scale-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OLIVEFLOW_HOME", str(work / "home"))
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
    base_dir, stage_root = work / "base", work / "stages"
    shape = SMALL if args.small else PHI35
    max_seq_len = args.max_seq_len or (128 if args.small else 1024)
    group_size = args.group_size or (32 if args.small else 128)
    qconfig = QuantizeConfig(algorithm=args.quantize, group_size=group_size)
    fkwargs = dict(r=64, alpha=16, batch_size=8, max_seq_len=max_seq_len, max_steps=args.max_steps)
    if args.gradient_checkpointing:
        fkwargs["gradient_checkpointing"] = True
    has_budget = "gpu_memory_gb" in FinetuneConfig.model_fields
    torch = _torch()
    cuda = bool(torch and torch.cuda.is_available())
    settings = {"shape": shape, "small": args.small, "max_seq_len": max_seq_len, "batch_size": 8,
                "max_steps": args.max_steps, "quantize": qconfig.model_dump(), "finetune": fkwargs,
                "finetune_24gb_gpu_memory_gb": args.budget_gb if has_budget else None,
                "finetune_config_has_gpu_memory_gb": has_budget, "new_tokens": args.new_tokens,
                "gpu_site": str(args.gpu_site) if args.gpu_site else None, "raw_olive": args.raw_olive}
    bench = Bench(args, work, settings, machine_info())
    products: dict = {}

    def fresh(name: str) -> Path:
        path = stage_root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def need(key: str, what: str):
        if products.get(key) is None:
            raise Skip(f"needs {what}, which did not complete")
        return products[key]

    # 1. the base
    def build():
        if args.reuse_base and (base_dir / "config.json").is_file():
            return base_dir, {"reused": True}
        build_model(shape, base_dir, args.pad_is_bos)
        return base_dir, {"base_gb": _gb(disk_bytes(base_dir), 3)}

    products["base_dir"] = bench.part("build_base", build)

    # 2. long training data, same file for both tools
    def make_data():
        from transformers import AutoTokenizer

        from oliveflow.stages.data import resolve_template, validate_data
        from oliveflow.stages.model import resolve_model

        need("base_dir", "build_base")
        base = resolve_model(str(base_dir), qconfig)
        template = resolve_template(DataConfig(), base_dir)
        train = work / "train-long.jsonl"
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        made = write_long_train(REPO / "data" / "travel_train.jsonl", train, tokenizer, template, max_seq_len)
        data_config = DataConfig(train_path=str(train), eval_path=str(REPO / "data" / "travel_eval.jsonl"))
        data = validate_data(data_config)
        products.update(base=base, template=template, data=data, train=train)
        return data, {"train_file": str(train), "template": template, **made, "rows": data.rows,
                      "eval_rows": data.eval_rows, "base_parameters": base.parameters,
                      "base_gb": _gb(base.artifact.size_bytes, 3)}

    bench.part("data", make_data)

    # 3. quantize
    def do_quantize():
        from oliveflow.stages.quantize import quantize

        base, data = need("base", "data"), need("data", "data")
        q = quantize(base, qconfig, fresh("quantize"), data=data)
        return q, {"algorithm": q.algorithm, "group_size": q.group_size, "stage_seconds": round(q.seconds, 1),
                   "size_before_gb": _gb(q.size_before_bytes, 3), "size_after_gb": _gb(q.size_after_bytes, 3)}

    products["quantized"] = bench.part("quantize", do_quantize)

    # 4. the fine-tune, planned for 24 GB, then on the whole card
    def do_finetune(name: str, budget_gb: float | None, micro: int | None = None):
        def run():
            from oliveflow.stages.finetune import finetune

            base, data, quantized = need("base", "data"), need("data", "data"), need("quantized", "quantize")
            kwargs, note = dict(fkwargs), None
            if micro:
                kwargs["micro_batch_size"] = micro
            if budget_gb is not None:
                if has_budget:
                    kwargs["gpu_memory_gb"] = budget_gb
                else:
                    note = "FinetuneConfig has no gpu_memory_gb field yet: ran without a budget"
            config = FinetuneConfig(**kwargs)
            try:
                adapter = finetune(base, quantized, data, products["template"], config, fresh(name))
            finally:
                if cuda:  # the budget caps this process's CUDA memory: lift it for what follows
                    torch.cuda.set_per_process_memory_fraction(1.0)
            details = {"config": config.model_dump(), "learning_rate": config.for_model(base.parameters).learning_rate,
                       "plan": getattr(adapter, "plan", None), "loss": loss_summary(adapter.train_loss),
                       "train_examples": adapter.train_examples, "truncated_examples": adapter.truncated_examples,
                       "eval_loss_original": adapter.eval_loss_original,
                       "eval_loss_quantized": adapter.eval_loss_quantized,
                       "eval_loss_finetuned": adapter.eval_loss_finetuned,
                       "stage_seconds": round(adapter.seconds, 1),
                       "adapter_mb": round(disk_bytes(adapter.adapter_dir) / 1e6, 1),
                       "cuda_device": torch.cuda.get_device_name(0) if cuda else None}
            if note:
                details["note"] = note
            reference = products.get("adapter-24gb")
            if micro and reference is not None:  # the same effective batch, accumulated: the same loss curve?
                diffs = [abs(a - b) for a, b in zip(adapter.train_loss, reference.train_loss)]
                details["loss_vs_finetune_24gb"] = {
                    "steps": len(diffs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                    "max_rel_diff": max(d / abs(b) for d, b in zip(diffs, reference.train_loss)),
                    "losses": [round(x, 4) for x in adapter.train_loss],
                    "reference_losses": [round(x, 4) for x in reference.train_loss]}
            return adapter, details
        return run

    products["adapter-24gb"] = bench.part("finetune-24gb", do_finetune("finetune-24gb", args.budget_gb))
    if args.micro_batch:
        bench.part(f"finetune-24gb-micro{args.micro_batch}",
                   do_finetune(f"finetune-24gb-micro{args.micro_batch}", args.budget_gb, args.micro_batch))
    products["adapter"] = bench.part("finetune-whole-card", do_finetune("finetune-whole-card", None))

    # 5. export, cpu and gpu, from the whole-card adapter (the 24 GB one if that failed)
    def do_export(device: str):
        def run():
            from oliveflow.stages.export import export

            quantized = need("quantized", "quantize")
            adapter, source = products.get("adapter"), "finetune-whole-card"
            if adapter is None:
                adapter, source = need("adapter-24gb", "a finetune"), "finetune-24gb"
            onnx = export(quantized, adapter, ExportConfig(device=device), fresh(f"export-{device}"))
            return onnx, {"adapter_from": source, "stage_seconds": round(onnx.seconds, 1),
                          "model_folder_gb": _gb(disk_bytes(onnx.model_dir), 3),
                          "adapter_file_mb": round(onnx.adapter_file.stat().st_size / 1e6, 2)}
        return run

    products["onnx-cpu"] = bench.part("export-cpu", do_export("cpu"))
    products["onnx-gpu"] = bench.part("export-gpu", do_export("gpu"))

    # 6. generation: the cpu build in-process, the gpu build in a child with the CUDA packages first on the path
    def gen_cpu():
        onnx = need("onnx-cpu", "export-cpu")
        prompts = held_out_prompts(products["template"])
        details: dict = {"device": "cpu", "model_folder_gb": _gb(disk_bytes(onnx.model_dir), 3)}
        try:
            details["smoke"] = run_smoke(onnx, products["base"], products["data"], products["template"])
        except Exception as exc:
            details["smoke"] = {"error": _one_line(exc), "tail": traceback.format_exc()[-2000:]}
        try:
            details["generation"] = measure_generation(onnx.model_dir, onnx.adapter_file, prompts, args.new_tokens)
        except Exception as exc:  # the smoke result above is kept
            details["generation"] = {"error": _one_line(exc), "tail": traceback.format_exc()[-2000:]}
            details["error"] = f"generation: {_one_line(exc)}"
        return None, details

    def gen_gpu():
        if not args.gpu_site:
            raise Skip("no --gpu-site given (onnxruntime-gpu + onnxruntime-genai-cuda)")
        if not (cuda or nvidia_smi_used_mib()):
            raise Skip("no CUDA device here")
        onnx = need("onnx-gpu", "export-gpu")
        job = {"onnx": onnx.model_dump(mode="json"), "base": products["base"].model_dump(mode="json"),
               "data": products["data"].model_dump(mode="json"), "template": products["template"],
               "model_dir": str(onnx.model_dir), "adapter": str(onnx.adapter_file),
               "prompts": held_out_prompts(products["template"]), "new_tokens": args.new_tokens}
        job_file, child_out = work / "generation-gpu-job.json", work / "generation-gpu-child.json"
        job_file.write_text(json.dumps(job, indent=1))
        child_out.unlink(missing_ok=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # the reading before the child is then what this process still holds
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(args.gpu_site.resolve()), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                         else []))}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--generation-only", "--job", str(job_file),
               "--out", str(child_out)]
        proc = run_measured(cmd, work / "generation-gpu-child.log", env=env, timeout=args.child_timeout)
        proc.pop("_output")
        child = json.loads(child_out.read_text()) if child_out.is_file() else {}
        details = {"device": "gpu", "model_folder_gb": _gb(disk_bytes(onnx.model_dir), 3), **proc, **child}
        if (proc["returncode"] or "timed_out_after_s" in proc) and "error" not in details:
            last = [line for line in proc.get("tail", "").strip().splitlines() if line.strip()][-1:]
            details["error"] = f"generation child exited {proc['returncode']}: {last[0][:300] if last else ''}"
        return None, details

    bench.part("generation-cpu", gen_cpu)
    bench.part("generation-gpu", gen_gpu, child=True)

    # 7. raw Olive on the same base and data, each a subprocess in a scratch folder (Olive's cache lands there)
    raw = work / "raw-olive"
    olive = olive_exe()
    env = {**os.environ, "OLIVE_DISABLE_TELEMETRY": "1"}

    def raw_part(name: str, build_cmd, after):
        def run():
            if not args.raw_olive:
                raise Skip("--no-raw-olive")
            need("base_dir", "build_base")
            cmd, out = build_cmd()
            scratch = raw / f"{name}-cwd"
            shutil.rmtree(out, ignore_errors=True)
            scratch.mkdir(parents=True, exist_ok=True)
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
            result = run_measured(cmd, raw / f"{name}.log", env=env, cwd=scratch, timeout=args.raw_timeout)
            output = result.pop("_output")
            result["output_gb"] = _gb(disk_bytes(out), 3)
            result["scratch_gb"] = _gb(disk_bytes(scratch), 3)
            shutil.rmtree(scratch, ignore_errors=True)
            result.update(after(out, output) or {})
            if result["returncode"] or "timed_out_after_s" in result:  # kept with its numbers, not only the error
                last = [line for line in result.get("tail", "").strip().splitlines() if line.strip()][-1:]
                result["error"] = f"exited {result['returncode']}: {last[0][:300] if last else ''}"
            return out, result
        return run

    def quantize_cmd():
        out = raw / "quantize-out"
        return [olive, "quantize", "-m", str(base_dir), "--algorithm", "rtn", "--precision", "int4", "-o", str(out),
                "--disable_telemetry"], out

    def quantize_after(out: Path, output: str):
        size = _gb(disk_bytes(out), 3)
        shutil.rmtree(out, ignore_errors=True)
        return {"output_gb": size}

    def finetune_cmd():
        out = raw / "finetune-out"
        cmd = [olive, "finetune", "--method", "lora", "-m", str(base_dir), "-o", str(out), "--data_name", "json",
               "--data_files", str(need("train", "data")), "--text_template", products["template"],
               "--max_steps", str(args.max_steps), "--max_seq_len", str(max_seq_len), "--torch_dtype", "bfloat16",
               "--lora_r", "64", "--lora_alpha", "16", "--per_device_train_batch_size", "8",
               "--disable_telemetry", "--logging_steps", "1"]
        if args.raw_olive_special_tokens:  # argparse type=bool: any non-empty value is True
            cmd += ["--add_special_tokens", "1"]
        return cmd, out

    def finetune_after(out: Path, output: str):
        adapter, model = find_adapter(out), find_hf_model(out)
        products["raw-adapter"], products["raw-model"] = adapter, model
        return {"loss": raw_losses(output), "adapter_dir": str(adapter) if adapter else None,
                "model_dir": str(model) if model else None,
                "adapter_mb": round(disk_bytes(adapter) / 1e6, 1) if adapter else None,
                "layout": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_dir())[:20]}

    def export_cmd():
        adapter = products.get("raw-adapter")
        if adapter is None:
            raise Skip("needs raw-olive-finetune's adapter, which did not complete")
        model = products.get("raw-model") or base_dir  # the finetune's model, else the same base it trained on
        out = raw / "export-out"
        return [olive, "auto-opt", "-m", str(model), "--adapter_path", str(adapter), "--use_model_builder",
                "--precision", "int4", "--use_ort_genai", "--device", "cpu", "--provider", "CPUExecutionProvider",
                "-o", str(out), "--disable_telemetry"], out

    def export_after(out: Path, output: str):
        files = [p for p in out.rglob("*") if p.is_file()]
        result = {"output_gb": _gb(disk_bytes(out), 3),
                  "onnx_adapter_files": [p.name for p in files if p.suffix == ".onnx_adapter"],
                  "files": sorted(str(p.relative_to(out)) for p in files)[:30]}
        shutil.rmtree(out, ignore_errors=True)
        return result

    bench.part("raw-olive-quantize", raw_part("raw-olive-quantize", quantize_cmd, quantize_after), child=True)
    bench.part("raw-olive-finetune", raw_part("raw-olive-finetune", finetune_cmd, finetune_after), child=True)
    bench.part("raw-olive-export", raw_part("raw-olive-export", export_cmd, export_after), child=True)
    shutil.rmtree(raw / "finetune-out", ignore_errors=True)

    bench.results["disk_gb_whole_chain"] = bench.disk()
    bench.results["finished"] = True
    bench.save()
    print(render_table(bench.results), flush=True)


# ------------------------------------------------------------------------------------------- the table


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _status(record: dict) -> str | None:
    if not record:
        return "not run"
    if "skipped" in record:
        return f"skipped: {record['skipped'][:90]}"
    if "error" in record:
        return f"error: {record['error'][:120]}"
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(results: dict) -> str:
    parts = results.get("parts", {})
    settings, machine = results.get("settings", {}), results.get("machine", {})
    shape = settings.get("shape", {})
    lines = [f"`bench/bench_real_scale.py`, tag `{results.get('tag')}`, {results.get('started', '')[:10]}"
             f"{'' if results.get('finished') else ' (run did not finish)'}: {machine.get('gpu') or 'no GPU'}, "
             f"{machine.get('cpus')} CPUs, {machine.get('memory_gb')} GB; torch {machine.get('torch')}, "
             f"Olive {machine.get('olive_ai')}. Shape: {shape.get('num_hidden_layers')} layers, hidden "
             f"{shape.get('hidden_size')}, vocab {shape.get('vocab_size')}, random weights. Fine-tune: batch "
             f"{settings.get('batch_size')} x {settings.get('max_seq_len')} tokens, {settings.get('max_steps')} steps, "
             f"r 64, alpha 16.", ""]
    lines += ["| stage | tool | seconds | peak GPU (torch alloc / reserved; nvidia-smi) | peak host RSS | notes |",
              "| --- | --- | ---: | ---: | ---: | --- |"]

    def gpu(record: dict) -> str:
        torch_part = (f"{_fmt(record.get('peak_gpu_allocated_gb'), ' GB', 2)} / "
                      f"{_fmt(record.get('peak_gpu_reserved_gb'), ' GB', 2)}"
                      if record.get("peak_gpu_allocated_gb") is not None else "")
        smi = record.get("peak_gpu_used_gb")
        return "; ".join(x for x in (torch_part, _fmt(smi, " GB", 2) if smi is not None else "") if x)

    def loss(record: dict) -> str:
        summary = record.get("loss") or {}
        if summary.get("first") is None:
            return ""
        return (f"loss {summary['first']:.3f} -> {summary['last']:.3f} over {summary.get('steps')} steps"
                f"{'' if summary.get('all_finite') else ', NOT FINITE'}")

    def plan(record: dict) -> str:
        value = record.get("plan")
        if not value:
            return ""
        if isinstance(value, dict):
            keys = ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "float_base",
                    "budget_gb", "estimated_peak_gb", "memory_fraction")
            shown = {k: value[k] for k in keys if k in value} or value
            return "plan " + ", ".join(f"{k} {v}" for k, v in shown.items())
        return f"plan {value}"

    def row(stage: str, tool: str, name: str, notes) -> None:
        record = parts.get(name, {})
        status = _status(record)
        if status:
            lines.append(f"| {stage} | {tool} | {_fmt(record.get('seconds'))} | | | {_cell(status)} |")
            return
        rss = record.get("peak_host_rss_gb")
        text = "; ".join(x for x in notes(record) if x)
        lines.append(f"| {stage} | {tool} | {_fmt(record.get('seconds'))} | {gpu(record)} | {_fmt(rss, ' GB', 2)} | "
                     f"{_cell(text)} |")

    q = settings.get("quantize", {})
    row("build base", "torch", "build_base", lambda r: [f"{_fmt(r.get('base_gb'), ' GB', 2)} on disk"
                                                        if r.get("base_gb") else ("reused" if r.get("reused") else "")])
    row("quantize", "oliveflow", "quantize",
        lambda r: [f"{q.get('algorithm')} int{q.get('bits')} g{q.get('group_size')}",
                   f"{_fmt(r.get('size_after_gb'), ' GB', 2)} after"])
    row("quantize", "raw Olive", "raw-olive-quantize",
        lambda r: ["rtn int4", f"{_fmt(r.get('output_gb'), ' GB', 2)} out"])
    row("finetune, 24 GB setting", "oliveflow", "finetune-24gb", lambda r: [loss(r), plan(r), r.get("note")])
    row("finetune, whole card", "oliveflow", "finetune-whole-card", lambda r: [loss(r), plan(r)])
    row("finetune", "raw Olive", "raw-olive-finetune",
        lambda r: [loss(r), f"adapter {_fmt(r.get('adapter_mb'), ' MB')}" if r.get("adapter_mb") else ""])
    for device in ("cpu", "gpu"):
        row(f"export {device}", "oliveflow", f"export-{device}",
            lambda r: [f"model {_fmt(r.get('model_folder_gb'), ' GB', 2)}",
                       f"adapter {_fmt(r.get('adapter_file_mb'), ' MB', 1)}"])
    row("export cpu", "raw Olive", "raw-olive-export",
        lambda r: [f"auto-opt int4, {_fmt(r.get('output_gb'), ' GB', 2)} out",
                   f"{len(r.get('onnx_adapter_files') or [])} .onnx_adapter file(s)"])

    lines += ["", "Generation (onnxruntime-genai, greedy, "
              f"{settings.get('new_tokens')} new tokens per prompt, 3 held-out prompts after a warm-up):", "",
              "| build | onnxruntime-genai | smoke_test | load | TTFT adapter / none | decode tok/s adapter / none "
              "| peak GPU (nvidia-smi) | peak host RSS |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for device in ("cpu", "gpu"):
        record = parts.get(f"generation-{device}", {})
        status = _status(record)
        if status:
            lines.append(f"| {device} | | {_cell(status)} | | | | | |")
            continue
        gen = record.get("generation") or {}
        smoke = record.get("smoke") or {}
        smoke_text = ("passed" if smoke.get("passed") else "refused (random weights)" if "refused" in smoke
                      else f"error: {smoke.get('error', '')[:80]}" if "error" in smoke else "")
        if "error" in gen:
            og_text = gen.get("og_version") or record.get("og_version") or ""
            lines.append(f"| {device} | {og_text} | {_cell(smoke_text)} "
                         f"| | {_cell('error: ' + gen['error'][:100])} | | | |")
            continue
        with_a, without = gen.get("adapter") or {}, gen.get("no_adapter") or {}
        og_text = gen.get("og_version") or ""
        if device == "gpu":
            og_text += f" (CUDA {'yes' if record.get('og_cuda_available') is True else 'no'})"
        rss, smi = record.get("peak_host_rss_gb"), record.get("peak_gpu_used_gb")
        lines.append(f"| {device} | {og_text} | {_cell(smoke_text)} | {_fmt(gen.get('load_seconds'), ' s', 2)} | "
                     f"{_fmt(with_a.get('ttft_s'), ' s', 3)} / {_fmt(without.get('ttft_s'), ' s', 3)} | "
                     f"{_fmt(with_a.get('decode_tokens_per_s'))} / {_fmt(without.get('decode_tokens_per_s'))} | "
                     f"{_fmt(smi, ' GB', 2)} | {_fmt(rss, ' GB', 2)} |")
    return "\n".join(lines) + "\n"


def write_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text(encoding="utf-8")
    block = f"{BEGIN}\n\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        anchor = "<!-- bench_pipeline:end -->"
        section = f"\n\n{HEADING}\n\n{block}"
        if anchor in text:
            head, rest = text.split(anchor, 1)
            text = head + anchor + section + rest
        else:
            head, _, rest = text.partition("\n")
            text = head + "\n" + section + rest
    readme.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shape, for checking the script on a CPU")
    parser.add_argument("--quantize", default="awq", help="quantize.algorithm (our stage)")
    parser.add_argument("--group-size", type=int, default=None, help="quantize.group_size (default 128; small: 32)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--max-seq-len", type=int, default=None, help="tokens per example (default 1024; small: 128)")
    parser.add_argument("--budget-gb", type=float, default=24.0, help="finetune-24gb's FinetuneConfig.gpu_memory_gb")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="also fine-tune told --budget-gb with this micro-batch size (accumulating to the same "
                             "batch) and compare its loss curve with finetune-24gb's")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt in generation")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="force it on in both fine-tunes")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--reuse-base", action="store_true", help="keep <workdir>/base when it is there")
    parser.add_argument("--gpu-site", type=Path, default=None,
                        help="folder with onnxruntime-gpu + onnxruntime-genai-cuda, for the gpu generation child")
    parser.add_argument("--raw-olive", action=argparse.BooleanOptionalAction, default=True,
                        help="also run raw `olive quantize/finetune/auto-opt` on the same base and data")
    parser.add_argument("--raw-olive-special-tokens", action="store_true",
                        help="raw olive finetune with --add_special_tokens (each packed stream starts with bos)")
    parser.add_argument("--raw-timeout", type=float, default=3600, help="seconds before a raw Olive command is killed")
    parser.add_argument("--child-timeout", type=float, default=1800, help="seconds for the gpu generation child")
    parser.add_argument("--pad-is-bos", action="store_true", help="the old bench's tokenizer: pad = bos")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="h200")
    parser.add_argument("--table", type=Path, default=None, metavar="JSON",
                        help="render the Markdown table of a combined real-scale-<tag>.json and exit")
    parser.add_argument("--write-readme", action="store_true", help="with --table: write it into the README")
    parser.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    # the gpu generation child
    parser.add_argument("--generation-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.generation_only:
        if args.out is None or not (args.job or (args.model_dir and args.adapter)):
            parser.error("--generation-only needs --out and --job (or --model-dir and --adapter)")
        generation_child(args)
        return
    if args.table:
        table = render_table(json.loads(args.table.read_text()))
        print(table)
        if args.write_readme:
            write_readme(table, args.readme)
            print(f"written into {args.readme}")
        return
    run_bench(args)


if __name__ == "__main__":
    main()
