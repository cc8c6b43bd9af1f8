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

from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

ADAPTER_NAME = "finetuned"
DEFAULT_MAX_NEW_TOKENS = 48


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
        og = self._og
        ids = self._tokenizer.encode(self._format(prompt))
        params = og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(self._model, params)
        if self._adapters is not None:
            generator.set_active_adapter(self._adapters, ADAPTER_NAME)
        generator.append_tokens(ids)
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return self._tokenizer.decode(tokens).strip()

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        max_new_tokens = int((params or {}).get("max_new_tokens") or self._max_new_tokens)
        return [self._answer(p, max_new_tokens) for p in _prompts(model_input)]


# Models from code: MLflow runs this file at load time and takes the model registered here.
mlflow.models.set_model(GenaiModel())
