import json
import shutil

import pytest

from oliveflow.config import QuantizeConfig
from oliveflow.errors import InputError
from oliveflow.stages.model import resolve_model


def clone(src, dst, **config_changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_resolves_a_local_folder(tiny_model_dir):
    ref = resolve_model(str(tiny_model_dir), QuantizeConfig())
    assert ref.architecture == "Phi3ForCausalLM" and ref.hidden_size == 128 and len(ref.artifact.sha256) == 64


def test_missing_path():
    with pytest.raises(InputError, match="does not exist"):
        resolve_model("./missing-model", QuantizeConfig())


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        resolve_model(str(tmp_path), QuantizeConfig())


def test_not_a_causal_lm(tiny_model_dir, tmp_path):
    folder = clone(tiny_model_dir, tmp_path / "m", architectures=["BertModel"])
    with pytest.raises(InputError, match="not a causal language model"):
        resolve_model(str(folder), QuantizeConfig())


def test_architecture_the_exporter_cannot_take(tiny_model_dir, tmp_path):
    folder = clone(tiny_model_dir, tmp_path / "m", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(InputError, match="not a causal language model|exporter cannot take"):
        resolve_model(str(folder), QuantizeConfig())
    folder = clone(tiny_model_dir, tmp_path / "m2", architectures=["FalconForCausalLM"])
    with pytest.raises(InputError, match="FalconForCausalLM, which the installed onnxruntime-genai exporter cannot"):
        resolve_model(str(folder), QuantizeConfig())


def test_accepted_architectures_are_the_builders_own():
    """Every causal LM the installed builder dispatches on is accepted; read independently of the code's AST walk."""
    import importlib.util
    import re
    from pathlib import Path

    from oliveflow.stages.model import exportable_architectures

    source = Path(importlib.util.find_spec("onnxruntime_genai.models.builder").origin).read_text()
    listed = set(re.findall(r'config\.architectures\[0\] == "(\w+ForCausalLM)"', source))
    assert len(listed) >= 15, "the builder's dispatch moved; the test no longer reads it"
    assert exportable_architectures() == listed
    # ones the old hand-written subset refused although the builder takes them
    assert {"PhiForCausalLM", "Gemma3ForCausalLM", "InternLM2ForCausalLM", "Lfm2ForCausalLM",
            "GptOssForCausalLM", "PhiMoEForCausalLM"} <= listed


@pytest.mark.parametrize("architecture", ["Gemma3ForCausalLM", "GptOssForCausalLM", "Lfm2ForCausalLM"])
def test_architectures_the_builder_takes_are_not_refused(architecture, tiny_model_dir, tmp_path):
    folder = clone(tiny_model_dir, tmp_path / "m", architectures=[architecture])
    assert resolve_model(str(folder), QuantizeConfig()).architecture == architecture


def test_parameters_are_counted_from_the_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert resolve_model(str(tiny_model_dir), QuantizeConfig()).parameters == model.num_parameters()


def test_group_size_must_divide_dimensions(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match=r"hidden_size=128 is not divisible by quantize.group_size=256"):
        resolve_model(str(tiny_model_dir), QuantizeConfig(group_size=256))


def test_already_quantized_model(tiny_model_dir, tmp_path):
    folder = clone(tiny_model_dir, tmp_path / "m", quantization_config={"quant_method": "olive"})
    with pytest.raises(InputError, match="already quantized"):
        resolve_model(str(folder), QuantizeConfig())


def test_hash_changes_with_weights(tiny_model_dir, tmp_path):
    folder = clone(tiny_model_dir, tmp_path / "m")
    before = resolve_model(str(folder), QuantizeConfig()).artifact.sha256
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    assert resolve_model(str(folder), QuantizeConfig()).artifact.sha256 != before
