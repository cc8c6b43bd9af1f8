"""Growth: each stage's time and peak memory at three model sizes, each double the last, and whether it is linear.

    .venv/bin/python bench/bench_growth.py --tokenizer-from SMOLLM2_DIR [--layers 8,16,32] [--steps 10] [--out FILE]

Builds float Llama-architecture models locally (no downloads): random init with a fixed seed via
``LlamaConfig`` + ``LlamaForCausalLM``, the SmolLM2-135M shape by default (hidden 576, intermediate 1536, 9 heads,
3 kv heads, vocab 49152, tied embeddings) at 8, 16 and 32 layers: the decoder's parameters (what every token runs
through) double from one size to the next; the 28 M-parameter embedding / tied head is the same at every size, so
the totals are 56.6 M, 85.0 M and 141.6 M. Linearity is judged against the decoder's parameters. (Doubling the
*total* instead needs 1, 10 and 28 layers: a 10x step in per-token work that no stage's time can follow.) The
tokenizer and chat template are copied from a real SmolLM2 folder (``--tokenizer-from``, e.g. the converted
``$OLIVEFLOW_HOME/models/gguf-*`` of ``embedded:smollm2-135m-instruct``), so the bundled data and the model's own
chat template work.

Weights are drawn with ``initializer_range`` 0.1, not Llama's 0.02: at 0.02 attention is near-uniform, every
position sees about the context mean, and greedy decoding repeats one token, which the smoke test rightly fails as
degenerate. At 0.1 the answers are random but varied, and every answer runs to max_new_tokens (no early EOS), so
the smoke test does the same work at every size. Timing does not depend on the weights' values otherwise.

Every stage runs once per size through the product, ``oliveflow stage NAME ... --output DIR`` as a subprocess (no
Prefect, no cache), timed, with its process tree's peak RSS sampled every 50 ms (``run_stage``, importable by other
bench scripts). Linearity per stage: t(2P)/t(P), t(4P)/t(2P), a log-log slope (0.8-1.2 is "linear") and the
intercept of t = a + b P (the fixed overhead). Writes bench/results/growth-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
STAGES = ("quantize", "finetune", "export", "smoke_test")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
RESULT_FILE = "oliveflow-result.json"  # oliveflow.store.RESULT_FILE (not imported: keep this module light)

# SmolLM2-135M-Instruct's shape; num_hidden_layers is set per size.
SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "head_dim": 64, "tie_word_embeddings": True, "bos_token_id": 1,
                 "eos_token_id": 2, "pad_token_id": 2, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                 "rms_norm_eps": 1e-5, "hidden_act": "silu"}
INIT_RANGE = 0.1
SEED = 0
LINEAR_SLOPE = (0.8, 1.2)


def _tree_rss(proc: psutil.Process) -> int:
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # it exited between the caller's poll and now
        return 0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _oliveflow() -> str:
    exe = Path(sys.executable).parent / "oliveflow"
    return str(exe) if exe.exists() else "oliveflow"


def _last_json(text: str) -> dict | None:
    """The last JSON object printed on stdout (the stage prints its result, indented, last)."""
    start = len(text)
    while True:
        start = text.rfind("{", 0, start)
        if start < 0:
            return None
        if start == 0 or text[start - 1] == "\n":
            try:
                value = json.loads(text[start:])
                return value if isinstance(value, dict) else None
            except ValueError:
                pass


def run_sampled(cmd: list[str], env: dict[str, str], interval: float = 0.05
                ) -> tuple[int, str, str, float, int]:
    """Run ``cmd``: (return code, stdout, stderr, wall seconds, peak RSS bytes of its process tree, sampled)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    watcher = psutil.Process(proc.pid)

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, _tree_rss(watcher))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    thread.join()
    return proc.returncode, stdout, stderr, wall, peak


def run_stage(name: str, args: list[str], env: dict[str, str] | None = None, *, check: bool = True,
              interval: float = 0.05) -> dict:
    """Run ``oliveflow stage NAME *args`` as a subprocess; return its wall time and process-tree peak RSS.

    ``args`` are the stage's flags (``--model``, ``--output DIR``, ``--quantized DIR``, ``--param k=v`` ...);
    ``env`` the whole environment (default: this process's). The result has ``wall_seconds``, ``peak_rss_mb``,
    ``returncode``, ``stage_seconds`` (the stage's own ``seconds`` from its result, where it has one; the smoke
    test has ``load_seconds`` etc. in ``result`` instead) and ``result`` (the JSON it printed). With ``check``, a
    failed stage raises RuntimeError carrying its stderr tail; otherwise ``error`` holds that tail.
    """
    cmd = [_oliveflow(), "stage", name, *args]
    returncode, stdout, stderr, wall, peak = run_sampled(cmd, dict(os.environ if env is None else env), interval)
    outcome = {"stage": name, "command": " ".join(["oliveflow", "stage", name, *args]),
               "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1), "returncode": returncode}
    if returncode != 0:
        if check:
            raise RuntimeError(f"oliveflow stage {name} failed ({returncode}):\n{stderr[-3000:]}")
        outcome["error"] = stderr[-3000:]
        return outcome
    result = _last_json(stdout)
    if "--output" in args:
        stored = Path(args[args.index("--output") + 1]) / RESULT_FILE
        if stored.is_file():
            result = json.loads(stored.read_text())
            result.pop("artifact", None)
    outcome["stage_seconds"] = round(result["seconds"], 2) if result and "seconds" in result else None
    outcome["result"] = result
    return outcome


# ---------------------------------------------------------------------------------------------
# Model sizes
# ---------------------------------------------------------------------------------------------


def stage_args(common: list[str], out: Path, steps: int) -> dict[str, list[str]]:
    """Each stage's ``oliveflow stage`` flags, chained through output folders under ``out``."""
    dirs = {stage: str(out / stage) for stage in STAGES}
    return {
        "quantize": [*common, "--output", dirs["quantize"]],
        "finetune": [*common, "--max-steps", str(steps), "--quantized", dirs["quantize"], "--output", dirs["finetune"]],
        "export": [*common, "--quantized", dirs["quantize"], "--adapter", dirs["finetune"], "--output", dirs["export"]],
        "smoke_test": [*common, "--onnx", dirs["export"]],
    }


def parameter_count(shape: dict, layers: int) -> dict:
    """Parameters of a Llama model of this shape (embedding, per layer, total), as save_pretrained stores them."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or hidden // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inter + 2 * hidden
    embedding = shape["vocab_size"] * hidden * (1 if shape.get("tie_word_embeddings", True) else 2)
    return {"embedding": embedding, "per_layer": per_layer, "total": embedding + hidden + layers * per_layer}


DEFAULT_LAYERS = (8, 16, 32)


def build_model(folder: Path, shape: dict, layers: int, tokenizer_from: Path, *, seed: int = SEED,
                init_range: float = INIT_RANGE) -> int:
    """Save a random-init float LlamaForCausalLM (and the tokenizer files of ``tokenizer_from``); return its
    parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, num_hidden_layers=layers, initializer_range=init_range)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"{tokenizer_from} has no tokenizer.json to copy")
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    del model
    return total


# ---------------------------------------------------------------------------------------------
# Linearity
# ---------------------------------------------------------------------------------------------


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else float("nan")
    return my - slope * mx, slope


def growth(params: list[int], values: list[float], unit: str = "s") -> dict:
    """Ratios of consecutive values, the log-log slope against params, the verdict and t = a + b P's intercept."""
    ratios = [round(b / a, 3) if a else None for a, b in zip(values, values[1:])]
    if len(values) < 2 or min(values) <= 0:
        return {"ratios": ratios, "loglog_slope": None, "verdict": "unknown"}
    _, slope = _fit([math.log(p) for p in params], [math.log(v) for v in values])
    intercept, per_param = _fit([float(p) for p in params], values)
    low, high = LINEAR_SLOPE
    verdict = "linear" if low <= slope <= high else ("sublinear" if slope < low else "superlinear")
    return {"ratios": ratios, "loglog_slope": round(slope, 3), "verdict": verdict,
            f"fixed_overhead_{unit}": round(intercept, 2), f"per_million_params_{unit}": round(per_param * 1e6, 4),
            "fixed_overhead_share_at_smallest": round(intercept / values[0], 3) if values[0] else None}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def measure(sizes: list[int] | None = None, steps: int = 10, work_dir: Path | None = None, *,
            shape: dict | None = None, tokenizer_from: Path, quantize: str = "awq",
            extra: list[str] | None = None, init_range: float = INIT_RANGE, log=print, on_progress=None) -> dict:
    """Build a model per size (a layer count of ``shape``) and time every stage on each; return the report.

    ``sizes`` defaults to ``DEFAULT_LAYERS``; ``work_dir`` (default: a temporary folder, removed after)
    holds the models, the stages' outputs and $OLIVEFLOW_HOME. ``extra`` is passed to every stage. A failed
    stage is recorded (with its error) and the later stages of that size are skipped. ``on_progress(runs)`` is
    called after every stage with the runs so far.
    """
    shape = dict(shape or SMOLLM2_SHAPE)
    sizes = list(sizes or DEFAULT_LAYERS)
    extra = list(extra or [])
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="oliveflow-growth-")) if owned else Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OLIVEFLOW_HOME": str(root / "home"), "PREFECT_HOME": str(root / "home" / "prefect"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    runs = []
    try:
        for layers in sizes:
            model = root / f"llama-{layers}l"
            started = time.perf_counter()
            if (model / "config.json").is_file():
                shutil.rmtree(model)
            params = build_model(model, shape, layers, tokenizer_from, init_range=init_range)
            build_seconds = round(time.perf_counter() - started, 2)
            log(f"[growth] {layers} layers, {params / 1e6:.2f} M params, built in {build_seconds} s; "
                f"load {os.getloadavg()[0]:.2f}")
            args = stage_args(["--model", str(model), "--quantize", quantize, *extra], root / f"out-{layers}l",
                              steps)
            stages = {}
            run = {"layers": layers, "parameters": params,
                   "non_embedding_parameters": params - parameter_count(shape, 0)["embedding"],
                   "build_seconds": build_seconds, "stages": stages}
            runs.append(run)
            for stage in STAGES:
                if any("error" in done for done in stages.values()):
                    break
                load_before = os.getloadavg()[0]
                record = run_stage(stage, args[stage], env, check=False)
                record["load_average_before"] = round(load_before, 2)
                record["load_average_after"] = round(os.getloadavg()[0], 2)
                record["command"] = record["command"].replace(str(root), "$WORK")
                stages[stage] = record
                log(f"[growth]   {stage}: {record['wall_seconds']} s wall (stage's own: {record['stage_seconds']}), "
                    f"peak RSS {record['peak_rss_mb']} MB; load {record['load_average_after']}"
                    + (f"; FAILED: {record['error'].strip().splitlines()[-1][:300]}" if "error" in record else ""))
                if on_progress:
                    on_progress(runs)
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)

    params = [r["non_embedding_parameters"] for r in runs]  # what per-token work scales with
    linearity = {}
    for stage in STAGES:
        done = [r["stages"].get(stage) for r in runs]
        if not all(d and "error" not in d for d in done):
            linearity[stage] = {"verdict": "not measured: the stage failed or did not run at some size"}
            continue
        walls = [r["stages"][stage]["wall_seconds"] for r in runs]
        own = [r["stages"][stage]["stage_seconds"] for r in runs]
        rss = [r["stages"][stage]["peak_rss_mb"] for r in runs]
        entry = {"wall": growth(params, walls), "peak_rss": growth(params, rss, unit="mb")}
        if all(own):
            entry["stage_seconds"] = growth(params, own)
        if stage == "smoke_test":
            loads = [(r["stages"][stage]["result"] or {}).get("load_seconds") for r in runs]
            if all(loads):
                entry["load_seconds"] = growth(params, loads)
        linearity[stage] = entry
    return {
        "sizes": [{"layers": r["layers"], "parameters": r["parameters"],
                   "non_embedding_parameters": r["non_embedding_parameters"]} for r in runs],
        "parameter_ratios": [round(b / a, 4) for a, b in zip(params, params[1:])],
        "shape": shape, "init_range": init_range, "seed": SEED, "quantize": quantize, "finetune_steps": steps,
        "extra_stage_args": extra,
        "runs": runs,
        "linearity": linearity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=None,
                        help="comma-separated layer counts (default 8,16,32: the decoder's parameters double)")
    parser.add_argument("--steps", type=int, default=10, help="LoRA steps of the finetune stage")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (default SmolLM2's 576)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default 1536)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 9)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 3)")
    parser.add_argument("--quantize", default="awq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--tokenizer-from", type=Path, required=True,
                        help="a SmolLM2 folder to copy the tokenizer and chat template from")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="arguments passed to every `oliveflow stage` (after --)")
    args = parser.parse_args()
    shape = dict(SMOLLM2_SHAPE)
    for key, value in (("hidden_size", args.hidden), ("intermediate_size", args.intermediate),
                       ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads)):
        if value is not None:
            shape[key] = value
    if args.hidden is not None or args.heads is not None:
        shape["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
    sizes = [int(x) for x in args.layers.split(",")] if args.layers else None
    load_start = os.getloadavg()
    started = time.perf_counter()
    out = args.out or REPO / "bench" / "results" / "growth-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def progress(runs: list[dict]) -> None:
        out.write_text(json.dumps({"partial": True, "command": "bench/bench_growth.py " + " ".join(sys.argv[1:]),
                                   "runs": runs}, indent=1) + "\n")

    report = measure(sizes, args.steps, args.work_dir, shape=shape, tokenizer_from=args.tokenizer_from,
                     quantize=args.quantize, extra=args.extra, on_progress=progress)
    report = {
        "command": "bench/bench_growth.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in load_start],
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "total_seconds": round(time.perf_counter() - started, 1),
        **report,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"sizes": report["sizes"], "linearity": report["linearity"]}, indent=1))


if __name__ == "__main__":
    main()
