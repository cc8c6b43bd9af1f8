"""Native AWQ (oliveflow.awq): the math against float64 references, exact folding on tiny models of
each covered architecture, planted activation outliers, the embedded model, and the hand-off to
Olive's Rtn pass.

The measured numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from oliveflow.awq import (
    AwqSettings,
    RowsFold,
    ScaleGroup,
    apply_awq,
    channel_scales,
    fake_quantize,
    norm_weight_offset,
    plan_head,
    plan_layer,
    scaled_fake_quantize,
    search_clip,
    search_scales,
)
from oliveflow.errors import InputError

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data" / "travel_train.jsonl"
EVAL = REPO / "data" / "travel_eval.jsonl"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # The matrices here are tiny: a second thread only adds synchronisation (10x slower on a busy 2-core box).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _quantizer(bits: int = 4, symmetric: bool = True, group_size: int = 32):
    from olive.common.quant.utils import WeightQuantizer

    return WeightQuantizer(bits=bits, symmetric=symmetric, group_size=group_size)


def _reference_fake_quantize(w: torch.Tensor, bits: int, symmetric: bool, group_size: int) -> torch.Tensor:
    """Olive's RTN grid written out group by group in float64, independently of its code."""
    maxq = 2**bits - 1
    out = torch.empty_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group_size):
            g = w[r, start:start + group_size].double()
            lo, hi = min(float(g.min()), 0.0), max(float(g.max()), 0.0)
            if symmetric:
                hi = max(-lo, hi)
                lo = -hi if lo < 0 else lo
            if lo == hi == 0:
                lo, hi = -1.0, 1.0
            scale = (hi - lo) / maxq
            zero = 2 ** (bits - 1) if symmetric else min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(g / scale + zero), 0, maxq)
            out[r, start:start + group_size] = (q - zero) * scale
    return out


# ---------------------------------------------------------------------------------------------
# 1. Math against float64 references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_olive_grid_is_the_documented_one(symmetric):
    """The pseudo-quantizer the search uses is Olive's, and Olive's grid is the one we reason about."""
    w = torch.randn(8, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w[0, :32] = w[0, :32].abs()  # an all-positive group: symmetric grids clip its top
    w[1, 32:] = 0  # an all-zero group
    olive = _quantizer(4, symmetric, 32).fake_quantize(w)
    assert torch.allclose(olive, _reference_fake_quantize(w, 4, symmetric, 32), rtol=0, atol=1e-12)


def test_channel_scales_match_float64_reference():
    x_mean = torch.rand(96, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 10
    x_mean[3] = 0.0  # a dead channel
    for alpha in (0.0, 0.35, 1.0):
        expected = torch.tensor([max(float(v) ** alpha, 1e-4) for v in x_mean], dtype=torch.float64)
        expected /= math.sqrt(float(expected.max()) * float(expected.min()))
        got = channel_scales(x_mean, alpha)
        assert got.dtype == torch.float64
        assert torch.equal(got, expected.to(torch.bfloat16).double()), "the float64 values, on bfloat16's grid"
    assert torch.equal(channel_scales(x_mean, 0.0), torch.ones_like(x_mean)), "alpha 0 must be plain RTN"


def test_channel_scales_ignore_the_last_bits_of_the_statistics():
    """Statistics summed in another order (another device or thread count) differ in their last bits; the scales,
    and so the scaled weights and their codes, must not."""
    x_mean = torch.rand(576, dtype=torch.float32, generator=torch.Generator().manual_seed(2)) * 10
    noisy = x_mean * (1 + 1e-7 * torch.randn(576, generator=torch.Generator().manual_seed(3)))
    changed = sum(not torch.equal(channel_scales(x_mean, a / 20), channel_scales(noisy, a / 20)) for a in range(21))
    assert changed <= 1, f"{changed} of 21 alphas changed their scales under float32 noise"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("bits", "symmetric", "group_size"),
                         [(4, True, 32), (4, False, 32), (4, True, 64), (8, False, 128), (4, True, -1), (2, False, 0)])
def test_fake_quantize_is_olives_bit_for_bit(bits, symmetric, group_size, dtype):
    """The searches' fast pseudo-quantizer must be Olive's grid exactly: same codes, scales and roundings,
    including the corner cases (all-zero groups, groups with no negative weight)."""
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(96, 256, generator=gen) * 0.05
    w[:, :32] = w[:, :32].abs()  # a group with no negative weight
    w[3, :128] = 0  # all-zero groups
    w[5, 7] = 4.0  # an outlier
    w = w.to(dtype)
    quantizer = _quantizer(bits, symmetric, group_size)
    expected = quantizer.fake_quantize(w)
    found = fake_quantize(quantizer, w)
    assert found.dtype == expected.dtype and torch.equal(found, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "symmetric", "group_size"),
                         [(4, True, 32), (4, False, 32), (8, False, 128), (4, True, -1), (2, False, 0)])
def test_find_qparams_is_olives_on_a_cpu_and_the_same_on_a_gpu(bits, symmetric, group_size, dtype):
    """oliveflow's find_qparams (installed on Olive's WeightQuantizer) gives Olive's own scales and zero points
    bit for bit on a CPU, and, where a GPU is present, the CPU's on the GPU too (Olive's own did not: it
    divides by a Python number, which CUDA turns into a multiplication by its reciprocal)."""
    from olive.common.quant.utils import WeightQuantizer

    from oliveflow.olive_ext import OLIVE_FIND_QPARAMS

    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(96, 256, generator=gen) * 0.05
    w[:, :32] = w[:, :32].abs()  # a group with no negative weight
    w[3, :128] = 0  # all-zero groups
    w[5, 7] = -4.0  # a negative outlier: its group's largest magnitude, at a rounding tie
    w = w.to(dtype)
    quantizer = _quantizer(bits, symmetric, group_size)
    assert WeightQuantizer.find_qparams is not OLIVE_FIND_QPARAMS
    scales, zeros = quantizer.find_qparams(w)
    olive_scales, olive_zeros = OLIVE_FIND_QPARAMS(quantizer, w)
    assert torch.equal(scales, olive_scales) and torch.equal(zeros, olive_zeros)
    if torch.cuda.is_available():
        gpu_scales, gpu_zeros = quantizer.find_qparams(w.cuda())
        assert torch.equal(gpu_scales.cpu(), scales) and torch.equal(gpu_zeros.cpu(), zeros)
        assert torch.equal(quantizer.quantize(w.cuda(), gpu_scales, gpu_zeros).cpu(), quantizer.quantize(w, scales, zeros))


def test_scaled_fake_quantize_is_q_of_ws_over_s():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, dtype=torch.float64, generator=gen)
    s = torch.rand(64, dtype=torch.float64, generator=gen) * 4 + 0.25
    expected = _reference_fake_quantize(w * s, 4, True, 32) / s
    assert torch.allclose(scaled_fake_quantize(w, s, _quantizer()), expected, rtol=0, atol=1e-12)


def _probe_group(linear: nn.Linear) -> ScaleGroup:
    # The previous op only matters when folding; a throwaway linear stands in for it.
    stand_in = nn.Linear(4, linear.in_features).to(linear.weight.dtype)
    return ScaleGroup("probe", RowsFold(stand_in, slice(None)), [linear], linear, "x")


def test_scale_search_matches_brute_force_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, dtype=torch.float64, generator=gen)
    x[:, [5, 40]] *= 30  # salient channels, so the best alpha is not 0
    linear = nn.Linear(64, 48, bias=False).double()
    linear.weight.data = torch.randn(48, 64, dtype=torch.float64, generator=gen) * 0.05
    original = linear.weight.detach().clone()
    reference_out = x @ original.T
    x_mean = x.abs().mean(0)
    losses = []
    for step in range(21):
        s = x_mean ** (step / 20)
        s = s.clamp(min=1e-4)
        s = (s / torch.sqrt(s.max() * s.min())).to(torch.bfloat16).double()
        effective = _reference_fake_quantize(original * s, 4, True, 32) / s
        losses.append(float(((x @ effective.T) - reference_out).pow(2).mean()))
    # the smallest alpha within 2% (SCALE_MARGIN) of the lowest loss
    best = next(i for i in range(21) if losses[i] <= min(losses) * 1.02)

    found = search_scales(_probe_group(linear), [x], lambda inp, _: linear(inp), _quantizer(), grid=20)
    assert found.alpha == best / 20 and found.alpha > 0
    assert found.loss_rtn == pytest.approx(losses[0], rel=1e-9)
    assert found.loss_best == pytest.approx(losses[best], rel=1e-9)
    assert torch.equal(linear.weight, original), "the search restores the weights"


def test_scale_search_scores_a_block_like_a_linear_and_on_a_token_spread():
    """A single-linear block is scored from X^T X; any other block is run. Both give the same losses, and
    ``search_tokens`` scores the block on an even spread of the tokens (float64)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 64, dtype=torch.float64, generator=gen)
    x[:, [3, 50]] *= 20
    linear = nn.Linear(64, 32, bias=False).double()
    linear.weight.data = torch.randn(32, 64, dtype=torch.float64, generator=gen) * 0.05
    as_linear = search_scales(_probe_group(linear), [x], lambda inp, _: linear(inp), _quantizer(), grid=10)
    block = nn.Sequential(linear)  # the same function, but not "the linear itself": run, not a Gram product
    group = ScaleGroup("probe", _probe_group(linear).prev, [linear], block, "x")
    as_block = search_scales(group, [x], lambda inp, _: block(inp), _quantizer(), grid=10)
    assert as_block.alpha == as_linear.alpha
    assert as_block.loss_rtn == pytest.approx(as_linear.loss_rtn, rel=1e-9)
    assert as_block.loss_best == pytest.approx(as_linear.loss_best, rel=1e-9)

    spread = search_scales(group, [x], lambda inp, _: block(inp), _quantizer(), grid=10, search_tokens=128)
    sample = x[::4]  # 512 tokens, 128 asked: every 4th
    weight = linear.weight.detach()
    effective = scaled_fake_quantize(weight, channel_scales(x.abs().mean(0), 0.0), _quantizer())
    expected_rtn = float((sample @ effective.T - sample @ weight.T).pow(2).mean())
    assert spread.loss_rtn == pytest.approx(expected_rtn, rel=1e-9)


def test_attention_blocks_are_scored_on_whole_rows_spread_over_the_calibration():
    from oliveflow.awq import _spread

    rows = [torch.full((1, 512, 8), float(i)) for i in range(8)]  # 8 rows of 512 tokens, as AWQ packs them
    picked = _spread(rows, 1024, per_token=False)
    assert [i for i, _, _ in picked] == [0, 7] and all(x.shape == (1, 512, 8) for _, x, _ in picked)
    assert [i for i, _, _ in _spread(rows, 2048, per_token=False)] == [0, 2, 5, 7]
    assert len(_spread(rows, 10**6, per_token=False)) == 8
    weights = [torch.full((1, 512), float(i)) for i in range(8)]
    assert [float(w[0, 0]) for _, _, w in _spread(rows, 1024, per_token=False, weights=weights)] == [0.0, 7.0]


def test_token_weights_weigh_each_tokens_error_in_every_loss():
    """0/1 weights score exactly the tokens weighing 1; the Gram form and the block form agree with brute force."""
    from oliveflow.awq import _block_loss, _linear_loss, weighted_rows

    gen = torch.Generator().manual_seed(7)
    linear = torch.nn.Linear(16, 8, bias=False).double()
    x = torch.randn(40, 16, dtype=torch.float64, generator=gen)
    w = (torch.rand(40, generator=gen) > 0.5).double() * 0.75 + 0.25  # 0.25 on "prompt", 1 on "response"
    keep = torch.rand(40, generator=gen) > 0.4
    binary = keep.double()
    reference = linear.weight.detach().clone()
    losses = {"weighted": _linear_loss(linear, [x], [w]), "binary": _linear_loss(linear, [x], [binary]),
              "subset": _linear_loss(linear, [x[keep]]),
              "block": _block_loss(lambda t, _: linear(t), [x], 10**6, per_token=True, weights=[binary])}
    with torch.no_grad():
        linear.weight.add_(torch.randn(8, 16, dtype=torch.float64, generator=gen) * 0.1)
    error = ((x @ (linear.weight - reference).T) ** 2).sum(-1)
    assert losses["weighted"]() == pytest.approx(float((error * w).sum() / (w.sum() * 8)), rel=1e-12)
    assert losses["binary"]() == pytest.approx(losses["subset"](), rel=1e-12)
    assert losses["block"]() == pytest.approx(losses["subset"](), rel=1e-12)
    # The clip search's Gram mean over weighted rows is the weighted mean of x^T x.
    rows = weighted_rows(x, w)
    assert torch.allclose(rows.T @ rows / 40, (x * w[:, None]).T @ x / w.sum())


def test_calibration_weights_follow_the_packing_and_bad_weights_are_refused():
    from oliveflow.awq import _calibration_batches

    ids = [torch.arange(5), torch.arange(10, 17)]
    weights = [torch.tensor([0.0, 0, 1, 1, 1]), torch.tensor([0.0, 1, 1, 1, 1, 1, 0])]
    batches, packed = _calibration_batches(ids, 10, 4, torch.device("cpu"), weights)
    assert [b.tolist() for b in batches] == [[[0, 1, 2, 3]], [[4, 10, 11, 12]], [[13, 14]]]
    assert [p.tolist() for p in packed] == [[[0, 0, 1, 1]], [[1, 0, 1, 1]], [[1, 1]]]
    assert _calibration_batches(ids, 10, 4, torch.device("cpu"))[1] is None
    with pytest.raises(InputError, match="weighs 0"):
        _calibration_batches(ids, 10, 4, torch.device("cpu"), [torch.zeros(5), torch.zeros(7)])
    with pytest.raises(InputError, match=">= 0"):
        _calibration_batches(ids, 10, 4, torch.device("cpu"), [-torch.ones(5), torch.ones(7)])


def test_response_weights_mark_the_positions_that_predict_response_tokens():
    from oliveflow.olive_ext import response_weights

    labels = torch.tensor([[-100, -100, -100, 7, 8, 9]])  # the response is the last three tokens
    assert response_weights(labels, 0.25).tolist() == [[0.25, 0.25, 1.0, 1.0, 1.0, 0.25]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_matches_brute_force_float64(symmetric):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(6, 64, dtype=torch.float64, generator=gen)
    w[:, 7] *= 6  # a weight outlier per row: clipping it can pay off
    x = torch.randn(200, 64, dtype=torch.float64, generator=gen)
    found = search_clip(w, x, _quantizer(4, symmetric, 32), grid=20, max_shrink=0.5)

    expected = w.clone()
    before, after = [], []
    for r in range(6):
        for start in (0, 32):
            g, xg = w[r, start:start + 32], x[:, start:start + 32]
            hi, lo = (g.abs().max(), -g.abs().max()) if symmetric else (g.max(), g.min())
            errors = []
            for step in range(10):
                ratio = 1 - step / 20
                clipped = torch.clamp(g, lo * ratio, hi * ratio)
                q = _reference_fake_quantize(clipped[None], 4, symmetric, 32)[0]
                errors.append((float((xg @ q - xg @ g).pow(2).mean()), step, clipped))
            best = min(errors, key=lambda e: (e[0], e[1]))
            expected[r, start:start + 32] = best[2]
            before.append(errors[0][0])
            after.append(best[0])
    assert torch.allclose(found.weight, expected, rtol=0, atol=1e-12)
    assert found.loss_before == pytest.approx(sum(before) / len(before), rel=1e-9)
    assert found.loss_after == pytest.approx(sum(after) / len(after), rel=1e-9)
    assert found.loss_after < found.loss_before and found.mean_ratio < 1


# ---------------------------------------------------------------------------------------------
# Folding is exact (float64) on each covered architecture
# ---------------------------------------------------------------------------------------------


def _common(**extra) -> dict:
    return dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, **extra)


def _phi3() -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_common(num_key_value_heads=4, tie_word_embeddings=False,
                                                bos_token_id=1, eos_token_id=2, pad_token_id=0)))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(num_key_value_heads=4, tie_word_embeddings=False)))


def _qwen2_gqa() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(num_key_value_heads=2, tie_word_embeddings=False)))


def _gemma() -> nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM(GemmaConfig(**_common(num_key_value_heads=4, head_dim=32)))


# Sliding windows shorter than the test sequences: layers get different masks (and, in Gemma 3,
# different position embeddings), which the layer-by-layer replay must reproduce.
_SLIDING = dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def _gemma2() -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_common(num_key_value_heads=4, head_dim=32, **_SLIDING)))


def _gemma3() -> nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(**_common(num_key_value_heads=4, head_dim=32, **_SLIDING)))


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(num_key_value_heads=4, sliding_window=8,
                                                      tie_word_embeddings=False)))


def _qwen3_gqa() -> nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**_common(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "phi3": _phi3, "llama": _llama, "mistral": _mistral, "qwen2-gqa": _qwen2_gqa, "qwen3-gqa": _qwen3_gqa,
    "gemma": _gemma, "gemma2": _gemma2, "gemma3": _gemma3,
}
GQA = {"qwen2-gqa", "qwen3-gqa"}
TIED_HEAD = {"gemma", "gemma2", "gemma3"}


def _tiny(builder: Callable[[], nn.Module], dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = builder().to(dtype).eval()
    with torch.no_grad():
        # Non-trivial norm gains, so that a wrong fold (w / s vs (1 + w) / s - 1) shows.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.rand_like(param) - 0.5)
    return model


def _ids(seed: int, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folding_random_scales_leaves_the_float_model_unchanged(arch):
    model = _tiny(ARCHITECTURES[arch])
    ids = _ids(5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        gen = torch.Generator().manual_seed(6)
        folded = []
        plans = [plan_layer(layer, model.config) for layer in model.model.layers]
        plans.append(plan_head(model, model.model.norm))
        for plan in plans:
            for group in plan.groups:
                width = group.linears[0].in_features
                group.fold(torch.exp(torch.randn(width, dtype=torch.float64, generator=gen)))  # 0.1x..10x
                folded.append(group.name)
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=0, atol=1e-5), (after - before).abs().max()
    skipped = [s for plan in plans for s in plan.skipped]
    # Every pair the architecture allows was folded; the rest is named in `skipped`.
    expected_per_layer = 3 if arch in GQA else 4
    assert len(folded) == 2 * expected_per_layer + (0 if arch in TIED_HEAD else 1), folded
    assert sum("grouped-query attention" in s for s in skipped) == (2 if arch in GQA else 0)
    assert any("tied" in s for s in skipped) == (arch in TIED_HEAD)
    if arch in ("gemma2", "gemma3"):
        assert any(name.startswith("pre_feedforward_layernorm->") for name in folded), folded


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layer_by_layer_replay_reproduces_the_model(arch):
    """Each layer is replayed with the arguments the model gave *that* layer (masks differ per layer type)."""
    from oliveflow.awq import _capture_layer_inputs, _decoder_parts, _run_layer

    model = _tiny(ARCHITECTURES[arch])
    ids = _ids(13)
    with torch.no_grad():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states
        layers, final_norm = _decoder_parts(model)
        hidden, calls = _capture_layer_inputs(model, layers, [ids[:1], ids[1:]])
        for index, layer in enumerate(layers):
            hidden = _run_layer(layer, plan_layer(layer, model.config), hidden, calls[index]).outputs
            got = torch.cat(hidden)
            if index == len(layers) - 1:
                got = final_norm(got)  # transformers reports the last hidden state after the final norm
            assert torch.allclose(got, expected[index + 1], rtol=0, atol=1e-10)


def test_norm_offset_detection():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert norm_weight_offset(LlamaRMSNorm(64)) == 0.0
    assert norm_weight_offset(GemmaRMSNorm(64)) == 1.0
    assert norm_weight_offset(nn.LayerNorm(64)) == 0.0
    assert norm_weight_offset(nn.Identity()) is None


def test_bf16_gemma_norm_folds_that_lose_precision_are_refused():
    """(1 + w) / s - 1 near -1 keeps ~2 significant bits in bf16; w / s keeps all 8."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from oliveflow.awq import FOLD_TOLERANCE, NormFold

    scales = torch.full((64,), 20.0)
    assert NormFold(GemmaRMSNorm(64).to(torch.bfloat16), 1.0).fold_error(scales) > FOLD_TOLERANCE
    assert NormFold(LlamaRMSNorm(64).to(torch.bfloat16), 0.0).fold_error(scales) < FOLD_TOLERANCE
    assert NormFold(GemmaRMSNorm(64), 1.0).fold_error(scales) < FOLD_TOLERANCE  # float32 stores it fine


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_apply_awq_without_clipping_keeps_the_float_function(arch):
    """Scaling alone is an exact re-parametrisation: only quantization sees the difference."""
    model = _tiny(ARCHITECTURES[arch])
    _plant_outliers(model)
    ids = _ids(7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    report = apply_awq(model, list(_ids(8, batch=4, length=64)), AwqSettings(clip=False))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert any(alpha > 0 for alpha in report.alphas.values()), report.alphas
    assert torch.allclose(after, before, rtol=0, atol=1e-5), (after - before).abs().max()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_apply_awq_records_how_each_float_weight_was_scaled(arch):
    """``report.transforms`` (what finetune.init error rebuilds the float weights from): every scaled linear's
    new weight is ``diag(output_scale) @ W @ diag(input_scale)`` of its old one; the others did not change."""
    model = _tiny(ARCHITECTURES[arch])
    _plant_outliers(model)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = apply_awq(model, list(_ids(8, batch=4, length=64)), AwqSettings(clip=False))
    assert report.transforms and set(report.transforms) <= set(before)
    assert any("output_scale" in kinds for kinds in report.transforms.values()), "v->o or up->down folds"
    for name, old in before.items():
        new = dict(model.named_modules())[name].weight.detach()
        kinds = report.transforms.get(name, {})
        rebuilt = old * kinds.get("input_scale", torch.ones(old.shape[1], dtype=old.dtype))[None, :]
        rebuilt = rebuilt * kinds.get("output_scale", torch.ones(old.shape[0], dtype=old.dtype))[:, None]
        assert torch.allclose(rebuilt, new, rtol=1e-12, atol=0), (name, (rebuilt - new).abs().max())
    assert "transforms" not in report.to_dict()


# ---------------------------------------------------------------------------------------------
# 2. Planted activation outliers
# ---------------------------------------------------------------------------------------------


def _plant_outliers(model: nn.Module, channels: int = 4, factor: float = 50.0) -> None:
    """A few hidden channels 50x larger after every norm, as in real LLMs' activation outliers."""
    hidden = model.config.hidden_size
    picked = torch.randperm(hidden, generator=torch.Generator().manual_seed(9))[:channels]
    with torch.no_grad():
        for name, module in model.named_modules():
            # Hidden-size norms only (not Qwen3's / Gemma 3's per-head q_norm and k_norm).
            if name.endswith("norm") and module.weight.numel() == hidden:
                module.weight[picked] *= factor


def _fake_quantize_linears(model: nn.Module, group_size: int, symmetric: bool = True) -> None:
    """What Olive's Rtn with lm_head=True does to the function: every nn.Linear on its grid."""
    quantizer = _quantizer(4, symmetric, group_size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(quantizer.fake_quantize(module.weight))


def test_awq_beats_rtn_on_a_linear_with_outlier_channels():
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(1024, 128, generator=gen)
    x[:, torch.randperm(128, generator=gen)[:4]] *= 50
    linear = nn.Linear(128, 256, bias=False)
    linear.weight.data = torch.randn(256, 128, generator=gen) * 0.05
    for group_size in (32, 128):
        found = search_scales(_probe_group(linear), [x], lambda inp, _: linear(inp),
                              _quantizer(group_size=group_size), grid=20)
        ratio = found.loss_best / found.loss_rtn
        print(f"\nlinear, 4/128 channels x50, gs {group_size}: output MSE rtn {found.loss_rtn:.4g} "
              f"awq {found.loss_best:.4g} ratio {ratio:.2f} (alpha {found.alpha})")
        assert ratio < 0.7


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_beats_rtn_on_a_model_with_outlier_channels(group_size):
    def planted() -> nn.Module:
        model = _tiny(_llama, torch.float32)
        _plant_outliers(model)
        return model

    calibration = list(_ids(11, batch=8, length=128))
    held_out = _ids(12, batch=4, length=64)
    with torch.no_grad():
        reference = planted()(input_ids=held_out).logits
    errors = {}
    for name, settings in (("rtn", None), ("awq-scale", AwqSettings(group_size=group_size, clip=False)),
                           ("awq", AwqSettings(group_size=group_size))):
        model = planted()
        if settings is not None:
            apply_awq(model, calibration, settings)
        _fake_quantize_linears(model, group_size)
        with torch.no_grad():
            errors[name] = float((model(input_ids=held_out).logits - reference).pow(2).mean())
    print(f"\nllama 4/128 channels x50, gs {group_size}, held-out logits MSE: "
          + ", ".join(f"{k} {v:.4g}" for k, v in errors.items())
          + f"; ratio awq/rtn {errors['awq'] / errors['rtn']:.2f}, "
          + f"scale only {errors['awq-scale'] / errors['rtn']:.2f}")
    assert errors["awq"] < 0.7 * errors["rtn"]
    assert errors["awq-scale"] < errors["rtn"]


# ---------------------------------------------------------------------------------------------
# 3. The embedded default model, 4. the hand-off to Olive's Rtn
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    from oliveflow.tiny_model import TinyModelParams, build_tiny_model

    # 150 steps: after 40 (the shared fixture) int4 barely moves the perplexity, so nothing is measured.
    # One thread builds the same model (deterministic kernels) ~4x faster than two on a busy 2-core box.
    params = TinyModelParams(steps=150, num_threads=1)
    return build_tiny_model([TRAIN], tmp_path_factory.mktemp("awq") / "tiny", params=params)


def _texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [f"{row['prompt']}\n{row['response']}" for row in rows]


def _encode(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer.encode(text, add_special_tokens=False)) for text in texts]


def _perplexity(model: nn.Module, sequences: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            loss = model(input_ids=ids[None], labels=ids[None]).loss
            nll += float(loss) * (ids.numel() - 1)
            count += ids.numel() - 1
    return math.exp(nll / count)


def test_awq_on_the_embedded_model_searches_every_layer(embedded):
    """The whole driver on a real checkpoint: progress, report, finite perplexity.

    AWQ against RTN is not judged here: on this toy they differ by ~0.03% in perplexity, the sign flips
    between machines and search sizes, so such an assert tests noise. Quality is judged on the real model
    (bench/bench_awq_sizing.py, several calibration draws).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded)
    calibration = _encode(tokenizer, _texts(TRAIN))
    evaluation = _encode(tokenizer, _texts(EVAL))

    model = AutoModelForCausalLM.from_pretrained(embedded).eval()
    ppl_float = _perplexity(model, evaluation)
    _fake_quantize_linears(model, 32)
    ppl_rtn = _perplexity(model, evaluation)

    model = AutoModelForCausalLM.from_pretrained(embedded).eval()
    calls = []
    started = time.perf_counter()
    report = apply_awq(model, calibration, AwqSettings(group_size=32), progress=lambda d, t: calls.append((d, t)))
    seconds = time.perf_counter() - started
    _fake_quantize_linears(model, 32)
    ppl_awq = _perplexity(model, evaluation)

    print(f"\nembedded model (150 steps), int4 gs32 sym, eval perplexity: float {ppl_float:.3f} "
          f"rtn {ppl_rtn:.3f} awq+rtn {ppl_awq:.3f}; apply_awq {seconds:.2f} s on {report.tokens} tokens")
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert report.tokens == 4096 and len(report.layers) == 3
    # What the driver recorded for each layer. Not "awq <= rtn" or "clipped <= unclipped": alpha 0 and ratio 1
    # are in the grids, so those hold by construction (the searches are checked against brute force above).
    for layer in report.layers:
        assert layer.groups or layer.clips, layer.name
        for g in layer.groups:
            assert 0 <= g.alpha <= 1 and math.isfinite(g.loss_rtn) and math.isfinite(g.loss_awq), g
        for c in layer.clips:
            assert 1 - AwqSettings().clip_max_shrink < c.mean_ratio <= 1 and math.isfinite(c.loss_after), c
    assert math.isfinite(ppl_awq) and ppl_awq < 2 * ppl_float


def test_olive_rtn_quantizes_the_awq_model_to_the_grid_awq_searched(embedded, tmp_path):
    """apply_awq -> save_pretrained -> Olive Rtn: the checkpoint loads and computes what the search assumed."""
    from olive.model import HfModelHandler
    from olive.workflows import run as olive_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded)
    model = AutoModelForCausalLM.from_pretrained(embedded).eval()
    apply_awq(model, _encode(tokenizer, _texts(TRAIN))[:64], AwqSettings(group_size=32))
    awq_dir = tmp_path / "awq"
    model.save_pretrained(awq_dir)
    tokenizer.save_pretrained(awq_dir)

    output = olive_run({
        "input_model": {"type": "HfModel", "model_path": str(awq_dir)},
        "passes": {"q": {"type": "Rtn", "bits": 4, "group_size": 32, "sym": True, "lm_head": True}},
        "output_dir": str(tmp_path / "olive"), "cache_dir": str(tmp_path / "olive-cache"),
        "log_severity_level": 3,
    })
    assert output is not None and output.has_output_model(), "Olive's Rtn produced no model"
    quantized_dir = Path(output.get_best_candidate().model_path)
    config = json.loads((quantized_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "olive"

    quantized = HfModelHandler(model_path=str(quantized_dir)).load_model().eval()
    _fake_quantize_linears(model, 32)
    ids = _encode(tokenizer, _texts(EVAL)[:4])
    with torch.no_grad():
        for seq in ids:
            expected = model(input_ids=seq[None]).logits
            actual = quantized(input_ids=seq[None]).logits
            assert torch.allclose(actual, expected, rtol=0, atol=1e-4), (actual - expected).abs().max()


# ---------------------------------------------------------------------------------------------
# Errors a person can act on
# ---------------------------------------------------------------------------------------------


def test_inputs_are_checked_before_any_search():
    model = _tiny(_llama, torch.float32)
    with pytest.raises(InputError, match="group_size 96"):
        apply_awq(model, [_ids(1)[0]], AwqSettings(group_size=96))
    with pytest.raises(InputError, match="no tokens"):
        apply_awq(model, [torch.tensor([], dtype=torch.long)], AwqSettings())
    with pytest.raises(InputError, match="bits"):
        apply_awq(model, [_ids(1)[0]], AwqSettings(bits=3))
