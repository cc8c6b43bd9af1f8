"""smoke_test: load the exported model + adapter with onnxruntime-genai, answer held-out prompts.

Each prompt is answered twice, with the adapter active and with none (the LoRA weights
are float inputs, so "none" is the quantized base). Latency is measured per token, and the
answers are scored with ROUGE-L against the held-out reference answers. Non-finite logits, or a
fine-tuned answer that is empty or one token repeated, fail the stage: a numerically broken
model never reaches a registry.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from oliveflow import progress
from oliveflow.config import SmokeTestConfig
from oliveflow.errors import StageError
from oliveflow.hashing import tree_size
from oliveflow.results import BaseModelRef, DataReport, OnnxModel, Sample, SmokeReport
from oliveflow.stages.data import prompt_and_reference, read_examples

STUCK_RUN = 12  # an answer whose last 12 tokens are one token is stuck


def _generate(og, model, tokenizer, prompt: str, max_new_tokens: int, adapters=None
              ) -> tuple[str, list[int], list[float]]:
    """``greedy_answer`` (answer, token ids, seconds per token); a non-finite logit fails the stage."""
    from oliveflow.mlflow_model import NonFiniteLogits, greedy_answer  # loads MLflow: only when a smoke test runs

    try:
        return greedy_answer(og, model, tokenizer, prompt, max_new_tokens, adapters)
    except NonFiniteLogits as exc:
        which = "with the adapter" if adapters is not None else "without the adapter"
        raise StageError(f"smoke_test: non-finite logits {which} at generated token {exc.position} for prompt "
                         f"{prompt[-60:]!r}; the exported model is numerically broken") from None


def degenerate(text: str, tokens: list[int], eos: set[int] = frozenset()) -> str | None:
    """Why an answer is degenerate (empty, one token repeated, stuck on one token), or None."""
    body = [t for t in tokens if t not in eos]
    if not text.strip():
        return "empty answer"
    if len(body) >= 4 and len(set(body)) == 1:
        return f"one token ({body[0]}) repeated {len(body)} times"
    if len(body) >= STUCK_RUN and len(set(body[-STUCK_RUN:])) == 1:
        return f"stuck on token {body[-1]} for its last {STUCK_RUN} tokens"
    return None


def rouge_l(answers: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (Google's rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    return sum(scores) / len(scores) if scores else 0.0


def _eos_ids(model_dir: Path) -> set[int]:
    import json

    eos = json.loads((model_dir / "genai_config.json").read_text())["model"].get("eos_token_id", [])
    return set(eos if isinstance(eos, list) else [eos])


def _onnx_size(model_dir: Path) -> int:
    return sum(tree_size(p) for p in model_dir.glob("*.onnx*") if not p.name.endswith(".onnx_adapter"))


def smoke_test(onnx: OnnxModel, base: BaseModelRef, data: DataReport, template: str,
               config: SmokeTestConfig) -> SmokeReport:
    import onnxruntime_genai as og

    from oliveflow.mlflow_model import ADAPTER_NAME  # the name _generate activates

    if onnx.device == "gpu" and not og.is_cuda_available():
        raise StageError("smoke_test: the model was exported for CUDA but this onnxruntime-genai has no CUDA; "
                         "install the gpu extra (onnxruntime-genai-cuda) or export with export.device=cpu")
    started = time.perf_counter()
    model = og.Model(str(onnx.model_dir))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(onnx.adapter_file), ADAPTER_NAME)
    load_seconds = time.perf_counter() - started

    source = data.eval_path or data.train_path
    rows = read_examples(source, data.fields)[: config.num_samples]
    samples, tuned_lat, base_lat, references = [], [], [], []
    answered = progress.steps(len(rows), "prompt")
    for row in rows:
        prompt, reference = prompt_and_reference(template, row)
        tuned, tuned_tokens, lat_t = _generate(og, model, tokenizer, prompt, config.max_new_tokens, adapters)
        plain, _, lat_b = _generate(og, model, tokenizer, prompt, config.max_new_tokens)
        reason = degenerate(tuned, tuned_tokens, _eos_ids(onnx.model_dir))
        if reason:
            raise StageError(f"smoke_test: the fine-tuned model's answer is degenerate ({reason}) for prompt "
                             f"{prompt[-60:]!r}: {tuned[:80]!r}; the fine-tune failed (check its loss curve)")
        samples.append(Sample(prompt=prompt, reference=reference, base_answer=plain, finetuned_answer=tuned))
        references.append(reference)
        tuned_lat.append(lat_t)
        base_lat.append(lat_b)
        answered()

    def ttft(runs: list[list[float]]) -> float:
        return statistics.mean(r[0] for r in runs if r) if runs else 0.0

    def decode_rate(runs: list[list[float]]) -> float:
        steps = [t for r in runs for t in r[1:]]
        return len(steps) / sum(steps) if steps and sum(steps) > 0 else 0.0

    def percentiles(runs: list[list[float]]) -> tuple[float, float]:
        """p50 and p90 of the per-token decode latency in ms (the first token, with the prompt, left out)."""
        per_token = sorted(t * 1000 for r in runs for t in r[1:])
        if len(per_token) < 2:
            return (per_token[0], per_token[0]) if per_token else (0.0, 0.0)
        return statistics.median(per_token), statistics.quantiles(per_token, n=10)[8]

    p50, p90 = percentiles(tuned_lat)
    p50_base, p90_base = percentiles(base_lat)
    size_after = _onnx_size(onnx.model_dir)
    return SmokeReport(
        answered=bool(samples) or config.num_samples == 0,
        samples=samples,
        rouge_l_base=rouge_l([s.base_answer for s in samples], references) if samples else None,
        rouge_l_finetuned=rouge_l([s.finetuned_answer for s in samples], references) if samples else None,
        load_seconds=load_seconds,
        ttft_seconds=ttft(tuned_lat),
        ttft_seconds_base=ttft(base_lat),
        decode_tokens_per_second=decode_rate(tuned_lat),
        decode_tokens_per_second_base=decode_rate(base_lat),
        token_latency_p50_ms=p50,
        token_latency_p90_ms=p90,
        token_latency_p50_ms_base=p50_base,
        token_latency_p90_ms_base=p90_base,
        size_before_bytes=base.artifact.size_bytes,
        size_after_bytes=size_after,
        size_reduction=base.artifact.size_bytes / size_after if size_after else 0.0,
    )
