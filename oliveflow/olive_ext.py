"""Olive passes this project registers: LoRA on Olive-quantized models, and their export.

Olive 0.13 quantizes into its own ``QuantLinear``; PEFT refuses that layer, and the
onnxruntime-genai ModelBuilder reads such checkpoints (copying the int4 codes verbatim)
but cannot attach a LoRA adapter to them. The passes below close both gaps (and add AWQ, which Olive 0.13 only has through autoawq), so the
adapter is trained against exactly the int4 grid that ends up in the ONNX graph:

- ``QuantLoRA``: Olive's LoRA pass with a PEFT custom-module mapping for ``QuantLinear``.
- ``Awq``: Olive's Rtn pass preceded by this project's activation-aware scaling (``oliveflow.awq``);
  ``AwqGptq``: the same scaling, then Olive's Gptq pass.
- ``QuantModelBuilder``: Olive's ModelBuilder pass; when the input is Olive-quantized and
  carries an adapter, it hangs the adapter's LoRA weights on ModelBuilder's quantized
  modules instead of calling ``PeftModel.from_pretrained`` on an object that is no
  ``nn.Module``. Base codes are copied, never re-quantized.

Importing this module also makes Olive's ``WeightQuantizer.find_qparams`` give a GPU the same scales as a CPU
(``find_qparams``). Also registered: the ``oliveflow_sft`` data component (this project's SFT transform,
``oliveflow.sft``), which feeds ``QuantLoRA``. ``QuantLoRA`` dequantizes each frozen ``QuantLinear`` once
(``dequantize_once``), seeds the LoRA init (or starts it from the quantization error, ``oliveflow.lora_init``),
and stops at the first non-finite loss or gradient norm (``FiniteCheck``).

``package_config()`` is Olive's pass table with these passes added; workflow configs name them by type.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from olive.common.quant.hf_utils import OliveHfQuantizer
from olive.common.quant.nn import QuantLinear
from olive.common.quant.utils import WeightQuantizer
from olive.package_config import OlivePackageConfig
from olive.passes.onnx.model_builder import ModelBuilder
from olive.passes.pytorch.lora import LoRA
from olive.passes.pytorch.gptq import Gptq
from olive.passes.pytorch.rtn import Rtn
from peft.tuners.lora.layer import LoraLayer
from transformers import TrainerCallback


log = logging.getLogger(__name__)
LOG_HISTORY = "log_history.json"
SFT_PRE_PROCESS = "oliveflow_sft"


class NonFiniteTraining(RuntimeError):
    """A training step produced a NaN/inf loss or gradient norm."""


def _dequantized_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    # The base is frozen: unpack its int4 codes once (the same unpack_and_dequantize the layer itself calls,
    # so the result is bit-identical), not on every forward and backward pass.
    weight = self.__dict__.get("_oliveflow_weight")
    if weight is None or weight.device != self.qweight.device:
        with torch.no_grad():
            weight = self.unpack_and_dequantize(self.qweight, self.scales, self.qzeros)
        self.__dict__["_oliveflow_weight"] = weight
    return torch.nn.functional.linear(x, weight, bias=self.bias).to(x.dtype)


# The float copy of the base may take at most this share of the device's free memory; the rest is left for
# activations, LoRA gradients and the optimizer.
FLOAT_BASE_SHARE = 0.5


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now: free GPU memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def dequantize_once(model: torch.nn.Module) -> torch.nn.Module:
    """Make every ``QuantLinear`` of ``model`` keep one float copy of its frozen weight, when that copy fits.

    It costs one float copy of the base (e.g. 0.5 GB for a 135 M model in float32, 7.6 GB for Phi-3.5-mini in
    bfloat16). When that is more than ``FLOAT_BASE_SHARE`` of the free memory, the layers keep unpacking their
    int4 codes on every pass (about 10% slower on a 135 M model, ``bench/bench_lora_step.py``), and a warning
    says so: same numbers, less memory.
    """
    import types

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return model
    need = sum(m.rows * m.cols * m.scales.element_size() for m in layers)
    device = layers[0].qweight.device
    free = free_memory_bytes(device)
    if need > FLOAT_BASE_SHARE * free:
        log.warning("the float copy of the int4 base (%.2f GB) does not fit in half of the %.2f GB free on %s: "
                    "unpacking the int4 weights on every pass instead (slower, same results)",
                    need / 1e9, free / 1e9, device)
        return model
    for module in layers:
        module.forward = types.MethodType(_dequantized_forward, module)
    return model


class FiniteCheck(TrainerCallback):
    """The first non-finite loss or grad_norm stops training, naming its step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(float(value)):
                raise NonFiniteTraining(f"{key} is {value} at step {state.global_step}; lower "
                                        "finetune.learning_rate, use finetune.precision float32, or check the "
                                        "model's weights")


def sft_pre_process(dataset, model_name: str, template: str, max_seq_len: int, loss_on: str = "response", **kwargs):
    """Olive data component: this project's SFT transform (oliveflow.sft) over a loaded JSONL dataset."""
    from transformers import AutoTokenizer

    from oliveflow.sft import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    examples, _ = encode_rows(tokenizer, template, (dict(row) for row in dataset), max_seq_len, loss_on)
    return [{k: torch.tensor(e[k]) for k in ("input_ids", "attention_mask", "labels")} for e in examples]


def _register_sft_pre_process() -> None:
    from olive.data.registry import Registry

    Registry.register_pre_process(SFT_PRE_PROCESS)(sft_pre_process)


_register_sft_pre_process()


def find_qparams(self: WeightQuantizer, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Olive's ``WeightQuantizer.find_qparams`` (min/max scales and zero points), the same on every device.

    Olive divides ``max - min`` by the Python int ``maxq - minq``. CUDA multiplies by the float32 reciprocal
    of a Python number instead of dividing by it, which can be 1 ulp off the quotient a CPU computes. That ulp
    decides a rounding tie in every symmetric group whose largest magnitude is negative: that weight sits at
    exactly ``w / scale = -(2**bits - 1) / 2``, which rounds to the lowest code on a CPU and to the next one
    with the larger GPU scale. On SmolLM2-135M at int4 g32, 1.1% of rtn's codes and 2% of its scales differed
    between an H200 and its CPU. Here the divisor is a tensor: true division on both.
    """
    tensor, _ = self._reshape_tensor(tensor)
    zero = tensor.new_zeros(())
    min_val = torch.minimum(tensor.amin(-1), zero)
    max_val = torch.maximum(tensor.amax(-1), zero)
    if self.symmetric:
        max_val = torch.maximum(min_val.abs(), max_val)
        min_val = torch.where(min_val < 0, -max_val, min_val)
    empty = (min_val == 0) & (max_val == 0)
    min_val = torch.where(empty, -1.0, min_val)
    max_val = torch.where(empty, 1.0, max_val)
    levels = torch.tensor(self.maxq - self.minq, dtype=tensor.dtype, device=tensor.device)
    scales = (max_val - min_val) / levels
    if self.symmetric:
        zero_points = torch.full_like(scales, self.midq)
    else:
        zero_points = torch.round(self.minq - min_val / scales)
    return scales, zero_points.clamp(self.minq, self.maxq).to(torch.int32)


OLIVE_FIND_QPARAMS = WeightQuantizer.__dict__["find_qparams"]  # Olive's own (the tests compare against it)
WeightQuantizer.find_qparams = torch.no_grad()(find_qparams)


def load_adapter(model: torch.nn.Module, adapter_dir: Path) -> Any:
    """``PeftModel.from_pretrained`` that also knows ``QuantLinear`` (the mapping is not saved with adapters)."""
    from peft import LoraConfig, PeftModel

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config._register_custom_module({QuantLinear: QuantLinearLora})
    return PeftModel.from_pretrained(model, str(adapter_dir), config=config)


class QuantLinearLora(torch.nn.Module, LoraLayer):
    """LoRA on top of Olive's ``QuantLinear``: frozen int4 base, float low-rank update."""

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, config: Any, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any):
        super().__init__()
        # PEFT reads a quantized layer's sizes from infeatures/outfeatures; Olive's QuantLinear names them cols/rows.
        base_layer.infeatures, base_layer.outfeatures = base_layer.cols, base_layer.rows
        LoraLayer.__init__(self, base_layer)
        quant = self.get_base_layer()
        # QuantLinear names its dimensions rows/cols; LoraLayer needs in/out features.
        self.in_features, self.out_features = quant.cols, quant.rows
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](x.to(lora_A.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _training_seed(config: Any) -> int:
    args = config.training_args
    seed = getattr(args, "seed", None)
    if seed is None and args is not None:
        seed = (getattr(args, "extra_args", None) or {}).get("seed")
    return int(seed or 0)


class _TrainableOliveHfQuantizer(OliveHfQuantizer):
    @property
    def is_trainable(self) -> bool:
        return True


class QuantLoRA(LoRA):
    """Olive's LoRA pass, able to train on Olive-quantized (``QuantLinear``) models."""

    @classmethod
    def _default_config(cls, accelerator_spec):
        from typing import Optional

        from olive.passes.pass_config import PassConfigParam

        return {
            **super()._default_config(accelerator_spec),
            "float_base": PassConfigParam(type_=bool, default_value=True,
                                          description="Keep one float copy of the frozen int4 base (dequantize_once)."),
            "error_init": PassConfigParam(type_=Optional[dict], default_value=None,
                                          description="Start A and B from each layer's quantization error "
                                                      "(oliveflow.lora_init): {base, model, examples} paths."),
            "train_scales": PassConfigParam(type_=bool, default_value=False,
                                            description="Train one delta per quantization group with the LoRA "
                                                        "(oliveflow.scale_gains), saved beside the adapter."),
            "distill": PassConfigParam(type_=Optional[dict], default_value=None,
                                       description="Mix in the KL from a float teacher (oliveflow.distill): "
                                                   "{base, adapter, weight, temperature}."),
        }

    @staticmethod
    def get_peft_model(model, config, config_kwargs=None):
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
            bias="none",
            modules_to_save=config.modules_to_save,
            **(config_kwargs or {}),
        )
        lora_config._register_custom_module({QuantLinear: QuantLinearLora})
        quantizer = getattr(model, "hf_quantizer", None)
        if isinstance(quantizer, OliveHfQuantizer):
            # Olive marks its quantizer untrainable because PEFT had no layer for QuantLinear;
            # QuantLinearLora is that layer, so transformers.Trainer may proceed.
            quantizer.__class__ = _TrainableOliveHfQuantizer
        # Olive builds the LoRA layers before the Trainer seeds anything, so lora_A started from whatever the
        # global RNG held: two identical runs gave different adapters. Seed it with the run's training seed.
        from transformers import set_seed

        set_seed(_training_seed(config))
        # Olive turns loss kwargs off (an old transformers issue); on, the Trainer divides the summed loss by the
        # tokens of the whole accumulated batch, so micro-batches x accumulation learn what one batch would.
        model.accepts_loss_kwargs = True
        if config.train_scales:  # its own forward, from its own unpacked codes (counted in the memory plan)
            from oliveflow import scale_gains

            base = model
            scale_gains.install(base)
        else:
            base = dequantize_once(model) if config.float_base else model
        peft_model = get_peft_model(base, lora_config)
        if config.train_scales:
            scale_gains.trainable(peft_model)
        if config.error_init:
            from oliveflow.lora_init import init_from_error

            paths = config.error_init
            init_from_error(peft_model, Path(paths["base"]), Path(paths["model"]),
                            json.loads(Path(paths["examples"]).read_text()))
        return peft_model

    def train_and_save_new_model(self, model, tokenizer, config, output_model, output_model_path):
        # Olive discards the Trainer's log history; keep it beside the adapter (loss per step).
        import transformers

        history: list[dict] = []
        trained_deltas: dict = {}
        original_train = transformers.Trainer.train

        def train(trainer, *args, **kwargs):
            trainer.args.logging_nan_inf_filter = False  # a NaN loss must be seen, not averaged away
            trainer.add_callback(FiniteCheck())
            if config.distill:
                from oliveflow.distill import distilled_loss, load_teacher

                spec = config.distill
                device = next(trainer.model.parameters()).device
                teacher = load_teacher(Path(spec["base"]), Path(spec["adapter"]), getattr(torch, config.torch_dtype),
                                       device)
                trainer.compute_loss = distilled_loss(trainer.compute_loss, teacher, spec["weight"],
                                                      spec["temperature"])
            try:
                result = original_train(trainer, *args, **kwargs)
            finally:
                history.extend(trainer.state.log_history)
            if config.train_scales:
                from oliveflow import scale_gains

                trained_deltas.update(scale_gains.deltas(trainer.model))
            return result

        transformers.Trainer.train = train
        try:
            output = super().train_and_save_new_model(model, tokenizer, config, output_model, output_model_path)
        finally:
            transformers.Trainer.train = original_train
        adapter = Path(output_model_path) / "adapter"
        # Timings would make two identical trainings' artifacts differ; the losses are what is kept.
        steps = [{k: v for k, v in entry.items() if not k.endswith(("_runtime", "_per_second"))} for entry in history]
        (adapter / LOG_HISTORY).write_text(json.dumps(steps, indent=1))
        if config.train_scales:
            from safetensors.torch import save_file

            from oliveflow.scale_gains import DELTAS_FILE

            save_file(trained_deltas, str(adapter / DELTAS_FILE))
        # PEFT saves target_modules from a set, in an order that changes with the interpreter's hash seed.
        config_file = adapter / "adapter_config.json"
        adapter_config = json.loads(config_file.read_text())
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        return output


class _Proxy:
    """Forwards attribute reads to a ModelBuilder quantized module, overriding a few."""

    def __init__(self, target: Any, **overrides: Any):
        self.__dict__.update(overrides)
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _attach_adapter(quant_model: Any, adapter_dir: str) -> Any:
    """Give ModelBuilder's quantized modules PEFT-shaped LoRA attributes from ``adapter_dir``."""
    from safetensors.torch import load_file

    adapter_cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    weights = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        # base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight
        module, kind = key.rsplit(".lora_", 1)
        module = module.removeprefix("base_model.model.")
        pairs.setdefault(module, {})[kind.split(".")[0]] = tensor.float()

    for module_name, ab in pairs.items():
        parts = module_name.split(".")  # model.layers.N.<path...>
        if parts[:2] != ["model", "layers"]:
            raise NotImplementedError(f"LoRA on {module_name} is not supported by the quantized export")
        layer = quant_model.layers[int(parts[2])]
        parent = layer
        for attr in parts[3:-1]:
            parent = getattr(parent, attr)
        leaf = parts[-1]
        targets = [leaf]
        if leaf == "qkv_proj" and not hasattr(parent, "qkv_proj"):
            targets = ["q_proj", "k_proj", "v_proj"]  # ModelBuilder split the fused QKV
        elif leaf == "gate_up_proj" and not hasattr(parent, "gate_up_proj"):
            targets = ["gate_proj", "up_proj"]
        rows = [getattr(parent, t).out_features for t in targets]
        offsets = [sum(rows[:i]) for i in range(len(rows))]
        for target, start, n in zip(targets, offsets, rows):
            base = getattr(parent, target)
            lora_a = torch.nn.Linear(base.in_features, ab["A"].shape[0], bias=False)
            lora_a.weight = torch.nn.Parameter(ab["A"].clone(), requires_grad=False)
            lora_b = torch.nn.Linear(ab["A"].shape[0], n, bias=False)
            lora_b.weight = torch.nn.Parameter(ab["B"][start:start + n].clone(), requires_grad=False)
            # The shapes of a PEFT LoRA layer, as ModelBuilder's make_matmul_lora reads them;
            # the LoRA path's weight.shape is all it asks of the (quantized) base.
            shaped_base = _Proxy(base, weight=torch.empty(n, base.in_features, device="meta"))
            setattr(parent, target, _Proxy(
                base,
                base_layer=shaped_base,
                lora_A=SimpleNamespace(default=lora_a),
                lora_B=SimpleNamespace(default=lora_b),
                scaling={"default": scaling},
            ))
    return quant_model


def legacy_rope_attributes(config: Any) -> Any:
    """``config`` with the RoPE names the 0.14.1 builder reads (``rope_theta``, Gemma 3's ``rope_local_base_freq``).

    transformers 5 keeps a model with one RoPE base per layer type in ``rope_parameters`` =
    ``{"full_attention": {...}, "sliding_attention": {...}}`` and drops both names: the builder then failed on
    Gemma 3 (no ``rope_local_base_freq``), and would have fallen back to base 10000 for the global layers.
    """
    per_type = getattr(config, "rope_parameters", None)
    if not isinstance(per_type, dict) or not all(isinstance(v, dict) for v in per_type.values()):
        return config
    full, local = per_type.get("full_attention"), per_type.get("sliding_attention")
    if full and "rope_theta" in full and not hasattr(config, "rope_theta"):
        config.rope_theta = full["rope_theta"]
    if local and "rope_theta" in local and not hasattr(config, "rope_local_base_freq"):
        config.rope_local_base_freq = local["rope_theta"]
    return config


@contextlib.contextmanager
def _adapter_aware_builder():
    # builder.py puts builders/ on sys.path, so its Model class lives in the top-level
    # module ``builders.base``; reach it the way Olive's own ModelBuilder patches do.
    builder = importlib.import_module("onnxruntime_genai.models.builder")
    model_cls = builder.Model
    auto_config = builder.AutoConfig

    class _BuilderConfig:  # builder.create_model reads the model's config through this name
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            return legacy_rope_attributes(auto_config.from_pretrained(*args, **kwargs))
    original = model_cls.load_weights

    def load_weights(self, input_path):
        adapter = self.extra_options.get("adapter_path") if self.quant_type else None
        if adapter is None:
            return original(self, input_path)
        self.extra_options.pop("adapter_path")
        try:
            return _attach_adapter(original(self, input_path), adapter)
        finally:
            self.extra_options["adapter_path"] = adapter

    original_to_int4 = model_cls.to_int4

    def to_int4(self):
        # LoRA MatMuls stay float: an int4 LoRA graph cannot run with no adapter active
        # (genai feeds rank-0 tensors that MatMulNBits rejects), and float keeps them exact.
        lora = [n.name for n in self.model.graph if n.op_type == "MatMul" and "/lora_" in n.name]
        excluded = self.quant_attrs["int4"]["nodes_to_exclude"]
        excluded.extend(name for name in lora if name not in excluded)
        return original_to_int4(self)

    model_cls.load_weights, model_cls.to_int4, builder.AutoConfig = load_weights, to_int4, _BuilderConfig
    try:
        yield
    finally:
        model_cls.load_weights, model_cls.to_int4, builder.AutoConfig = original, original_to_int4, auto_config


class QuantModelBuilder(ModelBuilder):
    """Olive's ModelBuilder pass that exports an Olive-quantized base together with its adapter."""

    def _run_for_config(self, model, config, output_model_path):
        with _adapter_aware_builder():
            return super()._run_for_config(model, config, output_model_path)


class _AwqFirst:
    """Load the base through ``oliveflow.awq`` (scaling, and clipping where ``clip``), then let the parent pass
    (Rtn or Gptq) quantize the scaled float weights.

    The scaled model never touches the disk: it is handed to the parent's code in memory, so the chain
    keeps one float copy of the model (the base) instead of two.
    """

    @classmethod
    def _default_config(cls, accelerator_spec):
        from typing import Optional, Union

        from olive.data.config import DataConfig
        from olive.passes.pass_config import PassConfigParam

        from oliveflow.awq import AwqSettings

        return {
            **super()._default_config(accelerator_spec),
            "data_config": PassConfigParam(type_=Union[DataConfig, dict], required=True,
                                           description="Calibration data (the project's own examples)."),
            "grid": PassConfigParam(type_=int, default_value=AwqSettings.grid,
                                    description="Scale exponents tried per group."),
            "clip": PassConfigParam(type_=bool, default_value=cls.clip_default,
                                    description="Search weight clipping too."),
            "max_calibration_tokens": PassConfigParam(type_=int, default_value=AwqSettings.max_calibration_tokens,
                                                      description="Calibration tokens used."),
            "prompt_weight": PassConfigParam(type_=Optional[float], default_value=None,
                                             description="Weight of prompt tokens (response tokens: 1) in the scale "
                                                         "search's error; needs search_data_config. None: all 1."),
            "search_data_config": PassConfigParam(type_=Optional[Union[DataConfig, dict]], default_value=None,
                                                  description="Examples with response labels (the SFT transform) for "
                                                              "the search, when prompt_weight is set."),
        }

    @torch.no_grad()
    def _run_for_config(self, model, config, output_model_path):
        from olive.passes.pytorch import quant_utils
        from olive.passes.pytorch.train_utils import get_calibration_dataset
        from tqdm.auto import tqdm

        from oliveflow.awq import AwqSettings, apply_awq
        from oliveflow.lora_init import AWQ_TRANSFORMS, save_transforms

        weighted = config.prompt_weight is not None
        if weighted:  # the SFT transform's rows are dicts with labels, not Olive's (inputs, labels) pairs
            if not config.search_data_config:
                raise ValueError("prompt_weight needs search_data_config: examples with response labels")
            from olive.common.config_utils import validate_config
            from olive.data.config import DataConfig

            search = validate_config(config.search_data_config, DataConfig)
            rows = list(search.to_data_container().create_dataloader())
        else:
            rows = get_calibration_dataset(model, config.data_config)
        calibration = [torch.as_tensor(row["input_ids"]).reshape(1, -1) for row in rows]
        weights = [response_weights(torch.as_tensor(row["labels"]).reshape(1, -1), config.prompt_weight)
                   for row in rows] if weighted else None
        settings = AwqSettings(bits=int(config.bits), group_size=config.group_size, symmetric=config.sym,
                               grid=config.grid, clip=config.clip, lm_head=config.lm_head,
                               max_calibration_tokens=config.max_calibration_tokens,
                               layer_bits=_layer_bits(config.overrides))
        original_load = quant_utils.load_hf_base_model

        def load_and_scale(handler, *args, **kwargs):
            device = "cuda" if torch.cuda.is_available() else "cpu"
            # Straight onto the device: no host copy of the whole float model on a GPU machine.
            loaded = original_load(handler, *args, **{**kwargs, "device_map": device})
            bar = tqdm(desc="AWQ search", unit="layer")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            report = apply_awq(loaded, [c.to(device) for c in calibration], settings, progress, weights)
            bar.close()
            Path(output_model_path).mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in report.to_dict().items() if k != "seconds"}  # identical runs, identical bytes
            (Path(output_model_path) / AWQ_REPORT).write_text(json.dumps(saved, indent=1, default=str))
            save_transforms(Path(output_model_path) / AWQ_TRANSFORMS, report.transforms)  # for finetune.init error
            return loaded

        quant_utils.load_hf_base_model = load_and_scale
        try:
            return super()._run_for_config(model, config, output_model_path)
        finally:
            quant_utils.load_hf_base_model = original_load


def response_weights(labels: torch.Tensor, prompt_weight: float) -> torch.Tensor:
    """Per position: 1 where the *next* token is a response token (the position that predicts it), else
    ``prompt_weight``. ``labels`` are the SFT transform's (IGNORE_INDEX outside the response)."""
    from oliveflow.sft import predicts_response

    return torch.where(predicts_response(labels), 1.0, float(prompt_weight)).to(torch.float64)


def _layer_bits(overrides: dict | None) -> tuple[tuple[str, int], ...]:
    """Olive's per-module bit overrides as AWQ's per-unit ones: ``model.layers.3.mlp.up_proj`` -> ``layers.3``."""
    units = {}
    for module, override in (overrides or {}).items():
        if "bits" not in (override or {}):
            continue
        parts = module.split(".")
        unit = "lm_head" if parts[-1] == "lm_head" else next(
            (f"layers.{parts[i + 1]}" for i, p in enumerate(parts[:-1]) if p == "layers"), None)
        if unit is not None:
            units[unit] = int(override["bits"])
    return tuple(sorted(units.items()))


class Awq(_AwqFirst, Rtn):
    """Activation-aware int4: ``oliveflow.awq`` scales and clips the float weights, then Olive's RTN packs them."""

    clip_default = True


class AwqGptq(_AwqFirst, Gptq):
    """AWQ's scaling, then GPTQ's error-compensating rounding (no clipping: GPTQ chooses the codes)."""

    clip_default = False


AWQ_REPORT = "awq_report.json"
_PASSES = {"QuantLoRA": QuantLoRA, "QuantModelBuilder": QuantModelBuilder, "Awq": Awq, "AwqGptq": AwqGptq}


def package_config() -> dict:
    """Olive's own pass table plus this module's passes, for ``olive.workflows.run(package_config=...)``."""
    package = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    for name, cls in _PASSES.items():
        parent = next(package["passes"][base.__name__] for base in cls.__mro__[1:] if base.__name__ in package["passes"])
        package["passes"][name] = {**parent, "module_path": f"{cls.__module__}.{name}"}
    return package
