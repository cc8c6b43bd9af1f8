"""Human-readable summaries of a pipeline run (Prefect markdown artifact, CLI output)."""

from __future__ import annotations

from oliveflow.results import PipelineResult


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


SHOWN_SAMPLES = 3  # the rest are in the MLflow samples table


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(result: PipelineResult) -> str:
    lines = ["# oliveflow run", "", f"Base model: `{result.base_model.spec}` ({result.base_model.architecture}, "
             f"{_mb(result.base_model.artifact.size_bytes)})", "",
             "| stage | cache | seconds | output |", "| --- | --- | ---: | ---: |"]
    for run in result.stages.values():
        lines.append(f"| {run.name} | {run.cache} | {run.seconds:.2f} | {_mb(run.output_bytes)} |")
    smoke, adapter = result.smoke, result.adapter
    lines += ["", f"Size: {_mb(smoke.size_before_bytes)} -> {_mb(smoke.size_after_bytes)} "
              f"(**{smoke.size_reduction:.2f}x** smaller)",
              f"Held-out response perplexity: original {_num(adapter.response_ppl_original)}, quantized "
              f"{_num(adapter.response_ppl_quantized)}, fine-tuned **{_num(adapter.response_ppl_finetuned)}**",
              f"ROUGE-L of the answers: without adapter {_num(smoke.rouge_l_base, 3)}, with adapter "
              f"**{_num(smoke.rouge_l_finetuned, 3)}** ({len(smoke.samples)} held-out prompts)",
              f"Latency (onnxruntime-genai, adapter on): first token {smoke.ttft_seconds * 1000:.1f} ms, "
              f"decode {smoke.decode_tokens_per_second:.1f} tokens/s, p50 {smoke.token_latency_p50_ms:.2f} ms, "
              f"p90 {smoke.token_latency_p90_ms:.2f} ms",
              f"Smoke test: {'answered' if smoke.answered else 'FAILED (no answers)'}",
              f"MLflow run: `{result.mlflow_run_id}`; registration: {result.registration}", "",
              f"Model folder: `{result.onnx_model_dir}`  ", f"Adapter: `{result.adapter_file}`", "",
              "## Samples", "", "| prompt | reference | without adapter | with adapter |", "| --- | --- | --- | --- |"]
    for sample in result.samples[:SHOWN_SAMPLES]:
        cells = [_one_line(t).replace("|", "\\|") for t in (sample.prompt, sample.reference, sample.base_answer,
                                                             sample.finetuned_answer)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
