"""finetune.train_scales: the quantization scales train with the LoRA and ship in a copy of the checkpoint."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def generic_run(chain, tmp_path_factory):
    """The same fine-tune with finetune.train_scales off."""
    from oliveflow.config import ExportConfig, FinetuneConfig
    from oliveflow.stages.export import export
    from oliveflow.stages.finetune import finetune

    root = tmp_path_factory.mktemp("generic")
    (root / "f").mkdir(), (root / "e").mkdir()
    adapter = finetune(chain["base"], chain["quantized"], chain["data"], chain["template"],
                       FinetuneConfig(max_steps=10, learning_rate=3e-3, train_scales=False), root / "f")
    return adapter, export(chain["quantized"], adapter, ExportConfig(), root / "e")


def test_the_trained_scales_ship_in_a_copy_of_the_checkpoint_and_the_codes_stay(chain):
    from safetensors.torch import load_file

    from oliveflow.scale_gains import DELTAS_FILE

    adapter = chain["adapter"]  # the default trains the scales
    assert adapter.tuned_model_dir is not None
    deltas = load_file(str(adapter.adapter_dir / DELTAS_FILE))
    original, tuned = ({k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                       for folder in (chain["quantized"].model_dir, adapter.tuned_model_dir))
    assert set(original) == set(tuned)
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert changed and changed <= set(deltas) and all(k.endswith(".scales") for k in changed)
    assert not any(k.startswith("lm_head") for k in deltas)  # the head (a tied embedding reads its codes) stays
    for key, delta in deltas.items():
        assert torch.equal(tuned[key], original[key] * (1 + delta))
    assert float(max(d.abs().max() for d in deltas.values())) > 1e-4  # they moved


def test_the_adapter_was_trained_against_the_weights_that_ship(chain):
    """The training forward (codes x scale x (1 + delta)) gives bit for bit the logits of the checkpoint the export
    builds from, adapter on."""
    from olive.model import HfModelHandler
    from safetensors.torch import load_file

    from oliveflow import scale_gains
    from oliveflow.olive_ext import dequantize_once, load_adapter

    adapter = chain["adapter"]
    deltas = load_file(str(adapter.adapter_dir / scale_gains.DELTAS_FILE))
    training = dequantize_once(HfModelHandler(model_path=str(chain["quantized"].model_dir)).load_model())
    names = scale_gains.install(training)
    assert len(names) == len(deltas)
    with torch.no_grad():
        for name in names:
            getattr(training.get_submodule(name), scale_gains.DELTA).copy_(deltas[name + ".scales"])
    shipped = dequantize_once(HfModelHandler(model_path=str(adapter.tuned_model_dir)).load_model())
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        a = load_adapter(training, adapter.adapter_dir).eval()(input_ids=ids).logits
        b = load_adapter(shipped, adapter.adapter_dir).eval()(input_ids=ids).logits
    assert torch.equal(a, b)


def test_the_export_builds_from_the_trained_scales_and_without_them_from_the_generic_model(chain, generic_run):
    import json

    from oliveflow.olive_runner import CONFIG_FILE
    from oliveflow.scale_gains import DELTAS_FILE

    saved = json.loads((chain["onnx"].artifact.path / CONFIG_FILE).read_text())
    assert saved["input_model"]["model_path"] == str(chain["adapter"].tuned_model_dir)
    adapter, onnx = generic_run
    assert adapter.tuned_model_dir is None and not (adapter.adapter_dir / DELTAS_FILE).exists()
    saved = json.loads((onnx.artifact.path / CONFIG_FILE).read_text())
    assert saved["input_model"]["model_path"] == str(chain["quantized"].model_dir)
    assert (onnx.model_dir / "model.onnx").is_file() and onnx.adapter_file.is_file()


def test_small_deltas_move_a_bfloat16_model():
    """In bfloat16, ``scale * (1 + delta)`` is formed in float32 first: 1 + 0.003 rounds to 1 in bfloat16, and the
    deltas the fine-tune learns are of that size."""
    from olive.common.quant.nn import QuantLinear

    from oliveflow import scale_gains

    layer = QuantLinear(64, 32, bits=4, symmetric=True, group_size=32, bias=False)
    with torch.no_grad():
        layer.scales.copy_(torch.rand_like(layer.scales) + 0.5)
        layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, dtype=layer.qweight.dtype))
    model = torch.nn.Sequential(layer).to(torch.bfloat16)
    (name,) = scale_gains.install(model)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        getattr(layer, scale_gains.DELTA).fill_(0.003)
        after = model(x)
        expected = torch.nn.functional.linear(
            x, (layer.__dict__["_oliveflow_centered"]
                * (layer.scales.float() * 1.003).to(torch.bfloat16).unsqueeze(-1)).reshape(32, 64))
    assert not torch.equal(before, after)
    assert torch.equal(after, expected)
