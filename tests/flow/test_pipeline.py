"""The parent flow under a Prefect test harness, on the embedded default and on variations of it."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from flows.pipeline import pipeline
from oliveflow.config import DataConfig, FinetuneConfig, PipelineParams, QuantizeConfig, SmokeTestConfig
from oliveflow.errors import InputError
from oliveflow.store import ArtifactStore

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
# rtn: its output depends on the model alone, which is what the data/template cache tests are about.
FAST = dict(quantize=QuantizeConfig(algorithm="rtn", size_budget=None), finetune=FinetuneConfig(max_steps=5),
            smoke_test=SmokeTestConfig(num_samples=1, max_new_tokens=8))
HEAVY = ("quantize", "finetune", "export", "smoke_test")


def caches(result):
    return {name: run.cache for name, run in result.stages.items()}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default, exactly as `oliveflow run` does it (default parameters), cold."""
    return pipeline(PipelineParams(output_dir=tmp_path_factory.mktemp("out") / "model"))


def test_default_run_produces_a_working_model(default_run):
    result = default_run
    assert caches(result) == {name: "miss" for name in HEAVY}
    folder = result.onnx_model_dir
    for name in ("model.onnx", "genai_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert result.adapter_file.suffix == ".onnx_adapter" and result.adapter_file.is_file()
    assert result.size_reduction > 1.5
    assert result.smoke.answered and len(result.samples) == 8


def test_default_run_learns_the_travel_style(default_run):
    adapter = default_run.adapter
    assert adapter.eval_loss_finetuned < adapter.eval_loss_quantized
    assert adapter.eval_loss_finetuned < adapter.eval_loss_original
    assert adapter.response_ppl_finetuned < adapter.response_ppl_original
    smoke = default_run.smoke
    # ROUGE-L is reported, not compared: on this toy's 8 greedy answers (gibberish with travel words, with or
    # without the adapter) it flips with any change to the quantizer (0.107 vs 0.092 before the CPU-sized AWQ,
    # 0.091 vs 0.114 after, while the held-out perplexities above both improved). The real model's ROUGE-L is
    # measured by bench/bench_pipeline.py.
    assert 0 <= smoke.rouge_l_base <= 1 and 0 <= smoke.rouge_l_finetuned <= 1
    vocabulary = set(re.findall(r"[a-z']+", (REPO / "data" / "travel_train.jsonl").read_text().lower()))
    for sample in default_run.samples:
        words = re.findall(r"[a-z']+", sample.finetuned_answer.lower())
        assert len(words) >= 6, sample
        # A 0.85 M-parameter model trained on ~26 k tokens: travel-flavoured, with some made-up words.
        assert sum(w in vocabulary for w in words) / len(words) >= 0.7, sample
        assert "<|" not in sample.finetuned_answer


def test_identical_second_run_is_all_hits(default_run, tmp_path):
    again = pipeline(PipelineParams(output_dir=default_run.onnx_model_dir))
    assert caches(again) == {name: "hit" for name in HEAVY}
    assert again.onnx.artifact.sha256 == default_run.onnx.artifact.sha256


def test_awq_recalibrates_on_new_data_but_not_on_a_new_template(default_run, tmp_path):
    """awq (the default) calibrates on the data's fields: new data re-runs it, a new template does not."""
    templated = pipeline(PipelineParams(data=DataConfig(template="Q: {prompt}\nA: {response}<|end|>"),
                                        smoke_test=SmokeTestConfig(num_samples=1, max_new_tokens=8)))
    assert caches(templated)["quantize"] == "hit" and caches(templated)["finetune"] == "miss"
    lines = (REPO / "data" / "travel_train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[1:]) + "\n")
    changed = pipeline(PipelineParams(data=DataConfig(train_path=tmp_path / "train.jsonl"),
                                      finetune=FinetuneConfig(max_steps=5),
                                      smoke_test=SmokeTestConfig(num_samples=1, max_new_tokens=8)))
    assert caches(changed)["quantize"] == "miss"


def test_summary_artifact_is_published(default_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["oliveflow-summary"])))

    import asyncio

    artifacts = asyncio.run(read())
    assert artifacts and "| quantize |" in artifacts[0].data and "## Samples" in artifacts[0].data


@pytest.fixture(scope="module")
def fast_base(tmp_path_factory):
    params = PipelineParams(**FAST)
    return params, pipeline(params)


def test_only_lora_steps_changed_keeps_quantize(fast_base):
    params, _ = fast_base
    result = pipeline(params.model_copy(update={"finetune": FinetuneConfig(max_steps=6)}))
    assert caches(result) == {"quantize": "hit", "finetune": "miss", "export": "miss", "smoke_test": "miss"}


def test_changed_data_reruns_finetune_not_quantize(fast_base, tmp_path):
    params, _ = fast_base
    lines = (REPO / "data" / "travel_train.jsonl").read_text().splitlines()
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:-1]) + "\n")
    changed = params.model_copy(update={"data": DataConfig(train_path=train)})
    assert caches(pipeline(changed)) == {"quantize": "hit", "finetune": "miss", "export": "miss", "smoke_test": "miss"}


def test_changed_template_reruns_finetune_not_quantize(fast_base):
    params, _ = fast_base
    changed = params.model_copy(update={"data": DataConfig(template="Q: {prompt}\nA: {response}<|end|>")})
    result = pipeline(changed)
    assert caches(result) == {"quantize": "hit", "finetune": "miss", "export": "miss", "smoke_test": "miss"}
    assert result.samples[0].prompt.startswith("Q: ")


def test_deleted_or_altered_artifact_is_recomputed(fast_base):
    params, first = fast_base
    shutil.rmtree(first.adapter.artifact.path)
    result = pipeline(params)
    assert caches(result)["quantize"] == "hit" and caches(result)["finetune"] == "miss"
    assert result.adapter.adapter_dir.is_dir()
    # An altered file: the hash no longer matches, so it is rebuilt rather than handed out.
    (result.onnx.model_dir / "genai_config.json").write_text("{}")
    again = pipeline(params)
    assert caches(again)["export"] == "miss"
    assert json.loads((again.onnx.model_dir / "genai_config.json").read_text())["model"]


def test_bad_input_fails_early_and_keeps_the_cache(fast_base, tmp_path):
    params, first = fast_base
    store = ArtifactStore(params.store_location())
    before = sorted(p.name for p in store.root.glob("*/*"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(InputError, match="broken.jsonl:2"):
        pipeline(params.model_copy(update={"data": DataConfig(train_path=broken)}))
    assert sorted(p.name for p in store.root.glob("*/*")) == before
    assert store.lookup("quantize", next(store.root.glob("quantize/[0-9a-f]*")).name) is not None


def test_cli_json_summary_and_exit_code(default_run, tmp_path):
    done = subprocess.run([sys.executable, "-m", "oliveflow.cli", "run", "--json", "--output", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"onnx_model_dir", "adapter_file", "size_reduction", "samples", "stages"}
    assert {s["cache"] for s in summary["stages"].values()} == {"hit"}
    assert (tmp_path / "m" / "model.onnx").is_file() and summary["samples"][0]["answer"]


def test_flow_file_runs_as_a_script(default_run):
    done = subprocess.run([sys.executable, str(REPO / "flows" / "pipeline.py")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| quantize | hit |" in done.stdout
