"""Activation-aware weight quantization (AWQ, Lin et al., arXiv 2306.00978) in plain torch.

AWQ here is a float-to-float transform that runs *before* Olive's ``Rtn`` pass: it changes
the float weights so that round-to-nearest (same bits, group size and symmetry) loses less.

1. Scale search and folding. For each pair "previous op -> following linears" in a decoder
   layer, the input channels of the linears are multiplied by ``s = mean|x|**alpha``
   (normalised by ``sqrt(max(s) * min(s))``) and the previous op's output is divided by
   ``s``: the float model computes the same function, but salient channels (large
   activations) get a finer quantization grid. ``alpha`` is searched on a grid in [0, 1];
   ``alpha = 0`` is plain RTN, so the chosen scales never do worse on the calibration data.
2. Clipping search (optional). Each group of a weight row is clamped to ``ratio`` of its
   range where that lowers the group's output error on the calibration tokens.

Both searches can weigh each calibration token's error (``token_weights``: e.g. 1 where the next token is a
response token, less on the prompt, as ``quantize.prompt_weight`` does); the activation statistics stay unweighted.

The pseudo-quantizer in both searches is ``fake_quantize``: Olive's ``WeightQuantizer`` grid in
a third of the passes (bit-identical, tested), so the searches optimise the exact grid ``Rtn``
will produce. Work goes layer by layer (inputs
of layer ``i + 1`` are the float outputs of layer ``i``), as AutoAWQ does, so memory stays
at one layer's activations. Everything runs on the model's device.

Covered (each tested on a tiny model): Llama, Mistral, Qwen2, Qwen3, Gemma 1-3 style layers
(``q/k/v_proj``, ``gate/up/down_proj``) and Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``);
the final norm -> ``lm_head`` pair when the head is not tied to the embeddings. Skipped, and listed in the
report: the v -> o pair under grouped-query attention (v and o shapes differ), pairs whose
previous op is not a per-channel norm or linear, and norm folds that the norm's dtype cannot
store (Gemma's ``(1 + w)`` norms in 16-bit for large scales).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from oliveflow.errors import InputError

if TYPE_CHECKING:
    from olive.common.quant.utils import WeightQuantizer
    from transformers import PreTrainedModel

# The lm_head's outputs are vocabulary-wide: search it on a token subsample to bound memory.
HEAD_TOKENS = 2048
# Largest relative error a norm fold may introduce when stored in the norm's dtype.
FOLD_TOLERANCE = 1e-2
# A larger alpha (clip shrink) is taken only when it lowers the loss by more than this share (search_scales).
SCALE_MARGIN = 0.02
CLIP_MARGIN = 1e-3
# Weight elements per chunk of the clipping search (its [rows, groups, k] candidates: ~64 MB float32).
CLIP_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AwqSettings:
    """What AWQ searches for; bits / group_size / symmetric must match the Rtn pass that follows."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    grid: int = 20  # alpha in {0, 1/grid, ..., 1}; 10 lost 8% (GPU) / 5% (CPU) on the real model's stage
    clip: bool = True  # weight clipping search after scaling
    clip_grid: int = 20  # clip ratios 1, 1 - 1/clip_grid, ... (AutoAWQ's n_grid)
    clip_max_shrink: float = 0.5  # ratios stop above 1 - clip_max_shrink (AutoAWQ's max_shrink)
    search_tokens: int = 1024  # tokens the attention and MLP blocks run on per alpha (0: all calibration tokens)
    lm_head: bool = True  # also the final norm -> lm_head pair (Olive Rtn with lm_head=True)
    max_calibration_tokens: int = 4096
    calibration_seq_len: int = 512  # pack samples into rows of this many tokens (0: use them as given)
    layer_bits: tuple[tuple[str, int], ...] = ()  # ("layers.3", 8), ("lm_head", 8): units kept at other bits

    def validate(self) -> None:
        if self.bits not in (2, 4, 8):
            raise InputError(f"awq: bits={self.bits} is not supported; use 2, 4 or 8 (Olive's WeightQuantizer)")
        if self.group_size == 0 or self.group_size < -1:
            raise InputError(f"awq: group_size={self.group_size} is not supported; use a positive size or -1")
        if self.grid < 1 or self.clip_grid < 1:
            raise InputError("awq: grid and clip_grid must be >= 1")
        if not 0 <= self.clip_max_shrink < 1:
            raise InputError(f"awq: clip_max_shrink={self.clip_max_shrink} must be in [0, 1)")
        if self.search_tokens < 0 or self.max_calibration_tokens < 1 or self.calibration_seq_len < 0:
            raise InputError("awq: max_calibration_tokens must be >= 1, search_tokens and calibration_seq_len >= 0")

    def quantizer(self, unit: str | None = None) -> WeightQuantizer:
        """The grid of ``unit`` ("layers.3", "lm_head"): ``bits`` unless ``layer_bits`` says otherwise."""
        # Imported here: `olive` costs seconds to import and most callers of this module never search.
        from olive.common.quant.utils import WeightQuantizer

        bits = dict(self.layer_bits).get(unit, self.bits) if unit else self.bits
        return WeightQuantizer(bits=bits, symmetric=self.symmetric, group_size=self.group_size)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AwqGroupReport:
    """One scaled pair; losses are the block-output MSE on the calibration tokens."""

    name: str
    alpha: float
    loss_rtn: float  # alpha = 0, i.e. what Rtn alone would do
    loss_awq: float  # at the chosen alpha


@dataclass(frozen=True)
class AwqClipReport:
    """One clipped weight; losses are the mean per-group output MSE on the token sample."""

    name: str
    loss_before: float
    loss_after: float
    mean_ratio: float  # mean clip ratio over weight groups (1.0 = nothing clipped)


@dataclass(frozen=True)
class AwqLayerReport:
    name: str  # "layers.3" or "lm_head"
    groups: tuple[AwqGroupReport, ...]
    clips: tuple[AwqClipReport, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class AwqReport:
    """What apply_awq did. Plain dataclasses (no pydantic) so the module runs wherever torch does."""

    bits: int
    group_size: int
    symmetric: bool
    samples: int  # calibration rows after packing
    tokens: int
    layers: tuple[AwqLayerReport, ...]
    seconds: float
    # module name -> {"input_scale", "output_scale"}: how each scaled linear's float weight was changed
    transforms: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def alphas(self) -> dict[str, float]:
        return {f"{layer.name}.{g.name}": g.alpha for layer in self.layers for g in layer.groups}

    def to_dict(self) -> dict[str, Any]:
        report = dataclasses.asdict(dataclasses.replace(self, transforms={}))
        del report["transforms"]
        return report


# ---------------------------------------------------------------------------------------------
# Scale math
# ---------------------------------------------------------------------------------------------


def channel_scales(x_abs_mean: Tensor, alpha: float) -> Tensor:
    """Per-input-channel scales ``mean|x|**alpha``, normalised so that ``max * min == 1``, on a coarse grid.

    Computed in float64 and rounded to bfloat16 values (8 significant bits), so that the last-bit noise of
    activation statistics summed in another order (another device, another thread count) does not change
    them: the scaled weights, and so their int4 codes, come out the same. The clamp keeps dead channels
    from producing zero (or, after normalising, infinite) scales.
    """
    scales = x_abs_mean.double().pow(alpha).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return scales.to(torch.bfloat16).to(_wide(x_abs_mean).dtype)


@torch.no_grad()
def fake_quantize(quantizer: WeightQuantizer, tensor: Tensor) -> Tensor:
    """``quantizer.fake_quantize(tensor)``, bit for bit, in fewer passes over the weight.

    Olive's version makes about 15 full passes and a host sync per call; the searches call it
    (grid + 1) times per linear and once per clip ratio, which made it most of AWQ's CPU time.
    The steps and their order (divide, add the zero point, round, clamp, subtract, multiply) are
    Olive's ``find_qparams`` / ``quantize`` / ``dequantize``, so every rounding is the same.
    """
    shape = tensor.shape
    if quantizer.group_size == 0:
        groups = tensor.reshape(1, 1, -1)
    else:
        groups = tensor.reshape(shape[0], quantizer.get_num_groups(shape), -1)
    low, high = torch.aminmax(groups, dim=-1)
    low, high = low.clamp(max=0), high.clamp(min=0)
    if quantizer.symmetric:
        high = torch.maximum(-low, high)
        low = torch.where(low < 0, -high, low)
    empty = (low == 0) & (high == 0)
    low, high = low.masked_fill(empty, -1), high.masked_fill(empty, 1)
    scales = (high - low) / (quantizer.maxq - quantizer.minq)
    if quantizer.symmetric:
        zero = torch.full_like(scales, quantizer.midq)
    else:
        zero = torch.round(quantizer.minq - low / scales).clamp(quantizer.minq, quantizer.maxq)
    scales, zero = scales.unsqueeze(-1), zero.unsqueeze(-1)
    codes = torch.div(groups, scales).add_(zero).round_().clamp_(quantizer.minq, quantizer.maxq)
    return codes.sub_(zero).mul_(scales).reshape(shape)


def scaled_fake_quantize(weight: Tensor, scales: Tensor, quantizer: WeightQuantizer) -> Tensor:
    """``Q(W * s) / s``: the weight an input ``x`` effectively meets after folding ``s``.

    ``W * s`` is rounded to the weight's dtype first because that is what gets saved and what
    Olive's Rtn then quantizes (in that dtype).
    """
    scaled = (_wide(weight) * scales).to(weight.dtype)
    return (_wide(fake_quantize(quantizer, scaled)) / scales).to(weight.dtype)


def _wide(t: Tensor) -> Tensor:
    """At least float32 (float64 stays float64, so folds are exact to float64 precision in tests)."""
    return t if t.dtype == torch.float64 else t.float()


def _abs_mean(inputs: Sequence[Tensor]) -> Tensor:
    """Mean |x| per channel, summed in float64 (see ``channel_scales``)."""
    total = None
    count = 0
    for x in inputs:
        flat = x.reshape(-1, x.shape[-1]).double()
        part = flat.abs().sum(0)
        total = part if total is None else total + part
        count += flat.shape[0]
    assert total is not None
    return total / count


# ---------------------------------------------------------------------------------------------
# Folding: divide the previous op's outputs by s, multiply the next linears' input columns by s
# ---------------------------------------------------------------------------------------------


def norm_weight_offset(norm: nn.Module) -> float | None:
    """0.0 for norms computing ``w * f(x) (+ b)``, 1.0 for Gemma's ``(1 + w) * f(x)``, else None.

    Found by probing the module (not by class name) with an input of mean 0 and RMS 1, where
    RMSNorm and LayerNorm both reduce to their per-channel affine part.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or weight.numel() % 2:
        return None
    bias = getattr(norm, "bias", None)
    probe = torch.ones(weight.numel(), device=weight.device)
    probe[1::2] = -1
    out = norm(probe.to(weight.dtype)[None]).float().reshape(-1)
    shift = bias.float() if isinstance(bias, Tensor) else 0.0
    gain = (out - shift) * probe
    tolerance = 2e-2 * (1 + weight.float().abs())
    for offset in (0.0, 1.0):
        if bool(torch.all((gain - (weight.float() + offset)).abs() <= tolerance)):
            return offset
    return None


@dataclass
class NormFold:
    """Previous op is a per-channel norm: its gain (and bias) absorb ``1 / s``."""

    norm: nn.Module
    offset: float  # 1.0 for Gemma-style (1 + w) gains

    @torch.no_grad()
    def divide(self, scales: Tensor) -> None:
        weight = self.norm.weight
        gain = (_wide(weight) + self.offset) / scales
        weight.copy_((gain - self.offset).to(weight.dtype))
        bias = getattr(self.norm, "bias", None)
        if isinstance(bias, Tensor):
            bias.copy_((_wide(bias) / scales).to(bias.dtype))

    @torch.no_grad()
    def fold_error(self, scales: Tensor) -> float:
        """Relative error of the folded gain once stored in the norm's dtype (bf16 Gemma norms lose here)."""
        weight = self.norm.weight
        gain = (_wide(weight) + self.offset) / scales
        stored = _wide((gain - self.offset).to(weight.dtype)) + self.offset
        return float(((stored - gain).abs() / gain.abs().clamp(min=1e-12)).max())


@dataclass
class RowsFold:
    """Previous op is (a row range of) a linear: those output rows and their bias absorb ``1 / s``."""

    linear: nn.Linear
    rows: slice

    @torch.no_grad()
    def divide(self, scales: Tensor) -> None:
        weight = self.linear.weight[self.rows]
        weight.copy_((_wide(weight) / scales[:, None]).to(weight.dtype))
        if self.linear.bias is not None:
            bias = self.linear.bias[self.rows]
            bias.copy_((_wide(bias) / scales).to(bias.dtype))

    def fold_error(self, scales: Tensor) -> float:
        return 0.0  # a row scale keeps the row's relative precision in any float dtype


@dataclass
class ScaleGroup:
    """A previous op, the linears reading its output, and the block whose output is compared."""

    name: str
    prev: NormFold | RowsFold
    linears: list[nn.Linear]
    inspect: nn.Module  # block run in the search: the attention, the MLP or the linear itself
    input_key: str  # which captured input feeds ``inspect`` (see _LayerPlan.taps)

    @torch.no_grad()
    def fold(self, scales: Tensor, record: FoldRecord | None = None) -> None:
        self.prev.divide(scales)
        for linear in self.linears:
            weight = linear.weight
            weight.copy_((_wide(weight) * scales).to(weight.dtype))
        if record is not None:
            for linear in self.linears:
                record.multiply(linear, "input_scale", scales)
            if isinstance(self.prev, RowsFold):
                record.multiply(self.prev.linear, "output_scale", 1 / _wide(scales), self.prev.rows)


class FoldRecord:
    """What the folds did to each linear's float weight: ``diag(output_scale) @ W @ diag(input_scale)``."""

    def __init__(self) -> None:
        self.scales: dict[nn.Module, dict[str, Tensor]] = {}

    def multiply(self, linear: nn.Linear, kind: str, scales: Tensor, index: slice = slice(None)) -> None:
        entry = self.scales.setdefault(linear, {})
        if kind not in entry:
            size = linear.in_features if kind == "input_scale" else linear.out_features
            entry[kind] = torch.ones(size, dtype=torch.float64, device=scales.device)
        entry[kind][index] *= _wide(scales)

    def by_name(self, model: nn.Module) -> dict[str, dict[str, Tensor]]:
        names = {module: name for name, module in model.named_modules()}
        return {names[module]: kinds for module, kinds in self.scales.items()}


@dataclass
class ClipTarget:
    name: str
    linear: nn.Linear
    rows: slice  # q and k rows are left out: their error is amplified through softmax
    input_key: str


@dataclass
class _LayerPlan:
    groups: list[ScaleGroup] = field(default_factory=list)
    clips: list[ClipTarget] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # input key -> module whose first input is that key ("attn" also keeps the call's kwargs)
    taps: dict[str, nn.Module] = field(default_factory=dict)


def _linear(module: nn.Module | None, name: str) -> nn.Linear | None:
    child = getattr(module, name, None) if module is not None else None
    return child if isinstance(child, nn.Linear) else None


def _norm_fold(norm: nn.Module | None) -> NormFold | None:
    if norm is None:
        return None
    offset = norm_weight_offset(norm)
    return None if offset is None else NormFold(norm, offset)


def _attention_rows(config: Any, qkv: nn.Linear) -> tuple[slice, slice] | None:
    """(q+k rows, v rows) of a fused qkv projection, or None when the sizes do not add up."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    if q_rows + 2 * kv_rows != qkv.out_features:
        return None
    return slice(0, q_rows + kv_rows), slice(q_rows + kv_rows, q_rows + 2 * kv_rows)


def _plan_attention(layer: nn.Module, config: Any, plan: _LayerPlan) -> None:
    attn = getattr(layer, "self_attn", None)
    o_proj = _linear(attn, "o_proj")
    fused = _linear(attn, "qkv_proj")
    split = [_linear(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
    if fused is not None:
        inputs, names = [fused], "self_attn.qkv_proj"
        rows = _attention_rows(config, fused)
        v = RowsFold(fused, rows[1]) if rows else None
        if rows:
            plan.clips.append(ClipTarget("self_attn.qkv_proj[v]", fused, rows[1], "attn"))
    elif all(lin is not None for lin in split):
        inputs = [lin for lin in split if lin is not None]
        names = "self_attn.{q,k,v}_proj"
        v = RowsFold(inputs[2], slice(0, inputs[2].out_features))
        plan.clips.append(ClipTarget("self_attn.v_proj", inputs[2], slice(None), "attn"))
    else:
        plan.skipped.append("attention: no qkv_proj or q/k/v_proj linears; not scaled or clipped")
        return
    plan.taps["attn"] = attn

    prev = _norm_fold(getattr(layer, "input_layernorm", None))
    if prev is None:
        plan.skipped.append(f"input_layernorm->{names}: previous op is not a per-channel norm")
    else:
        plan.groups.append(ScaleGroup(f"input_layernorm->{names}", prev, inputs, attn, "attn"))

    if o_proj is None:
        plan.skipped.append("self_attn.o_proj: not a linear; not scaled or clipped")
        return
    plan.taps["o"] = o_proj
    plan.clips.append(ClipTarget("self_attn.o_proj", o_proj, slice(None), "o"))
    v_name = "self_attn.qkv_proj[v]" if fused is not None else "self_attn.v_proj"
    if v is None:
        plan.skipped.append(f"{v_name}->self_attn.o_proj: cannot locate the v rows of the fused qkv_proj")
    elif v.linear.weight[v.rows].shape[0] != o_proj.in_features:
        # Grouped-query attention: one v row feeds several o_proj columns, so no per-channel scale fits.
        plan.skipped.append(f"{v_name}->self_attn.o_proj: grouped-query attention "
                            f"({v.linear.weight[v.rows].shape[0]} v rows, {o_proj.in_features} o_proj inputs)")
    else:
        plan.groups.append(ScaleGroup(f"{v_name}->self_attn.o_proj", v, [o_proj], o_proj, "o"))


def _plan_mlp(layer: nn.Module, plan: _LayerPlan) -> None:
    mlp = getattr(layer, "mlp", None)
    down = _linear(mlp, "down_proj")
    fused = _linear(mlp, "gate_up_proj")
    gate, up = _linear(mlp, "gate_proj"), _linear(mlp, "up_proj")
    if down is not None and fused is not None and fused.out_features == 2 * down.in_features:
        # Phi-3 splits gate_up_proj's output as (gate, up) = chunk(2): the up rows are the second half.
        inputs, names = [fused], "mlp.gate_up_proj"
        up_fold, up_name = RowsFold(fused, slice(down.in_features, 2 * down.in_features)), "mlp.gate_up_proj[up]"
        plan.clips.append(ClipTarget("mlp.gate_up_proj", fused, slice(None), "mlp"))
    elif down is not None and gate is not None and up is not None:
        inputs, names = [gate, up], "mlp.{gate,up}_proj"
        up_fold, up_name = RowsFold(up, slice(0, up.out_features)), "mlp.up_proj"
        plan.clips.append(ClipTarget("mlp.gate_proj", gate, slice(None), "mlp"))
        plan.clips.append(ClipTarget("mlp.up_proj", up, slice(None), "mlp"))
    else:
        plan.skipped.append("mlp: no gate/up/down projections (e.g. mixture of experts); not scaled or clipped")
        return
    plan.taps["mlp"] = mlp
    plan.taps["down"] = down
    plan.clips.append(ClipTarget("mlp.down_proj", down, slice(None), "down"))

    # Gemma 2/3 put post_attention_layernorm on the attention *output*; their MLP reads pre_feedforward_layernorm.
    norm_name = ("pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm")
                 else "post_attention_layernorm")
    prev = _norm_fold(getattr(layer, norm_name, None))
    if prev is None:
        plan.skipped.append(f"{norm_name}->{names}: previous op is not a per-channel norm")
    else:
        plan.groups.append(ScaleGroup(f"{norm_name}->{names}", prev, inputs, mlp, "mlp"))
    # Exact because the MLP computes act(gate) * up: scaling up's rows scales down's inputs.
    plan.groups.append(ScaleGroup(f"{up_name}->mlp.down_proj", up_fold, [down], down, "down"))


def plan_layer(layer: nn.Module, config: Any) -> _LayerPlan:
    """The scale groups and clip targets of one decoder layer, in the order they are searched."""
    plan = _LayerPlan()
    _plan_attention(layer, config, plan)
    _plan_mlp(layer, plan)
    return plan


def _head_is_tied(model: PreTrainedModel, head: nn.Linear) -> bool:
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    return isinstance(weight, Tensor) and weight.data_ptr() == head.weight.data_ptr()


def plan_head(model: PreTrainedModel, final_norm: nn.Module | None) -> _LayerPlan:
    plan = _LayerPlan()
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        plan.skipped.append("lm_head: not a linear")
        return plan
    if _head_is_tied(model, head):
        # Scaling or clipping the head would change the shared input embeddings too.
        plan.skipped.append("norm->lm_head: lm_head is tied to the input embeddings; not scaled or clipped")
        return plan
    plan.taps["head"] = head
    plan.clips.append(ClipTarget("lm_head", head, slice(None), "head"))
    prev = _norm_fold(final_norm)
    if prev is None:
        plan.skipped.append("norm->lm_head: the final norm is missing or not a per-channel norm")
    else:
        plan.groups.append(ScaleGroup("norm->lm_head", prev, [head], head, "head"))
    return plan


# ---------------------------------------------------------------------------------------------
# Searches
# ---------------------------------------------------------------------------------------------

BlockRunner = Callable[[Tensor, int], Tensor]  # (input of batch i, i) -> block output


@dataclass(frozen=True)
class ScaleSearch:
    alpha: float
    scales: Tensor
    loss_rtn: float
    loss_best: float
    rejected: int  # alphas whose fold the previous op's dtype cannot store


LossFn = Callable[[], float]  # the group's output MSE under the linears' current weights


def _block_loss(run: BlockRunner, inputs: Sequence[Tensor], limit: int, per_token: bool,
                weights: Sequence[Tensor] | None = None) -> LossFn:
    """MSE of the block's output against the float block's, on at most ``limit`` of the inputs' tokens.

    The block (attention, MLP) runs once per alpha, so its tokens set the search's cost; the channel
    statistics that define the scales still come from every calibration token. The sample is spread
    evenly: whole rows for the attention (its calls carry per-row masks and positions), tokens otherwise.
    ``weights`` (one per token, shaped like the inputs without their last dimension) weight each token's
    squared error; None weighs every token 1.
    """
    picked = _spread(inputs, limit, per_token, weights)
    targets = [_wide(run(x, i)) for i, x, _ in picked]

    def loss() -> float:
        total, count = 0.0, 0.0
        for (i, x, w), target in zip(picked, targets):
            error = (_wide(run(x, i)) - target).pow(2)
            if w is None:
                total += float(error.sum())
                count += target.numel()
            else:
                total += float((error.sum(-1) * w.reshape(error.shape[:-1])).sum())
                count += float(w.sum()) * target.shape[-1]
        return total / count

    return loss


def _linear_loss(linear: nn.Linear, inputs: Sequence[Tensor], weights: Sequence[Tensor] | None = None) -> LossFn:
    """The same MSE for a block that is one linear, from the inputs' Gram matrix ``G = X^T W X``.

    ``sum_t w_t ||x_t dW^T||^2 = sum(dW G * dW)``: each alpha then costs in^2 x out instead of
    tokens x in x out, and every calibration token counts.
    """
    gram, tokens = _gram(inputs, weights)
    reference = _wide(linear.weight).clone()

    def loss() -> float:
        delta = _wide(linear.weight) - reference
        return float(((delta @ gram) * delta).sum()) / (tokens * linear.out_features)

    return loss


def _gram(inputs: Sequence[Tensor], weights: Sequence[Tensor] | None = None) -> tuple[Tensor, float]:
    """``sum_t w_t x_t^T x_t`` and ``sum_t w_t`` (every ``w_t = 1`` without weights)."""
    gram, tokens = None, 0.0
    for j, x in enumerate(inputs):
        flat = _wide(x.reshape(-1, x.shape[-1]))
        if weights is None:
            part, count = flat.T @ flat, flat.shape[0]
        else:
            w = weights[j].reshape(-1, 1).to(flat.dtype)
            part, count = (flat * w).T @ flat, float(w.sum())
        gram = part if gram is None else gram + part
        tokens += count
    assert gram is not None
    return gram, tokens


def weighted_rows(x: Tensor, weights: Tensor | None) -> Tensor:
    """Rows of ``x`` scaled by ``sqrt(w / mean(w))``: a Gram matrix's mean over them is the weighted mean."""
    if weights is None:
        return x
    w = weights.reshape(-1).to(_wide(x).dtype)
    return _wide(x) * (w / w.mean()).sqrt().unsqueeze(-1)


def _spread(inputs: Sequence[Tensor], limit: int, per_token: bool,
            weights: Sequence[Tensor] | None = None) -> list[tuple[int, Tensor, Tensor | None]]:
    """(batch index, input, its token weights) holding about ``limit`` tokens, evenly spread over the inputs."""
    total = sum(x.shape[:-1].numel() for x in inputs)
    weight = (lambda j: None) if weights is None else (lambda j: weights[j])
    if total <= limit:
        return [(i, x, weight(i)) for i, x in enumerate(inputs)]
    if per_token:
        flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
        step = math.ceil(total / limit)
        w = None if weights is None else torch.cat([w.reshape(-1) for w in weights])[::step]
        return [(0, flat[::step], w)]
    keep = max(1, round(len(inputs) * limit / total))
    picks = sorted({round(j * (len(inputs) - 1) / max(1, keep - 1)) for j in range(keep)})
    return [(i, inputs[i], weight(i)) for i in picks]


@torch.no_grad()
def search_scales(group: ScaleGroup, inputs: Sequence[Tensor], run: BlockRunner,
                  quantizer: WeightQuantizer, grid: int, search_tokens: int | None = None,
                  weights: Sequence[Tensor] | None = None) -> ScaleSearch:
    """Grid-search alpha for one group; the group's weights are restored before returning.

    A block that is a single linear is scored exactly on every token (``_linear_loss``) when that is
    cheaper than running it; other blocks run on ``search_tokens`` tokens (None: all). ``weights``:
    each token's weight in the loss, aligned with ``inputs`` (None: all equal).
    """
    x_mean = _abs_mean(inputs)
    tokens = sum(x.shape[:-1].numel() for x in inputs)
    single = group.linears == [group.inspect] and isinstance(group.inspect, nn.Linear)
    if single and group.inspect.in_features < tokens:
        loss_of = _linear_loss(group.inspect, inputs, weights)
    else:
        loss_of = _block_loss(run, inputs, search_tokens or tokens, per_token=group.input_key != "attn",
                              weights=weights)
    originals = [linear.weight.detach().clone() for linear in group.linears]
    tried: list[tuple[float, float, Tensor]] = []
    rejected = 0
    try:
        for step in range(grid + 1):
            alpha = step / grid
            scales = channel_scales(x_mean, alpha)
            if step and group.prev.fold_error(scales) > FOLD_TOLERANCE:
                rejected += 1
                continue
            for linear, weight in zip(group.linears, originals):
                linear.weight.copy_(scaled_fake_quantize(weight, scales, quantizer))
            tried.append((alpha, loss_of(), scales))
    finally:
        for linear, weight in zip(group.linears, originals):
            linear.weight.copy_(weight)
    # The smallest alpha within SCALE_MARGIN of the lowest loss: attention outputs make the loss rugged in
    # alpha, and an argmin among near-equal values followed float noise (another device chose another alpha).
    lowest = min(loss for _, loss, _ in tried)
    alpha, loss, scales = next(t for t in tried if t[1] <= lowest * (1 + SCALE_MARGIN))
    return ScaleSearch(alpha=alpha, scales=scales, loss_rtn=tried[0][1], loss_best=loss, rejected=rejected)


@dataclass(frozen=True)
class ClipSearch:
    weight: Tensor  # the clipped rows, float32 (float64 for float64 inputs)
    loss_before: float
    loss_after: float
    mean_ratio: float


@torch.no_grad()
def search_clip(weight: Tensor, x: Tensor, quantizer: WeightQuantizer, *, grid: int = 20,
                max_shrink: float = 0.5) -> ClipSearch:
    """Per (row, group) clip ratio minimising that group's share of the output error.

    ``weight`` is [rows, in_features] in the dtype Rtn will see; ``x`` is [tokens, in_features].
    Symmetric grids clamp to ``+-ratio * absmax``, asymmetric ones to ``ratio * [min, max]``.
    Groups are independent under group-wise quantization, so the per-group choice is exact
    for the sum of per-group partial-output errors (AutoAWQ's objective). Each group's error is
    ``d G_g d^T / tokens`` with ``G_g`` the group's [k, k] Gram matrix of ``x``: a ratio costs
    rows x in x k, whatever the number of tokens.
    """
    rows, cols = weight.shape
    group_size = quantizer.group_size if quantizer.group_size > 0 else cols
    groups = cols // group_size
    xg = _wide(x).reshape(-1, groups, group_size).transpose(0, 1)  # [g, n, k]
    gram = torch.bmm(xg.transpose(1, 2), xg) / xg.shape[1]  # [g, k, k], the mean over tokens
    steps = max(1, int(max_shrink * grid))
    clipped = torch.empty(rows, cols, dtype=xg.dtype, device=weight.device)
    err_before = torch.empty(rows, groups, dtype=xg.dtype, device=weight.device)
    err_after = torch.empty(rows, groups, dtype=xg.dtype, device=weight.device)
    ratio_sum = 0.0
    chunk = max(1, CLIP_CHUNK_ELEMENTS // (groups * group_size))
    for start in range(0, rows, chunk):
        w = weight[start:start + chunk]
        wg = _wide(w).reshape(-1, groups, group_size).to(xg.dtype)  # [r, g, k]
        if quantizer.symmetric:
            hi = wg.abs().amax(-1, keepdim=True)
            lo = -hi
        else:
            hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
        best_err = torch.full(wg.shape[:2], math.inf, dtype=xg.dtype, device=w.device)
        best_ratio = torch.ones(*wg.shape[:2], 1, dtype=xg.dtype, device=w.device)
        for step in range(steps):
            ratio = 1 - step / grid
            candidate = torch.maximum(torch.minimum(wg, hi * ratio), lo * ratio)
            q = fake_quantize(quantizer, candidate.reshape(w.shape).to(weight.dtype)).to(xg.dtype)
            delta = (q.reshape(wg.shape) - wg).transpose(0, 1)  # [g, r, k]
            err = (torch.bmm(delta, gram) * delta).sum(-1).transpose(0, 1)  # [r, g]
            if step == 0:
                err_before[start:start + chunk] = err
            # A tighter clip must beat the best so far by CLIP_MARGIN: near-ties would follow float noise.
            better = err < best_err * (1 - CLIP_MARGIN)
            best_err = torch.where(better, err, best_err)
            best_ratio[better] = ratio
        clipped[start:start + chunk] = torch.maximum(torch.minimum(wg, hi * best_ratio),
                                                     lo * best_ratio).reshape(w.shape)
        err_after[start:start + chunk] = best_err
        ratio_sum += float(best_ratio.sum())
    return ClipSearch(weight=clipped, loss_before=float(err_before.mean()), loss_after=float(err_after.mean()),
                      mean_ratio=ratio_sum / (rows * groups))


# ---------------------------------------------------------------------------------------------
# Layer-by-layer driver
# ---------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last decoder layer's recorder: nothing after it needs to run."""


Call = tuple[tuple, dict]  # (positional args after hidden_states, kwargs) of one module call


def _split_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, Call]:
    kwargs = dict(kwargs)
    if "hidden_states" in kwargs:
        return kwargs.pop("hidden_states"), (args, kwargs)
    return args[0], (args[1:], kwargs)


def _decoder_parts(model: PreTrainedModel) -> tuple[nn.ModuleList, nn.Module | None]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise InputError(f"awq: {type(model).__name__} has no decoder layers at model.layers; "
                         "AWQ supports Llama/Mistral/Qwen/Gemma/Phi-3-style causal LMs")
    return layers, getattr(decoder, "norm", None)


def _calibration_batches(calibration: Sequence[Tensor], max_tokens: int, seq_len: int, device: torch.device,
                         weights: Sequence[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor] | None]:
    """[1, T] id batches holding at most ``max_tokens`` tokens in all, and their token weights (if given).

    With ``seq_len > 0`` the samples are concatenated and cut into rows of ``seq_len`` tokens,
    as AutoAWQ does: short samples one by one would make per-call overhead dominate the search.
    Rows must be unpadded (no attention mask is passed).
    """
    rows: list[Tensor] = []
    row_weights: list[Tensor] = []
    budget = max_tokens
    for index, sample in enumerate(calibration):
        ids = torch.as_tensor(sample)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.is_floating_point():
            raise InputError(f"awq: calibration items must be 1-D or [B, T] integer token ids, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        sample_weights = None
        if weights is not None:
            sample_weights = torch.as_tensor(weights[index], dtype=torch.float64).reshape(ids.shape)
            if bool((sample_weights < 0).any()) or not bool(sample_weights.isfinite().all()):
                raise InputError("awq: calibration token weights must be finite and >= 0")
        for r, row in enumerate(ids):
            row = row[:budget]
            if row.numel():
                rows.append(row.to(dtype=torch.long))
                if sample_weights is not None:
                    row_weights.append(sample_weights[r, :row.numel()])
                budget -= row.numel()
            if budget <= 0:
                break
        if budget <= 0:
            break
    if not rows:
        raise InputError("awq: calibration holds no tokens; pass at least one non-empty token sequence")
    if row_weights and not float(torch.cat(row_weights).sum()) > 0:
        raise InputError("awq: every calibration token weighs 0; give some tokens (the responses) a weight")
    if seq_len > 0:
        rows = list(torch.cat(rows).split(seq_len))
        row_weights = list(torch.cat(row_weights).split(seq_len)) if row_weights else []
    batches = [row[None].to(device) for row in rows]
    return batches, ([w[None].to(device) for w in row_weights] if weights is not None else None)


def _check_group_size(model: PreTrainedModel, layers: nn.ModuleList, settings: AwqSettings) -> None:
    """Fail before any search on the linears Rtn would refuse anyway."""
    if settings.group_size <= 0:
        return
    named = [(f"layers.{i}.{n}", m) for i, layer in enumerate(layers) for n, m in layer.named_modules()]
    head = model.get_output_embeddings()
    if settings.lm_head and head is not None:
        named.append(("lm_head", head))
    for name, module in named:
        if isinstance(module, nn.Linear) and module.in_features % settings.group_size:
            raise InputError(f"awq: {name} has {module.in_features} input features, not a multiple of "
                             f"group_size {settings.group_size}; choose a group_size that divides it")


def _capture_layer_inputs(model: PreTrainedModel, layers: nn.ModuleList,
                          batches: Sequence[Tensor]) -> tuple[list[Tensor], list[list[Call]]]:
    """Layer 0's hidden states and every layer's call arguments, per batch.

    Every layer's forward is swapped for a recorder that passes its input through, and the
    last one raises to stop the model: the embeddings run once and nothing else does. All
    layers are recorded, not just layer 0, because some models (Gemma 2/3, Qwen with sliding
    windows) pass each layer its own attention mask or position embeddings.
    """
    hidden: list[Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]
    saved = [layer.__dict__.get("forward") for layer in layers]

    def recorder(index: int) -> Callable[..., Tensor]:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            states, call = _split_hidden(args, kwargs)
            calls[index].append(call)
            if index == 0:
                hidden.append(states)
            if index == len(layers) - 1:
                raise _StopForward
            return states

        return forward

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer, forward in zip(layers, saved):
            del layer.forward
            if forward is not None:
                layer.forward = forward
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError("awq: the model did not call every decoder layer once per batch")
    return hidden, calls


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class _Captured:
    outputs: list[Tensor]
    inputs: dict[str, list[Tensor]]
    attn_calls: list[Call]
    weights: dict[str, list[Tensor]] | None = None  # token weights aligned with ``inputs`` (None: all equal)


def _run_layer(layer: nn.Module, plan: _LayerPlan, hidden: Sequence[Tensor], calls: Sequence[Call],
               weights: Sequence[Tensor] | None = None) -> _Captured:
    """Run the float layer once per batch, keeping its outputs and the inputs of every tap."""
    inputs: dict[str, list[Tensor]] = {key: [] for key in plan.taps}
    attn_calls: list[Call] = []

    def tap(key: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
            states, call = _split_hidden(args, kwargs)
            inputs[key].append(states)
            if key == "attn":
                attn_calls.append(call)

        return hook

    handles = [module.register_forward_pre_hook(tap(key), with_kwargs=True)
               for key, module in plan.taps.items() if key != "head"]
    try:
        outputs = [_first(layer(x, *args, **kwargs)) for x, (args, kwargs) in zip(hidden, calls)]
    finally:
        for handle in handles:
            handle.remove()
    # Only the attention needs per-batch calls (masks, positions); the rest runs on all tokens at once.
    for key in inputs:
        if key != "attn":
            inputs[key] = [torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[key]])]
    if weights is None:
        return _Captured(outputs, inputs, attn_calls)
    flat = [torch.cat([w.reshape(-1) for w in weights])]
    return _Captured(outputs, inputs, attn_calls, {key: list(weights) if key == "attn" else flat for key in inputs})


def _runner(group: ScaleGroup, captured: _Captured) -> BlockRunner:
    if group.input_key == "attn":
        def run_attention(x: Tensor, i: int) -> Tensor:
            args, kwargs = captured.attn_calls[i]
            return _first(group.inspect(x, *args, **kwargs))

        return run_attention
    return lambda x, _: _first(group.inspect(x))


def _token_sample(inputs: Sequence[Tensor], limit: int) -> Tensor:
    flat = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs])
    step = max(1, flat.shape[0] // limit)
    return flat[::step][:limit]


def _process(name: str, plan: _LayerPlan, captured: _Captured, settings: AwqSettings,
             record: FoldRecord | None = None) -> AwqLayerReport:
    """Search, fold and clip one layer's groups; the captured inputs follow each fold."""
    quantizer = settings.quantizer(name)
    groups: list[AwqGroupReport] = []
    skipped = list(plan.skipped)
    for group in plan.groups:
        xs = captured.inputs[group.input_key]
        weights = captured.weights[group.input_key] if captured.weights else None
        found = search_scales(group, xs, _runner(group, captured), quantizer, settings.grid,
                              settings.search_tokens or None, weights)
        if found.rejected:
            skipped.append(f"{group.name}: {found.rejected} alphas rejected, the fold would lose precision in "
                           f"the previous op's dtype")
        if found.alpha > 0:
            group.fold(found.scales, record)
            captured.inputs[group.input_key] = [(_wide(x) / found.scales).to(x.dtype) for x in xs]
        groups.append(AwqGroupReport(name=group.name, alpha=found.alpha, loss_rtn=found.loss_rtn,
                                     loss_awq=found.loss_best))
    clips: list[AwqClipReport] = []
    if settings.clip:
        for target in plan.clips:
            x = torch.cat([x.reshape(-1, x.shape[-1]) for x in captured.inputs[target.input_key]])
            if captured.weights:
                x = weighted_rows(x, torch.cat([w.reshape(-1) for w in captured.weights[target.input_key]]))
            rows = target.linear.weight[target.rows]
            found_clip = search_clip(rows, x, quantizer, grid=settings.clip_grid, max_shrink=settings.clip_max_shrink)
            rows.copy_(found_clip.weight.to(rows.dtype))
            clips.append(AwqClipReport(name=target.name, loss_before=found_clip.loss_before,
                                       loss_after=found_clip.loss_after, mean_ratio=found_clip.mean_ratio))
    return AwqLayerReport(name=name, groups=tuple(groups), clips=tuple(clips), skipped=tuple(skipped))


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def apply_awq(model: PreTrainedModel, calibration: Sequence[Tensor], settings: AwqSettings | None = None,
              progress: Callable[[int, int], None] | None = None,
              token_weights: Sequence[Tensor] | None = None) -> AwqReport:
    """Scale (and clip) ``model``'s float weights in place for a following Rtn pass; see the module doc.

    ``calibration``: 1-D or [1, T] (or unpadded [B, T]) token-id tensors from the task's own
    data; at most ``settings.max_calibration_tokens`` tokens are used. ``progress(done, total)``
    is called after each decoder layer (and the lm_head). ``token_weights``, shaped like
    ``calibration``: each position's weight in the searches' output error (e.g. 1 where the next
    token is a response token, less on the prompt); the channel statistics stay unweighted.
    """
    started = time.perf_counter()
    settings = settings or AwqSettings()
    settings.validate()
    layers, final_norm = _decoder_parts(model)
    _check_group_size(model, layers, settings)
    batches, batch_weights = _calibration_batches(calibration, settings.max_calibration_tokens,
                                                  settings.calibration_seq_len, _model_device(model), token_weights)
    head_plan = plan_head(model, final_norm) if settings.lm_head else None
    total = len(layers) + (1 if head_plan is not None else 0)

    was_training = model.training
    model.eval()
    record = FoldRecord()
    try:
        hidden, calls = _capture_layer_inputs(model, layers, batches)
        reports: list[AwqLayerReport] = []
        for index, layer in enumerate(layers):
            plan = plan_layer(layer, model.config)
            captured = _run_layer(layer, plan, hidden, calls[index], batch_weights)
            # The next layer reads the float outputs, computed before this layer is changed.
            hidden = captured.outputs
            calls[index] = []
            reports.append(_process(f"layers.{index}", plan, captured, settings, record))
            del captured
            if progress is not None:
                progress(index + 1, total)
        if head_plan is not None:
            if head_plan.taps:
                normed = [final_norm(h) if final_norm is not None else h for h in hidden]
                sample = _token_sample(normed, HEAD_TOKENS)
                weights = None if batch_weights is None else {"head": [_token_sample(
                    [w.unsqueeze(-1) for w in batch_weights], HEAD_TOKENS).reshape(-1)]}
                captured = _Captured(outputs=[], inputs={"head": [sample]}, attn_calls=[], weights=weights)
            else:
                captured = _Captured(outputs=[], inputs={}, attn_calls=[])
            reports.append(_process("lm_head", head_plan, captured, settings, record))
            if progress is not None:
                progress(total, total)
    finally:
        model.train(was_training)

    return AwqReport(bits=settings.bits, group_size=settings.group_size, symmetric=settings.symmetric,
                     samples=len(batches), tokens=sum(b.numel() for b in batches), layers=tuple(reports),
                     seconds=time.perf_counter() - started, transforms=record.by_name(model))
