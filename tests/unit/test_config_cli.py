import subprocess
import sys

import pytest
from pydantic import ValidationError

from oliveflow.cli import _parser, build_params
from oliveflow.config import PipelineParams, QuantizeConfig
from oliveflow.errors import InputError


def params(*argv):
    return build_params(_parser().parse_args(["run", *argv]))


def test_defaults_are_the_embedded_run():
    p = PipelineParams()
    assert p.model == "embedded:tiny-phi3" and p.quantize.algorithm == "awq+gptq" and p.export.device == "cpu"


def test_flags_and_dotted_params():
    p = params("--max-steps", "7", "--param", "finetune.r=4", "--param", "quantize.group_size=64",
               "--template", "{q} => {a}")
    assert p.finetune.max_steps == 7 and p.finetune.r == 4 and p.quantize.group_size == 64
    assert p.data.template == "{q} => {a}"


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValidationError, match="'awq', 'rtn', 'gptq' or 'awq\\+gptq'"):
        params("--param", "quantize.algorithm=int3")


def test_unknown_parameter_is_refused():
    with pytest.raises(ValidationError):
        params("--param", "finetune.rank=8")


def test_param_without_equals():
    with pytest.raises(InputError, match="not key=value"):
        params("--param", "finetune.r")


def test_group_size_must_be_power_of_two():
    with pytest.raises(ValidationError):
        QuantizeConfig(group_size=48)


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such.jsonl"], "data file /no/such.jsonl does not exist"),
    (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
    (["--param", "quantize.algorithm=int3"], "invalid parameter quantize.algorithm: Input should be 'awq', 'rtn', 'gptq' or 'awq+gptq'"),
    (["--template", "no fields"], "invalid parameter data.template"),
    (["--param", "artifact_store=nope://x"], "unknown protocol 'nope'"),
    # s3fs is not installed here: a known protocol whose package is missing says what to install.
    (["--param", "artifact_store=s3://bucket/store"], "artifact store s3://bucket/store: Install s3fs"),
])
def test_cli_bad_input_is_one_line_and_nonzero(argv, message):
    done = subprocess.run([sys.executable, "-m", "oliveflow.cli", "run", *argv], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oliveflow: error: ") and message in lines[0], done.stderr


def test_retry_only_transient_errors():
    from prefect.states import Failed

    from oliveflow.errors import StageError
    from tasks.stages import _transient

    def failed(exc):
        return Failed(data=exc)

    assert _transient(None, None, failed(ConnectionError("reset"))) is True
    assert _transient(None, None, failed(StageError("no output model"))) is False
    assert _transient(None, None, failed(InputError("bad line"))) is False


def test_a_runs_changes_overlay_its_deployments_defaults_at_every_depth():
    from oliveflow.config import overlay

    deployment = PipelineParams(data={"train_path": "/data/week.jsonl", "eval_path": None},
                                finetune={"max_steps": 7, "batch_size": 2}).model_dump(mode="json",
                                                                                      exclude_unset=True)
    run = PipelineParams.model_validate({"finetune": {"max_steps": 3}, "smoke_test": {"num_samples": 0}})
    merged = overlay(deployment, run)
    assert merged.finetune.max_steps == 3 and merged.finetune.batch_size == 2, "the run's step count, the rest kept"
    assert str(merged.data.train_path) == "/data/week.jsonl" and merged.data.eval_path is None
    assert merged.smoke_test.num_samples == 0
    assert overlay({}, run) is run
    # A value the run sets explicitly wins even when it equals the flow's own default.
    assert overlay(deployment, PipelineParams.model_validate({"finetune": {"max_steps": 100}})).finetune.max_steps == 100


def test_lora_rate_and_alpha_follow_the_model_size_unless_set():
    from oliveflow.config import FinetuneConfig

    assert FinetuneConfig().for_model(850_000).learning_rate == 2e-3
    assert FinetuneConfig().for_model(134_515_008).learning_rate == 5e-4
    assert FinetuneConfig().for_model(3_821_079_552).learning_rate == 2e-4
    assert FinetuneConfig(r=8).for_model(10**8).alpha == 16
    chosen = FinetuneConfig(learning_rate=1e-4, alpha=4).for_model(10**8)
    assert (chosen.learning_rate, chosen.alpha) == (1e-4, 4)
