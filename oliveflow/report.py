"""Human-readable summaries of a pipeline run (Prefect markdown artifact, CLI output)."""

from __future__ import annotations

import re
import string

from oliveflow.results import PipelineResult


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def cut(text: str, limit: int = 160) -> str:
    """``text`` on one line, cut at the last word boundary before ``limit`` characters, with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit - 1]
    if " " in head:
        head = head.rsplit(" ", 1)[0]
    return head.rstrip(",;:-") + "…"


def question(prompt: str, template: str) -> str:
    """What was asked, without the template's markup: the values of the placeholders in ``prompt`` (the template
    rendered up to its last placeholder); failing that, the prompt with its ``<|...|>`` tokens removed."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        parts = []
    last = max((i for i, part in enumerate(parts) if part[1] is not None), default=None)
    if last is not None:
        pattern = "".join(re.escape(literal) + ("(.*?)" if name is not None else "")
                          for literal, name, _, _ in parts[:last]) + re.escape(parts[last][0])
        match = re.fullmatch(pattern, prompt, re.S)
        if match and match.groups():
            return " / ".join(value.strip() for value in match.groups())
    return re.sub(r"<\|[^|>]*\|>", " ", prompt)


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
              f"{_num(adapter.response_ppl_quantized)}, fine-tuned **{_num(adapter.response_ppl_finetuned)}**"
              + (f" (float LoRA, the distillation teacher: {_num(adapter.response_ppl_teacher)})"
                 if adapter.response_ppl_teacher is not None else ""),
              *(["Base graph: the int4 model with the scales trained with the adapter (finetune.train_scales): "
                 "its answers without the adapter are tuned to the task too"] if adapter.tuned_model_dir else []),
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
        cells = [cut(t).replace("|", "\\|") for t in (question(sample.prompt, result.template), sample.reference,
                                                       sample.base_answer, sample.finetuned_answer)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def text(result: PipelineResult, places: list[tuple[str, str]] = (), commands: list[str] = ()) -> str:
    """The summary ``oliveflow run`` prints: what ran and what it gave, a few answers cut at a word, then ``places``
    (label, where) and ``commands`` (to open the UIs)."""
    smoke, adapter = result.smoke, result.adapter
    lines = [f"oliveflow run: {result.base_model.spec} ({result.base_model.architecture}, "
             f"{_mb(result.base_model.artifact.size_bytes)})", "",
             f"{'stage':<12} {'cache':<6} {'seconds':>8} {'output':>12}"]
    lines += [f"{run.name:<12} {run.cache:<6} {run.seconds:>8.1f} {_mb(run.output_bytes):>12}"
              for run in result.stages.values()]
    rows = [("", "before", "after"),
            ("size", _mb(smoke.size_before_bytes), f"{_mb(smoke.size_after_bytes)} ({smoke.size_reduction:.2f}x "
                                                    "smaller)"),
            ("response perplexity", f"{_num(adapter.response_ppl_original)} float, "
                                    f"{_num(adapter.response_ppl_quantized)} int4",
             f"{_num(adapter.response_ppl_finetuned)} int4 + LoRA"
             + (f" ({_num(adapter.response_ppl_teacher)} float LoRA)" if adapter.response_ppl_teacher is not None
                else "")),
            (f"ROUGE-L ({len(smoke.samples)} prompts)", f"{_num(smoke.rouge_l_base, 3)} no adapter",
             f"{_num(smoke.rouge_l_finetuned, 3)} adapter"),
            ("first token", f"{smoke.ttft_seconds_base * 1000:.1f} ms", f"{smoke.ttft_seconds * 1000:.1f} ms"),
            ("decode", f"{smoke.decode_tokens_per_second_base:.1f} tokens/s",
             f"{smoke.decode_tokens_per_second:.1f} tokens/s"),
            ("per token p50 / p90", f"{smoke.token_latency_p50_ms_base:.2f} / {smoke.token_latency_p90_ms_base:.2f} ms",
             f"{smoke.token_latency_p50_ms:.2f} / {smoke.token_latency_p90_ms:.2f} ms")]
    lines += [""] + [f"{name:<22} {before:<28} {after}".rstrip() for name, before, after in rows]
    if adapter.tuned_model_dir:
        lines.append("(no adapter: the int4 base with the scales trained beside the adapter, finetune.train_scales)")
    if not smoke.answered:
        lines.append("smoke test: FAILED (an empty answer)")
    shown = result.samples[:SHOWN_SAMPLES]
    if shown:
        lines += ["", f"Answers without and with the adapter ({len(shown)} of {len(result.samples)}; all in MLflow):"]
        for sample in shown:
            lines += [f"  Q: {cut(question(sample.prompt, result.template), 96)}",
                      f"     base:       {cut(sample.base_answer, 84)}",
                      f"     fine-tuned: {cut(sample.finetuned_answer, 84)}"]
    lines += ["", f"registration: {result.registration}"]
    width = max((len(label) for label, _ in places), default=0) + 1
    lines += [f"{label + ':':<{width}} {where}" for label, where in places]
    if commands:
        lines += ["", "Open the UIs:", *(f"  {command}" for command in commands)]
    return "\n".join(lines) + "\n"
