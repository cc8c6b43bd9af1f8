"""finetune.init error: the LoRA starts as the best low-rank copy of each layer's quantization error."""

from __future__ import annotations

import pytest
import torch

from oliveflow.lora_init import low_rank_error


def _weighted(matrix: torch.Tensor, scale: torch.Tensor) -> float:
    return float((matrix * scale[None, :]).square().sum())


def _case(seed: int = 0, out: int = 24, inp: int = 40):
    g = torch.Generator().manual_seed(seed)
    float_w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    quant_w = float_w + 0.1 * torch.randn(out, inp, generator=g, dtype=torch.float64)
    mean_square = torch.rand(inp, generator=g, dtype=torch.float64) + 0.01
    mean_square[:3] *= 400  # outlier channels, as in real activations
    return float_w, quant_w, mean_square


def test_the_copy_beats_other_rank_r_copies_in_the_input_weighted_norm():
    float_w, quant_w, mean_square = _case()
    error, scale = float_w - quant_w, mean_square.sqrt()
    found = low_rank_error(float_w, quant_w, mean_square, 4)
    assert found.a.shape == (4, 40) and found.b.shape == (24, 4)
    left = _weighted(error - found.b @ found.a, scale)
    assert found.kept == pytest.approx(1 - left / _weighted(error, scale), rel=1e-9)
    assert 0 < found.kept < 1
    # The plain (unweighted) truncated SVD is another rank-4 copy: worse where the inputs are large.
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    assert left < _weighted(error - (u[:, :4] * s[:4]) @ vh[:4], scale)
    # Nudging a or b in any direction only makes it worse: a minimum.
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        da, db = (1e-3 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (found.a, found.b))
        assert left < _weighted(error - (found.b + db) @ (found.a + da), scale)


def test_full_rank_reproduces_the_error_and_no_error_gives_nothing():
    float_w, quant_w, mean_square = _case(2, out=12, inp=10)
    full = low_rank_error(float_w, quant_w, mean_square, 64)
    assert torch.allclose(full.b @ full.a, float_w - quant_w, atol=1e-10) and full.kept == pytest.approx(1.0)
    none = low_rank_error(float_w, float_w, mean_square, 4)
    assert not none.b.any() and none.kept == 0.0
    # A channel no token ever uses does not make the copy blow up.
    mean_square[0] = 0
    dead = low_rank_error(float_w, quant_w, mean_square, 4)
    assert torch.isfinite(dead.a).all() and torch.isfinite(dead.b).all()


def test_error_init_starts_the_adapter_at_the_quantization_error(chain, tmp_path):
    """One step at a negligible learning rate leaves the adapter as it started: with ``init error`` the tiny
    model's logits are closer to the float model's with the adapter than without; the stage leaves no example
    file behind and the Olive config names the float base. In float32 on every device (a GPU trains in
    bfloat16 by default, which rounds the copy: 0.8% closer there, against the 1% asked here)."""
    import json

    from olive.model import HfModelHandler
    from transformers import AutoModelForCausalLM

    from oliveflow.config import FinetuneConfig
    from oliveflow.olive_ext import load_adapter
    from oliveflow.olive_runner import CONFIG_FILE
    from oliveflow.stages.finetune import finetune

    base, quantized = chain["base"], chain["quantized"]
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32)(input_ids=ids).logits
    adapter = finetune(base, quantized, chain["data"], chain["template"],
                       FinetuneConfig(max_steps=1, learning_rate=1e-12, init="error", precision="float32"), tmp_path)
    assert not (tmp_path / "init_examples.json").exists()
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())["passes"]["finetune"]
    assert saved["error_init"]["base"] == str(base.artifact.path)
    tuned = load_adapter(HfModelHandler(model_path=str(quantized.model_dir)).load_model(), adapter.adapter_dir)
    with torch.no_grad():
        with tuned.disable_adapter():
            without = float((tuned(input_ids=ids).logits - target).square().mean())
        with_adapter = float((tuned(input_ids=ids).logits - target).square().mean())
    assert with_adapter < 0.99 * without, (with_adapter, without)
    # PEFT's init has B = 0, and one step at 1e-12 moves it by about 1e-12: B is the copy's.
    assert max(float(t.abs().max()) for n, t in tuned.named_parameters() if "lora_B" in n) > 1e-4


def test_float_weights_follow_awqs_scales_and_refuse_another_model(tmp_path):
    from safetensors.torch import save_file

    from oliveflow.lora_init import AWQ_TRANSFORMS, FloatWeights, save_transforms

    base, model = tmp_path / "base", tmp_path / "model"
    base.mkdir(), model.mkdir()
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) + 1
    save_file({"layers.0.q.weight": weight}, str(base / "model.safetensors"))
    columns, rows = torch.tensor([1.0, 2.0, 0.5, 4.0]), torch.tensor([0.25, 1.0, 3.0])
    save_transforms(model / AWQ_TRANSFORMS, {"layers.0.q": {"input_scale": columns, "output_scale": rows}})
    found = FloatWeights(base, model)("layers.0.q", (3, 4), torch.device("cpu"), torch.float64)
    assert torch.equal(found, (rows[:, None] * weight * columns[None, :]).double())
    with pytest.raises(ValueError, match=r"is \(3, 4\) in the float base .* and \(4, 4\) in the quantized model"):
        FloatWeights(base, model)("layers.0.q", (4, 4), torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match="has no layers.0.k.weight"):
        FloatWeights(base, model)("layers.0.k", (3, 4), torch.device("cpu"), torch.float64)

