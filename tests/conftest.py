"""Test-wide settings: every test runs offline, with its own oliveflow/Prefect homes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="oliveflow-tests-"))
os.environ["OLIVEFLOW_HOME"] = str(_HOME / "home")
os.environ["PREFECT_HOME"] = str(_HOME / "prefect")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "data" / "travel_train.jsonl"
EVAL = REPO / "data" / "travel_eval.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded model's architecture and tokenizer, briefly pretrained (fast to build)."""
    from oliveflow.tiny_model import TinyModelParams, build_tiny_model

    return build_tiny_model([TRAIN], tmp_path_factory.mktemp("models") / "tiny", params=TinyModelParams(steps=40, num_threads=1))


@pytest.fixture(scope="session")
def chain(tiny_model_dir, tmp_path_factory):
    """quantize -> finetune -> export on the tiny model, once per session."""
    from oliveflow.config import DataConfig, ExportConfig, FinetuneConfig, QuantizeConfig
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.export import export
    from oliveflow.stages.finetune import finetune
    from oliveflow.stages.model import resolve_model
    from oliveflow.stages.quantize import quantize

    root = tmp_path_factory.mktemp("chain")
    data_config = DataConfig(train_path=TRAIN, eval_path=EVAL)
    data = validate_data(data_config)
    # A budget that keeps some but not all of the tiny model's units at 8 bits: the chain ships a mixed graph.
    qconfig = QuantizeConfig(group_size=32, size_budget=0.95)
    base = resolve_model(str(tiny_model_dir), qconfig)
    quantized = quantize(base, qconfig, _fresh(root / "quantize"), data=data)
    template = resolve_template(data_config, tiny_model_dir)
    adapter = finetune(base, quantized, data, template,
                       FinetuneConfig(max_steps=30, learning_rate=3e-3), _fresh(root / "finetune"))
    onnx = export(quantized, adapter, ExportConfig(), _fresh(root / "export"))
    return {"base": base, "data": data, "template": template, "qconfig": qconfig, "quantized": quantized,
            "adapter": adapter, "onnx": onnx}


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="session")
def azurite_http(tmp_path_factory):
    """Azurite's blob service over plain http for the shared-storage tests, stopped by pid at the end."""
    from services import Azurite, azurite_binary, require, running

    binary = require(azurite_binary(), "Azurite not installed: run .ci/install-azurite.sh (npm install azurite "
                     "into $OLIVEFLOW_AZURITE_DIR, default ~/.cache/oliveflow-azurite)", ci_must_have=True)
    yield from running(Azurite(binary, tmp_path_factory.mktemp("azurite-http")))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the cross-host lock tests (Debian package redis-server, .ci/install-redis.sh)."""
    from services import Redis, redis_binary, require, running

    binary = require(redis_binary(), "redis-server not installed: run .ci/install-redis.sh (apt-get install "
                     "redis-server)", ci_must_have=False)
    yield from running(Redis(binary, tmp_path_factory.mktemp("redis")))
