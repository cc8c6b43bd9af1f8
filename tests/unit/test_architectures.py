"""Other architectures the exporter takes go through the same chain (random weights, tiny shapes).

Random weights answer nonsense, which the smoke test rightly refuses as degenerate; what is checked here is
that the exported graph computes what the PyTorch model does, adapter on and off.
"""

import numpy as np
import pytest
import torch

from oliveflow.config import DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig
from oliveflow.stages.data import resolve_template, validate_data
from oliveflow.stages.export import export
from oliveflow.stages.finetune import finetune
from oliveflow.stages.model import resolve_model
from oliveflow.stages.quantize import quantize

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
TRAIN, EVAL = REPO / "data" / "travel_train.jsonl", REPO / "data" / "travel_eval.jsonl"


def _build(kind: str, tokenizer_dir, folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # A non-default RoPE base (SmolLM2's 100000): transformers 5 keeps it in rope_parameters, not rope_theta.
    common = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    torch.manual_seed(0)
    if kind == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        # Gemma 3: tied head, (1 + w) norms, q/k norms, five sliding-window layers (a 16-token window here, so 40
        # positions cross it) then one global layer, each with its own RoPE base.
        config = Gemma3TextConfig(**{**common, "num_hidden_layers": 6, "head_dim": 32, "tie_word_embeddings": True,
                                     "sliding_window": 16, "query_pre_attn_scalar": 32, "rope_parameters": {
                                         "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}})
        model = Gemma3ForCausalLM(config)
    else:
        model = (LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama"
                 else Qwen2ForCausalLM(Qwen2Config(**common)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_chain_on_other_architecture(kind, tiny_model_dir, tmp_path):
    folder = _build(kind, tiny_model_dir, tmp_path / kind)
    data_config = DataConfig(train_path=TRAIN, eval_path=EVAL)
    data = validate_data(data_config)
    qconfig = QuantizeConfig(group_size=32)
    base = resolve_model(str(folder), qconfig)
    dirs = {name: tmp_path / name for name in ("q", "f", "e")}
    for path in dirs.values():
        path.mkdir()
    quantized = quantize(base, qconfig, dirs["q"], data=data)
    template = resolve_template(data_config, folder)
    adapter = finetune(base, quantized, data, template,
                       FinetuneConfig(max_steps=3, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
                       dirs["f"])
    onnx = export(quantized, adapter, ExportConfig(), dirs["e"])
    from test_stages import _torch_and_genai_logits

    ids = list(range(5, 45))  # 40 positions: a wrong RoPE base shows up far from position 0
    for with_adapter in (True, False):
        expected, actual = _torch_and_genai_logits({"quantized": quantized, "adapter": adapter, "onnx": onnx}, ids,
                                                   with_adapter)
        assert np.argmax(actual) == np.argmax(expected)
        assert np.abs(actual - expected).max() < 0.02 * (expected.max() - expected.min())
