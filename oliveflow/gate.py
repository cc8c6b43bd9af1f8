"""The quality gate: whether a new model is registered at all, judged against the current champion."""

from __future__ import annotations

import math
from dataclasses import dataclass

from oliveflow.registry_backends import RegisteredVersion
from oliveflow.results import PipelineResult

GATE_METRIC = "response_ppl_finetuned"  # held-out perplexity on response tokens, lower is better
ROUGE_METRIC = "rouge_l_finetuned"  # the second check, higher is better
ROUGE_TOLERANCE = 0.02  # a candidate may trail the champion's ROUGE-L by this much (greedy answers are noisy)


@dataclass(frozen=True)
class GateDecision:
    # A dataclass: a pydantic field named "register" would shadow ABCMeta.register on BaseModel.
    register: bool
    reason: str


@dataclass(frozen=True)
class Candidate:
    """What the gate judges a new model on."""

    eval_losses: tuple[float | None, ...]  # original, quantized, fine-tuned: each must be finite when present
    response_ppl: float | None
    rouge_l: float | None
    smoke_answered: bool  # the smoke test produced its answers (SmokeReport.answered)

    @classmethod
    def of(cls, result: PipelineResult) -> Candidate:
        adapter = result.adapter
        return cls(eval_losses=(adapter.eval_loss_original, adapter.eval_loss_quantized, adapter.eval_loss_finetuned,
                                adapter.response_ppl_finetuned),
                   response_ppl=adapter.response_ppl_finetuned, rouge_l=result.smoke.rouge_l_finetuned,
                   smoke_answered=result.smoke.answered)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def decide(candidate: Candidate, champion: RegisteredVersion | None, force: bool = False) -> GateDecision:
    """Register only a finite model that passed its smoke test and is not worse than the champion.

    ``force`` overrides the comparison with the champion, never the numerical checks: a model with a
    non-finite loss or a failed smoke test is never registered.
    """
    broken = [v for v in candidate.eval_losses if v is not None and not math.isfinite(v)]
    if broken:
        return GateDecision(register=False, reason=f"a held-out loss is not finite ({broken[0]}); a numerically "
                                                   "broken model is never registered")
    if not candidate.smoke_answered:
        return GateDecision(register=False, reason="the smoke test failed")
    verdict = _judge(candidate, champion)
    if force and not verdict.register:
        return GateDecision(register=True, reason=f"forced (the gate said: {verdict.reason})")
    return verdict


def _judge(candidate: Candidate, champion: RegisteredVersion | None) -> GateDecision:
    if champion is None:
        return GateDecision(register=True, reason="no version registered under this name yet")
    # A metric tag that is there but not a number was edited or damaged: comparing would mean guessing,
    # so the gate refuses (force overrides), where a missing one just has nothing to beat.
    unreadable = champion.unreadable(GATE_METRIC, ROUGE_METRIC)
    if unreadable:
        key, value = next(iter(unreadable.items()))
        return GateDecision(register=False, reason=f"champion {champion.name} v{champion.version}'s tag {key} is "
                                                   f"{value[:40]!r}, not a number; set it to the version's value "
                                                   "or remove it, or set registry.force to register anyway")
    best = champion.metric(GATE_METRIC)
    if best is None:
        return GateDecision(register=True, reason=f"champion v{champion.version} has no {GATE_METRIC} to beat")
    if not _finite(candidate.response_ppl):
        return GateDecision(register=False, reason=f"no finite {GATE_METRIC} (eval data missing?) to compare "
                                                   f"with champion v{champion.version}'s {best:.4f}")
    if candidate.response_ppl > best:
        return GateDecision(register=False, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} is worse than "
                                                   f"champion v{champion.version}'s {best:.4f}")
    best_rouge = champion.metric(ROUGE_METRIC)
    if best_rouge is not None and _finite(candidate.rouge_l) and candidate.rouge_l < best_rouge - ROUGE_TOLERANCE:
        return GateDecision(register=False, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} is not worse, but "
                                                   f"{ROUGE_METRIC} {candidate.rouge_l:.4f} trails champion "
                                                   f"v{champion.version}'s {best_rouge:.4f} by more than "
                                                   f"{ROUGE_TOLERANCE}")
    return GateDecision(register=True, reason=f"{GATE_METRIC} {candidate.response_ppl:.4f} <= champion "
                                              f"v{champion.version}'s {best:.4f}")
