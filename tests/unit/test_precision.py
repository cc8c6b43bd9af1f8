"""Mixed precision (oliveflow.precision) and the tied head (oliveflow.tied_head) on the tiny model."""

import json

import numpy as np
import onnx
import pytest
import torch

from oliveflow import precision
from oliveflow.precision import Unit


def test_linear_bytes_counts_codes_scales_and_zero_points():
    # 64 x 128 at 4 bits, group 32: 4096 code bytes, 256 float32 scales, asymmetric: 4 groups x 4 bits per row
    assert precision.linear_bytes(64, 128, 4, 32, symmetric=True) == 64 * 128 // 2 + 64 * 4 * 4
    assert precision.linear_bytes(64, 128, 4, 32, symmetric=False) == 64 * 128 // 2 + 64 * 4 * 4 + 64 * 2
    assert precision.linear_bytes(64, 128, 8, 32, symmetric=True) == 64 * 128 + 64 * 4 * 4


def test_choose_promotes_by_cost_per_extra_byte_within_the_budget():
    units = [Unit("layers.0", ("a",), ((64, 128),)), Unit("layers.1", ("b",), ((64, 128),)),
             Unit("lm_head", ("c",), ((256, 128),))]
    low = sum(precision.linear_bytes(r, c, 4, 32, True) for u in units for r, c in u.shapes)
    extra_layer = 64 * 128 // 2  # 4 more bits per weight
    costs = {"layers.0": 0.01, "layers.1": 0.04, "lm_head": 0.03}  # the head costs more than layers.0, per byte less
    kwargs = dict(low_bits=4, group_size=32, symmetric=True, fixed_bytes=1000)
    promoted, size, all_low = precision.choose(costs, units, budget_bytes=1000 + low + extra_layer, **kwargs)
    assert (promoted, size, all_low) == (["layers.1"], 1000 + low + extra_layer, 1000 + low)
    promoted, _, _ = precision.choose(costs, units, budget_bytes=10**9, **kwargs)
    assert promoted == ["layers.1", "layers.0", "lm_head"]
    promoted, _, _ = precision.choose({**costs, "layers.1": -0.01}, units, budget_bytes=10**9, **kwargs)
    assert "layers.1" not in promoted, "a unit that does not lose by quantization stays low"
    assert precision.choose(costs, units, budget_bytes=10, **kwargs)[0] == []


def _examples(model_dir, data, n=4):
    from transformers import AutoTokenizer

    from oliveflow.sft import IGNORE_INDEX, encode_rows
    from oliveflow.stages.data import read_examples
    from oliveflow.stages.quantize import calibration_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded, _ = encode_rows(tokenizer, calibration_template(data), read_examples(data.train_path, data.fields)[:n],
                             128, "response")
    return [(torch.tensor([e["input_ids"]]), torch.tensor(e["labels"][1:] + [IGNORE_INDEX]) != IGNORE_INDEX)
            for e in encoded]


def test_costs_equal_a_full_forward_with_the_unit_quantized_and_weights_are_restored(chain):
    """The shortcut (re-run only the layers from the unit on) gives what quantizing the unit in the whole model gives."""
    from olive.common.quant.utils import WeightQuantizer
    from transformers import AutoModelForCausalLM

    from oliveflow.awq import fake_quantize

    model_dir = chain["base"].artifact.path
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = _examples(model_dir, chain["data"])
    units = precision.units_of(model)
    assert [u.name for u in units] == ["layers.0", "layers.1", "lm_head"]
    assert "model.layers.0.self_attn.qkv_proj" in units[0].modules
    quantizer = WeightQuantizer(bits=4, symmetric=True, group_size=32)
    base, costs, tokens = precision.measure_costs(model, examples, units, quantizer)
    assert tokens == sum(int(mask.sum()) for _, mask in examples)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was not restored"

    def full_loss() -> float:
        total = 0.0
        with torch.no_grad():
            for ids, mask in examples:
                logits = model(input_ids=ids).logits[0].float()
                per_token = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
                total += float(per_token[mask[:-1]].sum())
        return total / tokens

    assert base == pytest.approx(full_loss(), rel=1e-5)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in units[1].modules:
            modules[name].weight.copy_(fake_quantize(quantizer, modules[name].weight))
    assert costs["layers.1"] == pytest.approx(full_loss() - base, rel=1e-3, abs=1e-6)
    assert all(np.isfinite(list(costs.values())))


@pytest.fixture(scope="module")
def tied_chain(tiny_model_dir, chain, tmp_path_factory):
    """The tiny model with its head tied to the embedding, through quantize (rtn), 2 LoRA steps and export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oliveflow.config import ExportConfig, FinetuneConfig, QuantizeConfig
    from oliveflow.stages.export import export
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    root = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "base")
    config = QuantizeConfig(algorithm="rtn", group_size=32, size_budget=None)
    base = resolve_model(str(root / "base"), config)
    quantized = quantize(base, config, root / "q", data=chain["data"])
    adapter = finetune(base, quantized, chain["data"].model_copy(update={"eval_path": None}), chain["template"],
                       FinetuneConfig(max_steps=2), root / "f")
    onnx_model = export(quantized, adapter, ExportConfig(), root / "e")
    return {"quantized": quantized, "adapter": adapter, "onnx": onnx_model}


def test_a_tied_embedding_ships_once_as_the_heads_codes(tied_chain, chain):
    from olive.model import HfModelHandler

    from oliveflow.tied_head import EMBEDDING, head_grid

    quantized = tied_chain["quantized"]
    assert quantized.tied_embedding
    model = HfModelHandler(model_path=str(quantized.model_dir)).load_model()
    grid = head_grid(quantized.model_dir)
    assert torch.equal(model.get_input_embeddings().weight, grid), "training sees the table the graph will hold"
    graph = onnx.load(str(tied_chain["onnx"].model_dir / "model.onnx"))
    assert EMBEDDING not in {i.name for i in graph.graph.initializer}
    (gather,) = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
    assert not [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] == EMBEDDING]
    untied = chain["quantized"]
    assert not untied.tied_embedding
    assert quantized.size_after_bytes < untied.size_after_bytes


def test_the_tied_graph_gives_the_pytorch_logits(tied_chain):
    import onnxruntime_genai as og
    from olive.model import HfModelHandler
    from transformers import AutoTokenizer

    quantized = tied_chain["quantized"]
    tokenizer = AutoTokenizer.from_pretrained(quantized.model_dir)
    ids = tokenizer("<|user|>\nWhat should I pack for Lisbon?<|end|>\n<|assistant|>\n")["input_ids"]
    torch_model = HfModelHandler(model_path=str(quantized.model_dir)).load_model().eval()
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    model = og.Model(str(tied_chain["onnx"].model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    actual = np.asarray(generator.get_logits()).reshape(-1)[: expected.shape[1]]
    spread = expected[-1].max() - expected[-1].min()
    assert np.argmax(actual) == np.argmax(expected[-1])
    assert np.abs(actual - expected[-1]).max() < 0.02 * spread


def test_the_plan_is_saved_and_its_promotions_reach_the_graph(chain):
    quantized = chain["quantized"]
    plan = json.loads((quantized.artifact.path / "precision_plan.json").read_text())
    assert plan["promoted"] == quantized.promoted and quantized.promoted, "the chain's budget promotes a unit"
    assert set(plan["costs"]) == {"layers.0", "layers.1", "lm_head"}
    assert plan["estimated_bytes"] <= plan["budget_bytes"]
    config = json.loads((quantized.model_dir / "config.json").read_text())["quantization_config"]
    promoted_modules = {m for m, o in config["overrides"].items() if o.get("bits") == 8}
    assert promoted_modules and all(any(m.startswith(f"model.{u}") or m == u for u in quantized.promoted)
                                    for m in promoted_modules)
    graph = onnx.load(str(chain["onnx"].model_dir / "model.onnx"))
    bits = {n.name: onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in graph.graph.node if n.op_type == "MatMulNBits"}
    eight = {name for name, b in bits.items() if b == 8}
    assert eight and all(any(f"/{u.replace('layers.', 'layers.')}/" in name or name.startswith(f"/{u}/")
                             for u in quantized.promoted) for name in eight)
    assert any(b == 4 for b in bits.values())


def test_the_quantize_stage_is_cached_per_device(chain, monkeypatch):
    """What calibrates depends on the device (awq, gptq, the mixed-precision plan: float32 sums in another
    order): the key names it. Plain rtn gives the same codes everywhere (olive_ext.find_qparams), so a CPU and
    a GPU share its entry."""
    import torch

    from oliveflow.stages.table import BY_NAME

    stage = BY_NAME["quantize"]
    arguments = {"base": chain["base"], "config": chain["qconfig"], "data": chain["data"]}
    on_cpu = stage.key("store", arguments)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert stage.key("store", arguments) != on_cpu
    planned_rtn = {**arguments, "config": chain["qconfig"].model_copy(update={"algorithm": "rtn"})}
    gpu_planned = stage.key("store", planned_rtn)
    plain = {**arguments, "config": chain["qconfig"].model_copy(update={"algorithm": "rtn", "size_budget": None})}
    gpu_plain = stage.key("store", plain)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu_plain = stage.key("store", plain)
    assert cpu_plain == gpu_plain
    assert stage.key("store", planned_rtn) != gpu_planned
    assert stage.key("store", arguments) == on_cpu and cpu_plain != on_cpu
