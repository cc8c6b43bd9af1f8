"""Mixed precision: which decoder layers (and the head) keep 8 bits, chosen by measurement within a size budget.

1. **Sensitivity.** Each unit (one decoder layer's linears, or the ``lm_head``) is quantized *alone*, with
   round-to-nearest on the run's grid, and the mean response-token loss of the model on calibration
   examples is measured. The unit's cost is that loss minus the float model's. Only the layers from the
   unit on are re-run: the float hidden states entering every layer are computed once.
2. **Choice.** Starting from every unit at the low bit width, units are promoted to 8 bits in order of
   cost per extra byte while the estimated shipped size stays within the budget
   (``quantize.size_budget`` x the 16-bit size of the model). A unit whose cost is not positive is never
   promoted.

The estimated shipped size counts what the CPU int4 graph stores: codes, float32 scales (one per group),
packed zero points when asymmetric, an input embedding shared with a quantized tied head (or float32
when untied), every other parameter in float32, the rotary caches and the graph's own description.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from oliveflow.awq import _capture_layer_inputs, _decoder_parts, _first, fake_quantize

if TYPE_CHECKING:
    from olive.common.quant.utils import WeightQuantizer
    from transformers import PreTrainedModel

HIGH_BITS = 8
SCALE_BYTES = 4  # float32 scales in the CPU graph (the CUDA graph stores float16: smaller)
# Node descriptions, names and shape constants per decoder layer in the graph: SmolLM2-135M's model.onnx was
# 274,518 bytes larger than its weights and rotary caches, over 30 layers.
GRAPH_BYTES_PER_LAYER = 10_000


@dataclass(frozen=True)
class Unit:
    name: str  # "layers.3" or "lm_head"
    modules: tuple[str, ...]  # full names of its linears, as Olive's overrides and ModelBuilder read them
    shapes: tuple[tuple[int, int], ...]  # (out, in) of each linear


@dataclass
class PrecisionPlan:
    """What was measured and chosen; saved beside the quantized model as ``precision_plan.json``."""

    low_bits: int
    high_bits: int
    budget_bytes: int  # size_budget x the 16-bit size
    size_16bit_bytes: int
    estimated_bytes: int  # with the promotions below
    all_low_bytes: int  # every unit at low_bits
    base_loss: float  # the float model's response loss on the calibration examples
    costs: dict[str, float] = field(default_factory=dict)  # unit -> loss increase when quantized alone
    promoted: list[str] = field(default_factory=list)
    tokens: int = 0

    def overrides(self, units: list[Unit]) -> dict[str, dict[str, int]]:
        """Olive's per-module ``overrides`` for the promoted units."""
        return {module: {"bits": self.high_bits} for unit in units if unit.name in self.promoted
                for module in unit.modules}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def units_of(model: PreTrainedModel) -> list[Unit]:
    """One unit per decoder layer (all its linears) and one for the head."""
    layers, _ = _decoder_parts(model)
    prefix = {id(m): name for name, m in model.named_modules()}
    units = []
    for i, layer in enumerate(layers):
        linears = [(f"{prefix[id(layer)]}.{n}", m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        units.append(Unit(f"layers.{i}", tuple(n for n, _ in linears),
                          tuple((m.out_features, m.in_features) for _, m in linears)))
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        units.append(Unit("lm_head", (prefix[id(head)],), ((head.out_features, head.in_features),)))
    return units


def linear_bytes(rows: int, cols: int, bits: int, group_size: int, symmetric: bool) -> int:
    groups_per_row = cols // group_size if group_size > 0 else 1
    zeros = 0 if symmetric else rows * math.ceil(groups_per_row * bits / 8)
    return rows * cols * bits // 8 + rows * groups_per_row * SCALE_BYTES + zeros


def _unit_bytes(unit: Unit, bits: int, group_size: int, symmetric: bool) -> int:
    return sum(linear_bytes(r, c, bits, group_size, symmetric) for r, c in unit.shapes)


def other_bytes(model: PreTrainedModel, units: list[Unit], tied: bool) -> int:
    """float32 bytes of everything in the graph that is not a unit's linear: the other parameters (an embedding
    tied to the head costs nothing), ModelBuilder's rotary cos/sin caches, and the graph itself."""
    quantized = {name for unit in units for name in unit.modules}
    embeddings = model.get_input_embeddings()
    total = 0
    for name, module in model.named_modules():
        if name in quantized or (tied and module is embeddings):
            continue
        total += sum(p.numel() for p in module.parameters(recurse=False)) * 4
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = 2 * getattr(config, "max_position_embeddings", 0) * (head_dim // 2) * 4
    return total + rotary + GRAPH_BYTES_PER_LAYER * (len(units) - 1)


def size_16bit(model: PreTrainedModel) -> int:
    return 2 * sum(p.numel() for p in model.parameters())  # a tied tensor is counted once


@torch.no_grad()
def measure_costs(model: PreTrainedModel, examples: list[tuple[Tensor, Tensor]], units: list[Unit],
                  quantizer: WeightQuantizer, progress: Callable[[], None] = lambda: None
                  ) -> tuple[float, dict[str, float], int]:
    """(float loss, {unit: loss increase when quantized alone}, response tokens) on ``examples``.

    ``examples``: ([1, T] token ids, [T] bool mask of the positions whose next token is a response token).
    ``progress()`` is called after each unit.
    """
    layers, norm = _decoder_parts(model)
    head = model.get_output_embeddings()
    device = next(model.parameters()).device
    batches = [ids.to(device) for ids, _ in examples]
    masks = [mask.to(device) for _, mask in examples]
    tokens = int(sum(int(m.sum()) for m in masks))
    was_training = model.training
    model.eval()
    try:
        hidden0, calls = _capture_layer_inputs(model, layers, batches)
        inputs = [hidden0]  # inputs[i]: float hidden states entering layer i, per batch
        for i, layer in enumerate(layers):
            inputs.append([_first(layer(x, *a, **k)) for x, (a, k) in zip(inputs[i], calls[i])])

        def loss_from(start: int) -> float:
            total = 0.0
            for b, ids in enumerate(batches):
                x = inputs[start][b]
                for i in range(start, len(layers)):
                    x = _first(layers[i](x, *calls[i][b][0], **calls[i][b][1]))
                # The head runs on the positions that predict a response token only: it is most of the cost.
                at = masks[b][:-1]
                logits = head((norm(x) if norm is not None else x)[0, :-1][at]).float()
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:][at], reduction="sum"))
            return total / max(tokens, 1)

        base = loss_from(len(layers))  # only the norm and head run
        modules = dict(model.named_modules())
        costs = {}
        for unit in units:
            saved = {}
            for name in unit.modules:
                weight = modules[name].weight
                saved[name] = weight.detach().clone()
                weight.copy_(fake_quantize(quantizer, weight))
            start = len(layers) if unit.name == "lm_head" else int(unit.name.split(".")[1])
            costs[unit.name] = loss_from(start) - base
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)
            progress()
    finally:
        model.train(was_training)
    return base, costs, tokens


def choose(costs: dict[str, float], units: list[Unit], *, low_bits: int, group_size: int, symmetric: bool,
           budget_bytes: int, fixed_bytes: int) -> tuple[list[str], int, int]:
    """(promoted unit names, estimated bytes with them, bytes with none): greedy by cost per extra byte."""
    low = {u.name: _unit_bytes(u, low_bits, group_size, symmetric) for u in units}
    extra = {u.name: _unit_bytes(u, HIGH_BITS, group_size, symmetric) - low[u.name] for u in units}
    all_low = fixed_bytes + sum(low.values())
    size, promoted = all_low, []
    ranked = sorted((u.name for u in units if costs.get(u.name, 0) > 0 and extra[u.name] > 0),
                    key=lambda name: costs[name] / extra[name], reverse=True)
    for name in ranked:
        if size + extra[name] <= budget_bytes:
            promoted.append(name)
            size += extra[name]
    return promoted, size, all_low
