"""The real pretrained model through the whole flow, with few steps: SmolLM2-135M-Instruct from its pinned wheel.

rtn, not the awq default: awq's search on this model takes about 40 s per layer on a 2-core CPU (30 layers),
which is the speed issue's to fix; rtn's output is what this test needs (a real int4 model to fine-tune,
export and answer with). Three LoRA steps keep it to a couple of minutes; the quality figures at 100 steps
are in bench/results/real-model-h200.json.
"""

import math

import pytest

from flows.pipeline import pipeline
from oliveflow.config import REAL_MODEL, FinetuneConfig, PipelineParams, QuantizeConfig, SmokeTestConfig


@pytest.mark.slow
def test_real_model_end_to_end_with_its_own_chat_template(tmp_path):
    result = pipeline(PipelineParams(
        # Plain rtn, every layer at 4 bits: the fastest path for CI's 2 cores (mixed precision: tests/unit).
        model=REAL_MODEL, quantize=QuantizeConfig(algorithm="rtn", size_budget=None),
        finetune=FinetuneConfig(max_steps=3),
        smoke_test=SmokeTestConfig(num_samples=2, max_new_tokens=24), registry={"backend": "none"},
        output_dir=tmp_path / "model"))
    assert result.base_model.architecture == "LlamaForCausalLM" and result.base_model.parameters > 100e6
    assert result.template.startswith("<|im_start|>system\n") and "{prompt}<|im_end|>" in result.template, \
        "the model's own ChatML template, not the Phi-3 default"
    adapter = result.adapter
    assert adapter.loss_on == "response" and adapter.train_examples == 340
    assert all(math.isfinite(x) for x in adapter.train_loss) and len(adapter.train_loss) == 3
    # Real weights: int4 costs perplexity, and even three LoRA steps win some of it back.
    assert adapter.response_ppl_original < adapter.response_ppl_quantized
    assert adapter.response_ppl_finetuned < adapter.response_ppl_quantized
    assert result.size_reduction > 2
    for sample in result.samples:
        assert sample.prompt.endswith("<|im_start|>assistant\n") and len(sample.finetuned_answer.split()) >= 5
        assert "<|im" not in sample.finetuned_answer
    assert 0 < result.smoke.rouge_l_finetuned < 1 and 0 < result.smoke.rouge_l_base < 1
    assert (tmp_path / "model" / "adapter_weights.onnx_adapter").is_file()
