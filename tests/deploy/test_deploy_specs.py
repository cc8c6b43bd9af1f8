"""The deployments as code, without a server: what `python -m deployments.deploy` would create."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.deploy import Site, flow_params, specs
from oliveflow.config import FinetuneConfig, PipelineParams

REPO = Path(__file__).resolve().parents[2]


def dry_run(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "deployments.deploy", "--dry-run", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_default_site_has_gpu_retrain_and_cpu_deployments():
    plan = dry_run()
    assert set(plan["pools"]) == {"oliveflow-gpu", "oliveflow-cpu"}
    assert plan["limits"] == {"gpu-0": 1}
    by_name = {d["name"]: d for d in plan["deployments"]}
    assert set(by_name) == {"gpu-0", "retrain-weekly", "cpu"}
    for name in ("gpu-0", "retrain-weekly"):
        env = by_name[name]["job_variables"]["env"]
        assert by_name[name]["work_pool"] == "oliveflow-gpu"
        assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["OLIVEFLOW_GPU_LIMIT"] == "gpu-0"
    assert by_name["cpu"]["work_pool"] == "oliveflow-cpu"
    assert "OLIVEFLOW_GPU_LIMIT" not in by_name["cpu"]["job_variables"]["env"]
    assert by_name["cpu"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    # Weekly retraining, and only there.
    assert by_name["retrain-weekly"]["cron"] == "0 3 * * 1" and by_name["retrain-weekly"]["timezone"] == "UTC"
    assert by_name["gpu-0"]["cron"] is None and by_name["cpu"]["cron"] is None


def test_one_deployment_and_one_limit_per_gpu_and_cpu_pool_optional():
    plan = dry_run("--gpus", "0,1", "--limit-prefix", "gpu-hosta", "--no-cpu")
    assert set(plan["pools"]) == {"oliveflow-gpu"}
    assert plan["limits"] == {"gpu-hosta-0": 1, "gpu-hosta-1": 1}
    envs = {d["name"]: d["job_variables"]["env"] for d in plan["deployments"]}
    assert set(envs) == {"gpu-0", "gpu-1", "retrain-weekly"}
    assert (envs["gpu-1"]["CUDA_VISIBLE_DEVICES"], envs["gpu-1"]["OLIVEFLOW_GPU_LIMIT"]) == ("1", "gpu-hosta-1")


def test_several_hosts_bind_gpus_per_worker_with_a_limit_per_host_and_gpu():
    plan = dry_run("--hosts", "a,b", "--gpus", "0,1")
    assert set(plan["limits"]) == {"gpu-a-0", "gpu-a-1", "gpu-b-0", "gpu-b-1"}
    by_name = {d["name"]: d for d in plan["deployments"]}
    assert set(by_name) == {"gpu", "retrain-weekly", "cpu"}
    for name in ("gpu", "retrain-weekly"):  # unpinned: the worker's own environment decides
        env = by_name[name]["job_variables"]["env"]
        assert "CUDA_VISIBLE_DEVICES" not in env and "OLIVEFLOW_GPU_LIMIT" not in env
    commands = plan["workers"]["b"]
    assert commands[1].startswith("CUDA_VISIBLE_DEVICES=1 OLIVEFLOW_GPU_LIMIT=gpu-b-1 prefect worker start "
                                  "--pool oliveflow-gpu --limit 1")


def test_data_location_and_overrides_become_validated_default_parameters(tmp_path):
    site = Site(train_data=str(tmp_path / "train.jsonl"), eval_data="", params={"finetune": {"max_steps": 7}},
                env={"OLIVEFLOW_HOME": "/shared/oliveflow"}, cron="0 4 * * 0")
    plan = specs(site)
    params = plan[0].parameters["params"]
    assert params == {"data": {"train_path": str(tmp_path / "train.jsonl"), "eval_path": None},
                      "finetune": {"max_steps": 7}}
    # Only the overrides are stored: the worker fills the rest from the flow's own defaults.
    resolved = PipelineParams.model_validate(params)
    assert resolved.finetune.max_steps == 7 and resolved.finetune.r == FinetuneConfig().r
    assert all(s.parameters == plan[0].parameters for s in plan)
    assert all(s.job_variables["env"]["OLIVEFLOW_HOME"] == "/shared/oliveflow" for s in plan)
    assert [s.cron for s in plan if s.cron] == ["0 4 * * 0"]


def test_bad_default_parameter_fails_at_deploy_time_with_one_line():
    with pytest.raises(SystemExit, match=r"finetune\.max_steps"):
        flow_params(Site(params={"finetune": {"max_steps": 0}}))
    done = subprocess.run([sys.executable, "-m", "deployments.deploy", "--dry-run", "--param", "quantize.bits=3"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "quantize.bits" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_deploy_needs_a_server_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "deployments.deploy"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "PREFECT_API_URL" in done.stderr


def test_shared_storage_options_reach_every_deployment():
    plan = dry_run("--artifact-store", "az://models/team", "--result-storage", "az://prefect-results/oliveflow")
    for deployment in plan["deployments"]:
        assert deployment["parameters"]["params"]["artifact_store"] == "az://models/team"
        env = deployment["job_variables"]["env"]
        assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == "azure-blob-storage-container/oliveflow-results"
    plain = dry_run()
    assert all("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK" not in d["job_variables"]["env"] for d in plain["deployments"])


def test_bad_result_storage_and_missing_credentials_are_one_line_errors(monkeypatch):
    from deployments.deploy import save_result_storage

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    with pytest.raises(SystemExit, match=r"'prefect-results' is not a URL"):
        save_result_storage("prefect-results")
    with pytest.raises(SystemExit, match="needs AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCOUNT_NAME"):
        save_result_storage("az://prefect-results")
    plan = dry_run("--result-storage", "s3://team-bucket/prefect")
    assert {d["job_variables"]["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] for d in plan["deployments"]} == {
        "remote-file-system/oliveflow-results"}
