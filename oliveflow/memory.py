"""How a LoRA fine-tune fits the memory it has: micro-batch, gradient accumulation, checkpointing, float base.

A pure estimate from the model's shape (its ``config.json``), the longest training example and the
device's memory budget; no torch. The effective batch (``micro_batch_size x gradient_accumulation_steps``)
is always the configured batch size, so the plan changes memory and speed, not what is learned.

Per decoder layer and token, training keeps about ``8 h + p (12 h + 4 i)`` bytes for backward (two RMSNorms
upcast to float32, the attention's q/k/v/out and the MLP's four intermediates, ``p`` bytes per activation);
gradient checkpointing keeps only each layer's input (``p h``), and the layer being recomputed holds its
activations and their gradients (counted as three layers' worth); the loss holds about ``p + 16`` bytes per token
and vocabulary entry (the logits, their float32 copy, log-softmax, its gradient). Checked against torch's peak on
an H200 (``bench/bench_real_scale.py``, Phi-3.5-mini shape, 8 x 1024 tokens, bf16, r 64): with checkpointing the
estimate is 22.0 GB against 20.3 GB allocated, without it 59.3 GB against 48.9 GB.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Leave this share of the budget for the CUDA context and the allocator's fragmentation (reserved was 6% above
# allocated in the H200 run).
USABLE_SHARE = 0.9
# LoRA parameters in float32: the weight, its gradient and AdamW's two moments.
LORA_BYTES_PER_PARAM = 16
# Relative cost of a training step: checkpointing recomputes the forward pass (about a third more work), and a
# micro-batch of few tokens leaves the device underused (half speed at this many tokens per micro-batch).
CHECKPOINTING_COST = 4 / 3
HALF_SPEED_TOKENS = 512


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        """From a Hugging Face ``config.json`` (Llama, Phi-3, Mistral, Qwen and the like)."""
        text = config.get("text_config", config)
        hidden = int(text["hidden_size"])
        heads = int(text.get("num_attention_heads") or 1)
        return cls(layers=int(text["num_hidden_layers"]), hidden=hidden,
                   intermediate=int(text.get("intermediate_size") or 4 * hidden), vocab=int(text["vocab_size"]),
                   heads=heads, kv_heads=int(text.get("num_key_value_heads") or heads),
                   head_dim=int(text.get("head_dim") or hidden // heads))

    @classmethod
    def from_folder(cls, model_dir: Path) -> ModelShape:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))

    @property
    def linear_parameters(self) -> int:
        """Weights of the decoder's linear layers (what int4 quantization covers)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def lora_parameters(self, r: int) -> int:
        """LoRA parameters if every linear layer is adapted, q/k/v and gate/up apart (an upper bound for any
        target list, and for fused projections)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        ins_outs = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
        return self.layers * r * ins_outs

    def activation_bytes(self, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
        """Bytes kept for backward, plus the loss, for one micro-batch of ``tokens`` tokens."""
        per_layer = 8 * self.hidden + dtype_bytes * (12 * self.hidden + 4 * self.intermediate)
        kept = dtype_bytes * self.hidden * self.layers + 3 * per_layer if checkpointing else per_layer * self.layers
        return tokens * (kept + self.vocab * (dtype_bytes + 16))


@dataclass(frozen=True)
class TrainingPlan:
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    float_base: bool  # keep one float copy of the frozen int4 base (faster) instead of unpacking it every pass
    estimated_peak_gb: float
    budget_gb: float
    device: str

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} accumulation steps, "
                f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}, float copy of the int4 "
                f"base {'kept' if self.float_base else 'not kept (unpacked every pass)'}; estimated peak "
                f"{self.estimated_peak_gb:.1f} GB of {self.budget_gb:.1f} GB on {self.device}")

    def to_dict(self) -> dict:
        return asdict(self)


class DoesNotFit(ValueError):
    """Not even one example per micro-batch fits, with checkpointing and no float base."""


def plan_training(shape: ModelShape, *, budget_bytes: int, weights_bytes: int, batch_size: int, sequence_tokens: int,
                  dtype_bytes: int, lora_r: int, device: str, checkpointing: bool | None = None,
                  micro_batch_size: int | None = None, train_scales: bool = False,
                  group_size: int = 32) -> TrainingPlan:
    """The fastest plan whose estimated peak fits ``USABLE_SHARE`` of ``budget_bytes``.

    ``weights_bytes`` is the quantized model as loaded; ``sequence_tokens`` the longest training example (every
    micro-batch is padded to its longest). ``checkpointing`` and ``micro_batch_size``, when given, are kept as
    they are (the person asked for them) and the rest is planned around them. Raises ``DoesNotFit``.

    ``train_scales`` (``oliveflow.scale_gains``) always keeps the unpacked codes (one float copy of the base), and
    each layer's weight, rebuilt from them in the forward pass, is kept for backward (a second copy; one layer's
    worth, times three, with checkpointing); its per-group deltas train like LoRA parameters.
    """
    usable = USABLE_SHARE * budget_bytes
    fixed = weights_bytes + LORA_BYTES_PER_PARAM * shape.lora_parameters(lora_r)
    float_copy = dtype_bytes * shape.linear_parameters
    if train_scales:
        fixed += float_copy + LORA_BYTES_PER_PARAM * shape.linear_parameters // group_size
    micro_choices = [micro_batch_size] if micro_batch_size else \
        [m for m in range(batch_size, 0, -1) if batch_size % m == 0]
    best: tuple[float, TrainingPlan] | None = None
    for float_base in ((True,) if train_scales else (True, False)):
        for ckpt in ([checkpointing] if checkpointing is not None else [False, True]):
            # train_scales: the rebuilt weights kept for backward (all layers', or three layers' with checkpointing)
            rebuilt = 3 * float_copy // shape.layers if ckpt else float_copy
            for micro in micro_choices:  # largest first: the first that fits is this option's best
                tokens = micro * sequence_tokens
                peak = (fixed + (rebuilt if train_scales else float_copy * float_base)
                        + shape.activation_bytes(tokens, dtype_bytes, ckpt))
                if peak > usable:
                    continue
                cost = (CHECKPOINTING_COST if ckpt else 1.0) * (1 + HALF_SPEED_TOKENS / tokens)
                plan = TrainingPlan(micro_batch_size=micro, gradient_accumulation_steps=batch_size // micro,
                                    gradient_checkpointing=ckpt, float_base=float_base,
                                    estimated_peak_gb=round(peak / 1e9, 2), budget_gb=round(budget_bytes / 1e9, 2),
                                    device=device)
                if best is None or cost < best[0]:
                    best = (cost, plan)
                break
        if best is not None:
            return best[1]  # a plan with the float base beats every plan without it (~10% faster, same numbers)
    smallest = (fixed + (3 * float_copy // shape.layers if train_scales else 0)
                + shape.activation_bytes(min(micro_choices) * sequence_tokens, dtype_bytes, True))
    raise DoesNotFit(f"the fine-tune needs about {smallest / 1e9:.1f} GB even at micro-batch {min(micro_choices)} "
                     f"with gradient checkpointing{' and trained scales' if train_scales else ''}, and {device} has "
                     f"{budget_bytes / 1e9:.1f} GB ({USABLE_SHARE:.0%} usable)")
