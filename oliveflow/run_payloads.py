"""What one tracked pipeline run logs, built from the stage results alone: no MLflow import, no I/O but the chart.

``oliveflow.tracking`` writes these to MLflow; the registry's tags reuse the lineage and the same names.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from oliveflow.config import oliveflow_home, template_fields
from oliveflow.hashing import config_sha256, library_versions
from oliveflow.lineage import CONTENT_TAG, Lineage
from oliveflow.results import PipelineResult
from oliveflow.sft import split_template
from oliveflow.olive_runner import CONFIG_FILE

DEFAULT_EXPERIMENT = "oliveflow-pipeline"
CHART_FILE = "charts/size_latency.png"
TRADEOFF_CHART = "charts/size_vs_perplexity.png"
TRADEOFF_FILE = "tradeoff.json"
SENSITIVITY_FILE = "quantize_sensitivity.json"
SAMPLES_FILE = "samples.json"
_PARAM_LIMIT = 6000  # characters MLflow keeps per parameter value


def experiment_name(lineage: Lineage, default: str = DEFAULT_EXPERIMENT) -> str:
    """One experiment per deployment, else per flow."""
    return lineage.deployment_name or lineage.flow_name or default


def flatten_params(params: BaseModel) -> dict[str, str]:
    """Dotted parameter names -> text. ``mode="json"`` renders any SecretStr as '**********'."""
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, f"{prefix}.{key}" if prefix else str(key))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[prefix] = text[:_PARAM_LIMIT]

    walk(params.model_dump(mode="json"), "")
    return out


def run_metrics(result: PipelineResult) -> dict[str, float]:
    """Scalar metrics of a run (train loss per step is logged separately, with steps)."""
    smoke, adapter, quantized = result.smoke, result.adapter, result.quantized
    metrics: dict[str, float | None] = {
        "size.original_bytes": smoke.size_before_bytes,
        "size.onnx_bytes": smoke.size_after_bytes,
        "size.reduction": result.size_reduction,
        "size.quantized_checkpoint_bytes": quantized.size_after_bytes,
        "latency.load_seconds": smoke.load_seconds,
        "latency.ttft_ms.adapter": smoke.ttft_seconds * 1000,
        "latency.ttft_ms.base": smoke.ttft_seconds_base * 1000,
        "latency.decode_tokens_per_second.adapter": smoke.decode_tokens_per_second,
        "latency.decode_tokens_per_second.base": smoke.decode_tokens_per_second_base,
        "latency.token_p50_ms.adapter": smoke.token_latency_p50_ms,
        "latency.token_p90_ms.adapter": smoke.token_latency_p90_ms,
        "latency.token_p50_ms.base": smoke.token_latency_p50_ms_base,
        "latency.token_p90_ms.base": smoke.token_latency_p90_ms_base,
        "smoke.answered": float(smoke.answered),
        "eval_loss_original": adapter.eval_loss_original,
        "eval_loss_quantized": adapter.eval_loss_quantized,
        "eval_loss_finetuned": adapter.eval_loss_finetuned,
        "response_ppl_original": adapter.response_ppl_original,
        "response_ppl_quantized": adapter.response_ppl_quantized,
        "response_ppl_finetuned": adapter.response_ppl_finetuned,
        "response_ppl_teacher": adapter.response_ppl_teacher,
        "rouge_l_base": smoke.rouge_l_base,
        "rouge_l_finetuned": smoke.rouge_l_finetuned,
        "finetune.truncated_examples": adapter.truncated_examples,
    }
    for name, run in result.stages.items():
        metrics[f"stage.{name}.seconds"] = run.seconds
        metrics[f"stage.{name}.cache_hit"] = float(run.cache == "hit")
        metrics[f"stage.{name}.output_bytes"] = run.output_bytes
    return {k: float(v) for k, v in metrics.items() if v is not None}


def run_tags(result: PipelineResult, lineage: Lineage) -> dict[str, str]:
    tags = {**lineage.tags(), CONTENT_TAG: result.onnx.artifact.sha256,
            "smoke_answered": str(result.smoke.answered).lower()}
    tags.update({f"stage.{name}.cache": run.cache for name, run in result.stages.items()})
    if lineage.git_commit:
        tags["mlflow.source.git.commit"] = lineage.git_commit  # shown by the MLflow UI
    return tags


def olive_configs(result: PipelineResult) -> dict[str, Path]:
    """The Olive config each stage generated and saved beside its output."""
    stages = {"quantize": result.quantized.artifact.path, "finetune": result.adapter.artifact.path,
              "export": result.onnx.artifact.path}
    return {name: folder / CONFIG_FILE for name, folder in stages.items()
            if (folder / CONFIG_FILE).is_file()}


def size_latency_chart(result: PipelineResult):
    """Size (original vs int4 ONNX) and latency (no adapter vs adapter) side by side.

    A bare ``Figure`` renders with Agg and never touches pyplot's global backend.
    """
    from matplotlib.figure import Figure

    smoke, adapter = result.smoke, result.adapter
    charts = [
        ("Model size (MB)", ["original", "int4 ONNX"],
         [smoke.size_before_bytes / 1e6, smoke.size_after_bytes / 1e6]),
        ("Time to first token (ms)", ["no adapter", "adapter"],
         [smoke.ttft_seconds_base * 1000, smoke.ttft_seconds * 1000]),
        ("Decode (tokens/s)", ["no adapter", "adapter"],
         [smoke.decode_tokens_per_second_base, smoke.decode_tokens_per_second]),
    ]
    ppl = [adapter.response_ppl_original, adapter.response_ppl_quantized, adapter.response_ppl_finetuned]
    if all(v is not None for v in ppl):
        charts.insert(1, ("Held-out response perplexity", ["original", "int4", "int4 + LoRA"], ppl))
    fig = Figure(figsize=(3.7 * len(charts), 3.6), layout="constrained")
    panels = fig.subplots(1, len(charts))
    for ax, (title, labels, values) in zip(panels, charts, strict=True):
        bars = ax.bar(labels, values, color=["#9aa5b1", "#c0c8d0", "#2f7ed8"][-len(values):])
        ax.bar_label(bars, fmt="%.3g")
        ax.margins(y=0.12)  # room for the labels above the bars
        ax.set_title(title)
    fig.suptitle(f"{result.base_model.spec}: {result.size_reduction:.2f}x smaller")
    return fig


def size_latency_png(result: PipelineResult) -> Path:
    """``size_latency_chart`` as a PNG, drawn once per content (``$OLIVEFLOW_HOME/charts``): a cache-hit re-run
    charts the same numbers, and drawing them costs ~1 s."""
    key = config_sha256(result.base_model.spec, result.size_reduction, result.smoke, result.adapter,
                        library_versions(("matplotlib",)))
    path = oliveflow_home() / "charts" / key[:16] / Path(CHART_FILE).name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Drawn beside it, then renamed in: two runs drawing it at once each put a whole file there.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
        os.close(fd)
        try:
            size_latency_chart(result).savefig(tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def samples_table(result: PipelineResult) -> dict[str, list[str]]:
    return {"prompt": [s.prompt for s in result.samples],
            "reference": [s.reference for s in result.samples],
            "base_answer": [s.base_answer for s in result.samples],
            "finetuned_answer": [s.finetuned_answer for s in result.samples]}


def prompt_template(template: str) -> tuple[str, str] | None:
    """(prompt part of the data template, its one field) for the pyfunc, when there is exactly one."""
    fields = template_fields(template)
    if len(fields) != 2:
        return None
    return split_template(template)[0], fields[0]


# The columns of the size / quality trade-off table: what distinguishes one quantization setting from another
# (and the fine-tune settings that move the shipped perplexity), and what it cost. Each run logs its own row as
# params and metrics; the table gathers the experiment's runs.
TRADEOFF_PARAMS = ("quantize.algorithm", "quantize.bits", "quantize.group_size", "quantize.symmetric",
                   "quantize.size_budget", "finetune.train_scales", "finetune.init", "finetune.distill")
TRADEOFF_METRICS = ("size.onnx_bytes", "response_ppl_quantized", "response_ppl_finetuned", "response_ppl_teacher")


def tradeoff_row(params: dict[str, str], metrics: dict[str, float], run: str) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run}
    row.update({name.split(".", 1)[1]: params.get(name) for name in TRADEOFF_PARAMS})
    row.update({name: metrics.get(name) for name in TRADEOFF_METRICS})
    return row


def tradeoff_table(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows (one per run) as MLflow's column-oriented table, sorted by size."""
    rows = sorted(rows, key=lambda r: (r.get("size.onnx_bytes") or 0, r["run"]))
    columns = ["run", *(n.split(".", 1)[1] for n in TRADEOFF_PARAMS), *TRADEOFF_METRICS]
    return {column: [row.get(column) for row in rows] for column in columns}


def tradeoff_chart(rows: list[dict[str, Any]], current: str):
    """Shipped size against held-out response perplexity, before and after the LoRA, one point per run."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for key, label, marker in (("response_ppl_quantized", "quantized", "o"),
                               ("response_ppl_finetuned", "quantized + LoRA", "s")):
        points = [(r["size.onnx_bytes"] / 1e6, r[key], r) for r in rows
                  if r.get("size.onnx_bytes") and r.get(key) is not None]
        if not points:
            continue
        ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
        for x, y, row in points:
            text = f"{row['algorithm']} g{row['group_size']}" + ("" if row["symmetric"] in ("true", None) else " asym")
            ax.annotate(text + (" (this run)" if row["run"] == current else ""), (x, y), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("shipped ONNX model (MB)")
    ax.set_ylabel("held-out response perplexity")
    ax.set_title("Size against quality, runs of this experiment")
    ax.legend()
    return fig
