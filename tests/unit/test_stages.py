"""The stage chain on the tiny model: quantize -> LoRA on the quantized model -> export -> genai."""

import json
import math

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file

from oliveflow.config import ExportConfig, SmokeTestConfig
from oliveflow.stages.export import export
from oliveflow.stages.smoke_test import smoke_test
from oliveflow.olive_runner import CONFIG_FILE


def test_quantize_writes_an_olive_quantized_checkpoint(chain):
    quantized = chain["quantized"]
    config = json.loads((quantized.model_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "olive"
    assert config["quantization_config"]["group_size"] == 32
    assert (quantized.artifact.path / CONFIG_FILE).is_file(), "the Olive config is saved beside the output"
    assert not (quantized.artifact.path / ".olive-work").exists(), "Olive's copies are removed"
    assert quantized.size_after_bytes < quantized.size_before_bytes


def test_finetune_trains_on_the_quantized_model(chain):
    adapter = chain["adapter"]
    weights = load_file(adapter.adapter_dir / "adapter_model.safetensors")
    assert any("qkv_proj.lora_A" in k for k in weights) and any("o_proj.lora_B" in k for k in weights)
    assert len(adapter.train_loss) == 30
    assert np.mean(adapter.train_loss[-5:]) < np.mean(adapter.train_loss[:5])
    assert all(math.isfinite(x) for x in (adapter.eval_loss_original, adapter.eval_loss_quantized,
                                          adapter.eval_loss_finetuned))
    assert adapter.eval_loss_finetuned < adapter.eval_loss_quantized
    saved = json.loads((adapter.artifact.path / CONFIG_FILE).read_text())
    assert saved["passes"]["finetune"]["type"] == "QuantLoRA"


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)


def _onnx_weights(model_dir) -> dict[str, np.ndarray]:
    """Dequantize every MatMulNBits of the exported graph to an (out, in) float32 matrix."""
    model = onnx.load(str(model_dir / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, block, bits = attrs["N"], attrs["K"], attrs["block_size"], attrs["bits"]
        unpack = _unpack_nibbles if bits == 4 else (lambda packed: packed)
        codes = unpack(inits[node.input[1]]).reshape(n, -1).astype(np.float32)
        scales = inits[node.input[2]].reshape(n, -1).astype(np.float32)
        if len(node.input) > 3 and node.input[3]:
            zeros = unpack(inits[node.input[3]]).reshape(n, -1)[:, : scales.shape[1]].astype(np.float32)
        else:
            zeros = np.full_like(scales, 2 ** (bits - 1))
        blocks = (codes.reshape(n, -1, block) - zeros[..., None]) * scales[..., None]
        weights[node.input[1]] = blocks.reshape(n, -1)[:, :k]
    return weights


def test_export_copies_the_int4_grid_bit_exactly(chain):
    """The exported base weights are exactly the int4 grid that the adapter was trained on (the quantize stage's
    codes, with the scales the fine-tune trained): nothing re-quantized."""
    from olive.model import HfModelHandler

    # What the export builds from: the quantize stage's checkpoint, with the scales trained by the fine-tune.
    shipped = chain["adapter"].tuned_model_dir or chain["quantized"].model_dir
    torch_model = HfModelHandler(model_path=str(shipped)).load_model()
    config = torch_model.config
    q_size = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    kv_size = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    exported = _onnx_weights(chain["onnx"].model_dir)
    checked = 0
    def grid(module):
        return module.unpack_and_dequantize(module.qweight, module.scales, module.qzeros).float().numpy()

    for i, layer in enumerate(torch_model.model.layers):
        qkv, gate_up = grid(layer.self_attn.qkv_proj), grid(layer.mlp.gate_up_proj)
        inter = config.intermediate_size
        expected = {
            "q_proj": qkv[:q_size], "k_proj": qkv[q_size:q_size + kv_size], "v_proj": qkv[q_size + kv_size:],
            "o_proj": grid(layer.self_attn.o_proj), "gate_proj": gate_up[:inter], "up_proj": gate_up[inter:],
            "down_proj": grid(layer.mlp.down_proj),
        }
        for name, weight in expected.items():
            (key,) = [k for k in exported if f"layers.{i}." in k and f".{name}." in k and "lora" not in k]
            np.testing.assert_array_equal(exported[key], weight, err_msg=key)
            checked += 1
    (head,) = [k for k in exported if k.startswith("lm_head")]
    np.testing.assert_array_equal(exported[head], grid(torch_model.lm_head), err_msg=head)
    assert checked == 7 * config.num_hidden_layers
    assert not any("lora" in k for k in exported), "LoRA weights stay float (the model must run without them)"


def _torch_and_genai_logits(chain, ids, with_adapter):
    import onnxruntime_genai as og
    from olive.model import HfModelHandler

    from oliveflow.olive_ext import load_adapter

    shipped = chain["adapter"].tuned_model_dir or chain["quantized"].model_dir
    tuned = load_adapter(HfModelHandler(model_path=str(shipped)).load_model(),
                         chain["adapter"].adapter_dir).eval()
    with torch.no_grad():
        if with_adapter:
            expected = tuned(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        else:
            with tuned.disable_adapter():
                expected = tuned(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    onnx_model = chain["onnx"]
    model = og.Model(str(onnx_model.model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4)
    generator = og.Generator(model, params)
    if with_adapter:
        adapters = og.Adapters(model)
        adapters.load(str(onnx_model.adapter_file), "a")
        generator.set_active_adapter(adapters, "a")
    generator.append_tokens(ids)
    actual = np.asarray(generator.get_logits()).reshape(-1)[: expected.shape[0]]
    return expected, actual


@pytest.mark.parametrize("with_adapter", [True, False])
def test_genai_matches_pytorch(chain, with_adapter):
    """onnxruntime-genai reproduces the PyTorch model (quantized base, with or without the adapter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chain["quantized"].model_dir)
    ids = tokenizer("<|user|>\nWhat should I pack for Lisbon?<|end|>\n<|assistant|>\n")["input_ids"]
    expected, actual = _torch_and_genai_logits(chain, ids, with_adapter)
    assert np.argmax(actual) == np.argmax(expected)
    spread = expected.max() - expected.min()
    assert np.abs(actual - expected).max() < 0.02 * spread


def test_adapter_changes_the_output(chain):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chain["quantized"].model_dir)
    ids = tokenizer("<|user|>\nWhat should I pack for Lisbon?<|end|>\n<|assistant|>\n")["input_ids"]
    _, tuned = _torch_and_genai_logits(chain, ids, True)
    _, plain = _torch_and_genai_logits(chain, ids, False)
    assert np.abs(tuned - plain).max() > 1e-3


def test_smoke_test_reports_answers_latency_and_size(chain):
    report = smoke_test(chain["onnx"], chain["base"], chain["data"], chain["template"],
                        SmokeTestConfig(num_samples=2, max_new_tokens=12))
    assert report.answered and len(report.samples) == 2
    assert all(s.prompt.startswith("<|user|>") for s in report.samples)
    assert report.ttft_seconds > 0 and report.decode_tokens_per_second > 0
    assert report.token_latency_p90_ms >= report.token_latency_p50_ms > 0
    assert report.size_reduction > 1 and report.size_after_bytes < report.size_before_bytes


def test_gpu_export_builds_a_cuda_model_on_a_cpu_machine(chain, tmp_path):
    """The CUDA option's export runs anywhere; running it needs the gpu extra (tested live only)."""
    onnx_model = export(chain["quantized"], chain["adapter"], ExportConfig(device="gpu"), tmp_path)
    genai = json.loads((onnx_model.model_dir / "genai_config.json").read_text())
    providers = json.dumps(genai["model"]["decoder"]["session_options"]["provider_options"])
    assert "cuda" in providers
    assert onnx_model.adapter_file.is_file()


def test_stage_command_runs_stages_one_by_one(tiny_model_dir, tmp_path, capsys):
    """`oliveflow stage NAME` chains stage outputs by folder, without Prefect."""
    from oliveflow.cli import main

    common = ["--model", str(tiny_model_dir), "--max-steps", "2", "--param", "smoke_test.num_samples=1"]
    assert main(["stage", "quantize", *common, "--output", str(tmp_path / "q")]) == 0
    assert main(["stage", "finetune", *common, "--quantized", str(tmp_path / "q"), "--output", str(tmp_path / "f")]) == 0
    assert main(["stage", "export", *common, "--quantized", str(tmp_path / "q"), "--adapter", str(tmp_path / "f"),
                 "--output", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert main(["stage", "smoke_test", *common, "--onnx", str(tmp_path / "e")]) == 0
    assert json.loads(capsys.readouterr().out)["samples"]
    assert main(["stage", "finetune", *common, "--output", str(tmp_path / "x")]) == 2
    assert "needs --quantized" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["gptq", "rtn", "awq"])
def test_other_quantizers_run_offline(algorithm, chain, tmp_path, monkeypatch):
    """gptq calibrates on the project's data (HF_HUB_OFFLINE is set for the whole suite: no Hub download)."""
    from oliveflow.config import QuantizeConfig
    from oliveflow.stages.quantize import quantize

    result = quantize(chain["base"], QuantizeConfig(algorithm=algorithm, calibration_blocks=8), tmp_path,
                      data=chain["data"])
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "olive"
    saved = json.loads((result.artifact.path / CONFIG_FILE).read_text())
    assert saved["passes"]["quantize"]["type"] == {"gptq": "Gptq", "rtn": "Rtn", "awq": "Awq"}[algorithm]


def test_awq_weighted_by_response_tokens_calibrates_on_the_examples(chain, tmp_path):
    """quantize.prompt_weight: AWQ's search reads the training examples one by one, prompt tokens weighed less;
    the choice differs from the packed text's, and GPTQ keeps the packed text."""
    from oliveflow.config import QuantizeConfig
    from oliveflow.stages.quantize import quantize

    alphas = {}
    for weight in (None, 0.0):
        config = QuantizeConfig(algorithm="awq+gptq", calibration_blocks=8, size_budget=None, prompt_weight=weight)
        result = quantize(chain["base"], config, tmp_path / str(weight), data=chain["data"])
        report = json.loads((result.model_dir / "awq_report.json").read_text())
        alphas[weight] = [g["alpha"] for layer in report["layers"] for g in layer["groups"]]
        saved = json.loads((result.artifact.path / CONFIG_FILE).read_text())
        names = [d["name"] for d in saved["data_configs"]]
        assert saved["passes"]["quantize"]["data_config"] == "calibration"
        if weight is None:
            assert names == ["calibration"] and "prompt_weight" not in saved["passes"]["quantize"]
        else:
            assert names == ["calibration", "awq_search"] and saved["passes"]["quantize"]["prompt_weight"] == 0.0
            assert saved["data_configs"][1]["pre_process_data_config"]["loss_on"] == "response"
    assert alphas[None] != alphas[0.0]


def _with_nan(folder_src, folder_dst, pick):
    """A copy of a model folder whose first tensor (in name order) matching ``pick`` is all NaN."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(folder_src, folder_dst)
    path = folder_dst / "model.safetensors"
    tensors = load_file(path)
    name = sorted(n for n in tensors if pick(n))[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize(("init", "message"), [
    ("standard", r"finetune: .*(loss|grad_norm) is nan at step 1"),
    # the default: the error init reads the layers' inputs first, and says which are not finite
    ("error", r"finetune: .*finetune.init error: the inputs of model\.layers\.0\.self_attn\.\w+ are not finite"),
])
def test_a_planted_nan_fails_the_finetune_at_its_step(chain, tmp_path, init, message):
    from oliveflow.config import FinetuneConfig
    from oliveflow.errors import StageError
    from oliveflow.stages.finetune import finetune

    quantized = chain["quantized"]
    _with_nan(quantized.model_dir, tmp_path / "q" / "model", lambda n: n.endswith("norm.weight"))
    broken = quantized.model_copy(update={"artifact": quantized.artifact.model_copy(update={"path": tmp_path / "q"})})
    out = tmp_path / "f"
    out.mkdir()
    with pytest.raises(StageError, match=message):
        finetune(chain["base"], broken, chain["data"], chain["template"],
                 FinetuneConfig(max_steps=3, init=init, distill=0), out)
    assert not (out / "adapter").exists(), "nothing is kept of a failed fine-tune"


def test_smoke_test_fails_on_non_finite_logits(chain, tmp_path):
    import shutil

    from oliveflow.errors import StageError

    onnx_result = chain["onnx"]
    folder = tmp_path / "e"
    shutil.copytree(onnx_result.artifact.path, folder)
    graph = onnx.load(str(folder / "model" / "model.onnx"))
    norm = next(i for i in graph.graph.initializer if "final_norm" in i.name or i.name.endswith("norm.weight"))
    values = onnx.numpy_helper.to_array(norm).copy()
    values[:] = np.nan
    norm.CopyFrom(onnx.numpy_helper.from_array(values, norm.name))
    onnx.save(graph, str(folder / "model" / "model.onnx"))
    broken = onnx_result.model_copy(update={"artifact": onnx_result.artifact.model_copy(update={"path": folder})})
    with pytest.raises(StageError, match="non-finite logits"):
        smoke_test(broken, chain["base"], chain["data"], chain["template"], SmokeTestConfig(num_samples=1))


@pytest.mark.parametrize(("text", "tokens", "reason"), [
    ("", [2], "empty answer"),
    ("   ", [5, 2], "empty answer"),
    (",,,,", [16, 16, 16, 16], "one token (16) repeated 4 times"),
    ("Visit the old town " + "!" * 12, [7, 8, 9, 10] + [3] * 12, "stuck on token 3"),
    ("Take the ferry to Manly, then walk the cliffs.", [7, 8, 9, 10, 11, 12, 2], None),
    ("No no no", [41, 41, 41], None),  # short repeats are words, not a failure
    ("Ok", [5, 2, 2, 2, 2], None),  # eos padding after the answer is not a repeat
])
def test_degenerate_answers_are_recognised(text, tokens, reason):
    from oliveflow.stages.smoke_test import degenerate

    found = degenerate(text, tokens, eos={2})
    assert (found is None) if reason is None else (reason in found)


def test_smoke_test_scores_rouge_l_against_the_references(smoke_report):
    from oliveflow.stages.smoke_test import rouge_l

    assert all(s.reference for s in smoke_report.samples)
    assert 0 <= smoke_report.rouge_l_base <= 1 and 0 < smoke_report.rouge_l_finetuned <= 1
    assert rouge_l(["the old town at dusk"], ["the old town at dusk"]) == pytest.approx(1.0)
    assert rouge_l(["zzz"], ["the old town"]) == 0.0


def test_the_finetune_is_bit_reproducible(chain, tmp_path):
    """Two identical fine-tunes (fresh processes would differ in hash seed; here the RNG state differs) give the
    same adapter bytes and the same artifact hash: the LoRA init is seeded, timings and set order are not kept."""
    from oliveflow.config import FinetuneConfig
    from oliveflow.stages.finetune import finetune

    torch.manual_seed(12345)  # a different global RNG state before each run: the stage must not depend on it
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        results.append(finetune(chain["base"], chain["quantized"], chain["data"], chain["template"],
                                FinetuneConfig(max_steps=4, learning_rate=3e-3), out))
        torch.rand(7)
    first, second = results
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == \
        (second.adapter_dir / "adapter_model.safetensors").read_bytes()
    files = [{str(f.relative_to(r.artifact.path)): f.read_bytes() for f in sorted(r.artifact.path.rglob("*"))
              if f.is_file()} for r in results]
    assert files[0].keys() == files[1].keys()
    assert [name for name in files[0] if files[0][name] != files[1][name]] == []
    assert first.artifact.sha256 == second.artifact.sha256
    assert first.train_loss == second.train_loss


def test_the_default_quantize_is_bit_reproducible(chain, tmp_path):
    """A second run of the default quantizer (awq+gptq, mixed precision included) on the same model and data gives
    the same artifact hash: its reports keep no timings."""
    from oliveflow.stages.quantize import quantize

    again = quantize(chain["base"], chain["qconfig"], tmp_path, data=chain["data"])
    assert again.artifact.sha256 == chain["quantized"].artifact.sha256


@pytest.mark.parametrize("fits", [True, False])
def test_lora_base_is_unpacked_once_when_it_fits_else_every_pass(chain, fits, monkeypatch, caplog):
    """The float copy of the int4 base is kept only when it fits in half the free memory; either way the layers
    compute the same outputs, from the int4 grid that ships."""
    from olive.common.quant.nn import QuantLinear
    from olive.model import HfModelHandler

    from oliveflow import olive_ext

    model = HfModelHandler(model_path=str(chain["quantized"].model_dir)).load_model()
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    need = sum(m.rows * m.cols * m.scales.element_size() for m in layers)
    monkeypatch.setattr(olive_ext, "free_memory_bytes", lambda device: 3 * need if fits else need)
    x = torch.randn(2, 5, layers[0].cols)
    expected = layers[0](x)
    olive_ext.dequantize_once(model)
    got = layers[0](x)
    cached = "_oliveflow_weight" in layers[0].__dict__
    assert cached is fits
    assert ("does not fit" in caplog.text) is not fits
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    if fits:  # the kept copy is exactly the layer's own dequantized int4 weight
        unpacked = layers[0].unpack_and_dequantize(layers[0].qweight, layers[0].scales, layers[0].qzeros)
        assert torch.equal(layers[0].__dict__["_oliveflow_weight"], unpacked)


def test_micro_batches_with_accumulation_learn_what_one_batch_learns(chain, tmp_path, caplog):
    """The memory plan may split a batch of 8 into 4 micro-batches of 2: the loss curve and the adapter stay the
    same within float32 noise (the summed loss is divided by the whole batch's tokens); the plan is logged and
    recorded.

    The plain LoRA (no trained scales, standard init, no distillation): the default's distillation trains its own
    float teacher in each run, with that run's micro-batches, so two runs differ by the teacher's float32 noise too
    (measured: 1.3e-5 on a 0.13 weight). The accumulation under test is the same code path either way."""
    import logging

    from oliveflow.config import FinetuneConfig
    from oliveflow.stages.finetune import finetune

    caplog.set_level(logging.INFO, logger="oliveflow.stages.finetune")
    runs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        out.mkdir()
        config = FinetuneConfig(max_steps=4, learning_rate=3e-3, micro_batch_size=micro,
                                train_scales=False, init="standard", distill=0.0)
        runs[micro] = finetune(chain["base"], chain["quantized"], chain["data"], chain["template"], config, out)
    whole, split = runs[8], runs[2]
    assert (whole.plan["micro_batch_size"], whole.plan["gradient_accumulation_steps"]) == (8, 1)
    assert (split.plan["micro_batch_size"], split.plan["gradient_accumulation_steps"]) == (2, 4)
    assert "finetune: micro-batch 2 x 4 accumulation steps, gradient checkpointing off" in caplog.text
    assert split.train_loss == pytest.approx(whole.train_loss, rel=1e-4)
    a = load_file(whole.adapter_dir / "adapter_model.safetensors")
    b = load_file(split.adapter_dir / "adapter_model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key


def test_the_gpu_export_is_a_cuda_int4_graph_with_the_same_codes_and_a_float_adapter(chain, tmp_path):
    """export.device=gpu needs no GPU to build: ModelBuilder writes a CUDA graph (fp16 activations, the same int4
    codes as the CPU build), and the adapter file beside it. Running it needs onnxruntime-genai-cuda
    (tests/live/test_gpu.py); a CPU-only runtime refuses it with a one-line reason."""
    import onnxruntime_genai as og

    from oliveflow.errors import StageError

    gpu = export(chain["quantized"], chain["adapter"], ExportConfig(device="gpu"), tmp_path)
    assert gpu.device == "gpu" and gpu.adapter_file.is_file()
    genai = json.loads((gpu.model_dir / "genai_config.json").read_text())
    providers = [name for option in genai["model"]["decoder"]["session_options"]["provider_options"]
                 for name in option]
    assert providers == ["cuda"]
    graph = onnx.load(str(gpu.model_dir / "model.onnx"), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    cpu_codes, gpu_codes = _onnx_weights(chain["onnx"].model_dir), _onnx_weights(gpu.model_dir)
    assert cpu_codes.keys() == gpu_codes.keys() and cpu_codes
    for name in cpu_codes:  # the same int4 grid; scales are stored in fp16 for CUDA
        np.testing.assert_allclose(gpu_codes[name], cpu_codes[name], rtol=1e-3, atol=1e-4)
    lora = [i for i in graph.input if "lora" in i.name]
    assert lora and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in lora)
    if not og.is_cuda_available():
        with pytest.raises(StageError, match="exported for CUDA but this onnxruntime-genai has no CUDA"):
            smoke_test(gpu, chain["base"], chain["data"], chain["template"], SmokeTestConfig(num_samples=1))
