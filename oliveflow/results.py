"""Typed stage results: small frozen manifests (paths, content hashes, metrics), never models.

These are what Prefect persists for its cache, so they must stay small and picklable.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True)


class Artifact(_Result):
    """A folder in the artifact store and the content hash of its files."""

    path: Path
    sha256: str
    size_bytes: int


class DataReport(_Result):
    train_path: Path
    eval_path: Path | None
    train_sha256: str
    eval_sha256: str | None
    fields: list[str]
    rows: int
    eval_rows: int
    chars_min: int
    chars_median: float
    chars_max: int
    tokens_median: float | None = None
    tokens_max: int | None = None


class BaseModelRef(_Result):
    """The resolved base model: where it lives and what it is."""

    spec: str = Field(description="What the user asked for (Hub id, folder, or the embedded name).")
    artifact: Artifact
    model_type: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    parameters: int = Field(0, description="Parameter count (from the safetensors headers).")


class QuantizedModel(_Result):
    artifact: Artifact
    algorithm: str
    bits: int
    group_size: int
    size_before_bytes: int
    size_after_bytes: int = Field(description="Bytes of the quantized weights as they ship (a tied embedding counted "
                                              "once, as the head's codes).")
    promoted: list[str] = Field(default_factory=list, description="Layers (and head) kept at 8 bits by the "
                                                                  "mixed-precision plan.")
    tied_embedding: bool = Field(False, description="The input embedding is the quantized head's grid.")
    seconds: float

    @property
    def model_dir(self) -> Path:
        return self.artifact.path / "model"

    @property
    def plan_file(self) -> Path:
        """The mixed-precision plan (``oliveflow.precision.PrecisionPlan``), when one was made."""
        return self.artifact.path / "precision_plan.json"


class Adapter(_Result):
    """A PEFT LoRA adapter trained on the quantized model, with its losses."""

    artifact: Artifact
    train_loss: list[float] = Field(description="Training loss per logged step.")
    loss_on: str = Field("response", description="Tokens the loss covered: response or all.")
    train_examples: int = Field(0, description="Training examples used (after cutting to max_seq_len).")
    truncated_examples: int = Field(0, description="Training examples longer than max_seq_len, cut.")
    eval_loss_original: float | None = Field(description="Held-out loss (training transform) of the unquantized "
                                                         "base model.")
    eval_loss_quantized: float | None = Field(description="Held-out loss of the quantized model, no adapter.")
    eval_loss_finetuned: float | None = Field(description="Held-out loss of the quantized model with the adapter.")
    response_ppl_original: float | None = Field(None, description="Held-out perplexity on response tokens, "
                                                                  "unquantized base model.")
    response_ppl_quantized: float | None = Field(None, description="The same, quantized model, no adapter.")
    response_ppl_finetuned: float | None = Field(None, description="The same, quantized model with the adapter.")
    response_ppl_teacher: float | None = Field(None, description="The same, float model with the teacher adapter "
                                                                 "(finetune.distill only): the float LoRA.")
    plan: dict | None = Field(None, description="How training fit the device's memory (oliveflow.memory."
                                                "TrainingPlan): micro-batch, accumulation, checkpointing, budget.")
    seconds: float

    @property
    def adapter_dir(self) -> Path:
        return self.artifact.path / "adapter"

    @property
    def tuned_model_dir(self) -> Path | None:
        """finetune.train_scales: the quantized checkpoint with the trained scales, which the export builds from."""
        folder = self.artifact.path / "model"  # stages.finetune.TUNED_MODEL_SUBDIR
        return folder if folder.is_dir() else None


class OnnxModel(_Result):
    """A flat onnxruntime-genai folder: model.onnx(.data), genai_config.json, tokenizer, adapter file."""

    artifact: Artifact
    adapter_name: str
    device: str
    seconds: float

    @property
    def model_dir(self) -> Path:
        return self.artifact.path / "model"

    @property
    def adapter_file(self) -> Path:
        return self.model_dir / self.adapter_name


class Sample(_Result):
    prompt: str
    reference: str = Field("", description="The held-out answer the generated ones are scored against.")
    base_answer: str
    finetuned_answer: str


class SmokeReport(_Result):
    artifact: Artifact | None = Field(None, description="Where the report is stored, when it is.")
    answered: bool = Field(description="Every prompt got a non-empty answer (True when none was asked). Not a "
                                       "quality verdict: ROUGE-L and the held-out perplexity are; a non-finite "
                                       "or degenerate output raises instead of making a report.")
    samples: list[Sample]
    rouge_l_base: float | None = Field(None, description="Mean ROUGE-L F of the answers without the adapter.")
    rouge_l_finetuned: float | None = Field(None, description="Mean ROUGE-L F of the answers with the adapter.")
    load_seconds: float
    ttft_seconds: float
    ttft_seconds_base: float
    decode_tokens_per_second: float
    decode_tokens_per_second_base: float
    token_latency_p50_ms: float
    token_latency_p90_ms: float
    token_latency_p50_ms_base: float
    token_latency_p90_ms_base: float
    size_before_bytes: int
    size_after_bytes: int
    size_reduction: float


class StageRun(_Result):
    name: str
    cache: str = Field(description="'hit' (served from cache, nothing computed) or 'miss'.")
    seconds: float
    output_bytes: int = 0


class PipelineResult(_Result):
    """What one pipeline run produced; ``--json`` prints this."""

    onnx_model_dir: Path
    adapter_file: Path
    template: str = Field("", description="The text template the run trained and answered with.")
    size_reduction: float
    samples: list[Sample]
    stages: dict[str, StageRun]
    base_model: BaseModelRef
    quantized: QuantizedModel
    adapter: Adapter
    onnx: OnnxModel
    smoke: SmokeReport
    mlflow_run_id: str | None = Field(None, description="The MLflow run that tracked this pipeline run.")
    registration: str | None = Field(None, description="What registration did, e.g. 'not registered: <reason>'.")
