"""The GPU path, executed: the tiny chain fine-tuned on a CUDA GPU, exported for CUDA and run by
onnxruntime-genai-cuda with and without the adapter.

Skipped, saying why, without a CUDA GPU. Run it on a GPU machine with the `gpu` extra installed:

    pytest -m live tests/live/test_gpu.py

Where the export's builder and the CUDA runtime cannot share one environment (a CUDA 13 machine: the builder
needs onnxruntime-genai 0.14, whose CUDA build is for CUDA 12; README "GPU"), install onnxruntime-gpu and
onnxruntime-genai-cuda into a folder of their own and point ``OLIVEFLOW_GPU_SITE`` at it: the smoke test then
runs in a child process (``oliveflow stage smoke_test``) with that folder first on its path.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)"),
]


def _smoke_on_gpu(onnx, chain) -> dict:
    """The smoke test of the CUDA build: in this process when its onnxruntime-genai has CUDA, else in a child
    with $OLIVEFLOW_GPU_SITE first on its path."""
    import onnxruntime_genai as og

    from oliveflow.config import SmokeTestConfig
    from oliveflow.stages.smoke_test import smoke_test
    from oliveflow.store import MANIFEST, RESULT_FILE

    config = SmokeTestConfig(num_samples=3, max_new_tokens=24)
    if og.is_cuda_available():
        return json.loads(smoke_test(onnx, chain["base"], chain["data"], chain["template"], config).model_dump_json())
    site = os.environ.get("OLIVEFLOW_GPU_SITE")
    if not site:
        pytest.skip("this onnxruntime-genai has no CUDA: install the gpu extra, or set OLIVEFLOW_GPU_SITE to a "
                    "folder holding onnxruntime-gpu and onnxruntime-genai-cuda")
    (onnx.artifact.path / RESULT_FILE).write_text(onnx.model_dump_json())
    (onnx.artifact.path / MANIFEST).write_text(json.dumps({"sha256": onnx.artifact.sha256,
                                                           "size_bytes": onnx.artifact.size_bytes}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])}
    data = chain["data"]
    done = subprocess.run(
        [sys.executable, "-m", "oliveflow.cli", "stage", "smoke_test", "--onnx", str(onnx.artifact.path),
         "--model", chain["base"].spec, "--param", f"data.train_path={data.train_path}",
         "--param", f"data.eval_path={data.eval_path}", "--param", f"data.template={chain['template']}",
         "--param", f"smoke_test.num_samples={config.num_samples}",
         "--param", f"smoke_test.max_new_tokens={config.max_new_tokens}"],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_the_tiny_chain_runs_on_the_gpu_with_and_without_its_adapter(chain, tmp_path):
    from oliveflow.config import ExportConfig
    from oliveflow.stages.export import export

    adapter = chain["adapter"]
    assert adapter.plan is not None and adapter.plan["device"] != "cpu", "the fine-tune was planned for the GPU"
    assert adapter.eval_loss_finetuned < adapter.eval_loss_quantized
    onnx = export(chain["quantized"], adapter, ExportConfig(device="gpu"), tmp_path)
    report = _smoke_on_gpu(onnx, chain)
    samples = report["samples"]
    assert len(samples) == 3 and all(s["finetuned_answer"] and s["base_answer"] for s in samples)
    assert any(s["finetuned_answer"] != s["base_answer"] for s in samples), "the adapter changes the answers"
    assert report["ttft_seconds"] > 0 and report["decode_tokens_per_second"] > 0
    assert report["decode_tokens_per_second_base"] > 0
    assert math.isfinite(report["rouge_l_finetuned"])
