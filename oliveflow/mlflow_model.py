"""An MLflow pyfunc model over an onnxruntime-genai folder: model + LoRA adapter, greedy answers.

Logged as *models from code*: MLflow copies this file into the model and runs it at load
time, so a logged model needs only mlflow, onnxruntime-genai and pandas to load, not
oliveflow (and nothing is pickled). ``mlflow.onnx`` would keep one ModelProto and drop
genai_config.json and the tokenizer, hence the pyfunc.

Artifacts: ``model_dir``, the exported folder (it holds the ``*.onnx_adapter`` file).
Model config: ``prompt_template`` (optional, one placeholder named by ``prompt_field``)
wraps each prompt in the chat format the adapter was trained on; ``max_new_tokens`` is the
default answer length, overridable per call with ``params={"max_new_tokens": n}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

ADAPTER_NAME = "finetuned"
DEFAULT_MAX_NEW_TOKENS = 48


class NonFiniteLogits(ArithmeticError):
    """The model gave a non-finite logit before generating token ``position`` of its answer."""

    def __init__(self, position: int):
        super().__init__(f"non-finite logits at generated token {position}")
        self.position = position


def greedy_answer(og, model, tokenizer, prompt: str, max_new_tokens: int, adapters=None
                  ) -> tuple[str, list[int], list[float]]:
    """Greedy answer to ``prompt`` (with adapter ``ADAPTER_NAME`` of ``adapters`` active when given), its token
    ids, and the seconds each token took (the first includes the prompt). The one generation loop: the smoke
    test and this pyfunc both answer through it (here, not in oliveflow: a logged model loads this file alone).

    Raises NonFiniteLogits on the first non-finite logit.
    """
    import numpy as np

    params = og.GeneratorParams(model)
    ids = tokenizer.encode(prompt)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, ADAPTER_NAME)
    tokens: list[int] = []
    latencies: list[float] = []
    tick = time.perf_counter()
    generator.append_tokens(ids)
    while not generator.is_done():
        if not np.isfinite(generator.get_logits()).all():
            raise NonFiniteLogits(len(tokens))
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
        now = time.perf_counter()
        latencies.append(now - tick)
        tick = now
    return tokenizer.decode(tokens).strip(), tokens, latencies


def _prompts(model_input: Any) -> list[str]:
    """Accept a DataFrame with a "prompt" column, a list of strings, or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        # MLflow's schema check turns a list of strings into a one-column frame named 0.
        if "prompt" in model_input.columns:
            return [str(p) for p in model_input["prompt"]]
        if len(model_input.columns) == 1:
            return [str(p) for p in model_input.iloc[:, 0]]
        raise ValueError(f"predict: the input DataFrame has columns {list(model_input.columns)}; "
                         "pass a 'prompt' column (or a list of strings)")
    if isinstance(model_input, dict) and "prompt" in model_input:
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else [str(p) for p in value]
    return [str(p) for p in model_input]


class GenaiModel(PythonModel):
    """Loads the folder once; each predict answers every prompt with the adapter active."""

    def load_context(self, context) -> None:
        import onnxruntime_genai as og

        model_dir = Path(context.artifacts["model_dir"])
        config = dict(context.model_config or {})
        self._og = og
        self._model = og.Model(str(model_dir))
        self._tokenizer = og.Tokenizer(self._model)
        self._template: str | None = config.get("prompt_template")
        self._field: str = config.get("prompt_field", "prompt")
        self._max_new_tokens = int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        adapter_files = sorted(model_dir.glob("*.onnx_adapter"))
        self._adapters = None
        if adapter_files:
            self._adapters = og.Adapters(self._model)
            self._adapters.load(str(adapter_files[0]), ADAPTER_NAME)

    def _format(self, prompt: str) -> str:
        return self._template.format_map({self._field: prompt}) if self._template else prompt

    def _answer(self, prompt: str, max_new_tokens: int) -> str:
        return greedy_answer(self._og, self._model, self._tokenizer, self._format(prompt), max_new_tokens,
                             self._adapters)[0]

    # The DataFrame hint says what MLflow hands over after checking the input against the logged signature (a list of
    # strings becomes a one-column frame). Without a hint MLflow warns at every log and load that it cannot
    # validate; a pandas hint is one it takes as is, neither inferring a signature from it nor converting.
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens") or self._max_new_tokens)
        return [self._answer(p, max_new_tokens) for p in _prompts(model_input)]


# Models from code: MLflow runs this file at load time and takes the model registered here.
mlflow.models.set_model(GenaiModel())
