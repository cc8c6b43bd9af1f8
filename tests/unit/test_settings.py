"""The settings model: every environment variable oliveflow reads, read in one place (oliveflow/settings.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from oliveflow.errors import InputError
from oliveflow.settings import Settings, current, load, use

VARIABLES = {
    "home": "OLIVEFLOW_HOME", "artifact_store": "OLIVEFLOW_ARTIFACT_STORE", "lock_url": "OLIVEFLOW_LOCK_URL",
    "lock_dir": "OLIVEFLOW_LOCK_DIR", "lock_lease_seconds": "OLIVEFLOW_LOCK_LEASE_SECONDS",
    "gpu_limit": "OLIVEFLOW_GPU_LIMIT", "wheelhouse": "OLIVEFLOW_WHEELHOUSE",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
}


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in VARIABLES.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    return monkeypatch


def test_defaults(clean_env, tmp_path):
    settings = load()
    assert settings.home == tmp_path / "user" / ".cache" / "oliveflow"
    assert (settings.artifact_store, settings.lock_url, settings.lock_dir, settings.gpu_limit, settings.wheelhouse,
            settings.mlflow_tracking_uri) == (None,) * 6
    assert settings.lock_lease_seconds == 60
    assert settings.store_location() == str(settings.home / "artifacts")
    assert settings.locks_folder() == (settings.home / "locks").resolve()


def test_each_field_has_its_variable_and_a_description():
    for field, name in VARIABLES.items():
        info = Settings.model_fields[field]
        assert info.validation_alias == name
        assert info.description and len(info.description) > 20
    assert all(info.description for info in Settings.model_fields.values())


def test_the_variables_are_read(clean_env, tmp_path):
    values = {"OLIVEFLOW_HOME": "~/oliveflow-home", "OLIVEFLOW_ARTIFACT_STORE": "az://c/p",
              "OLIVEFLOW_LOCK_URL": " redis://h:6379/0 ", "OLIVEFLOW_LOCK_DIR": str(tmp_path / "locks"),
              "OLIVEFLOW_LOCK_LEASE_SECONDS": "30", "OLIVEFLOW_GPU_LIMIT": "gpu-0",
              "OLIVEFLOW_WHEELHOUSE": str(tmp_path / "wheels"), "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    for name, value in values.items():
        clean_env.setenv(name, value)
    settings = load()
    assert settings.home == tmp_path / "user" / "oliveflow-home"  # expanded
    assert settings.store_location() == "az://c/p"
    assert settings.lock_url == "redis://h:6379/0"  # stripped
    assert settings.locks_folder() == (tmp_path / "locks").resolve()
    assert settings.lock_lease_seconds == 30.0 and settings.gpu_limit == "gpu-0"
    assert settings.wheelhouse == tmp_path / "wheels" and settings.mlflow_tracking_uri == "http://mlflow:5000"


def test_blank_values_count_as_unset(clean_env):
    for name in ("OLIVEFLOW_LOCK_URL", "OLIVEFLOW_GPU_LIMIT", "OLIVEFLOW_ARTIFACT_STORE", "OLIVEFLOW_LOCK_DIR",
                 "MLFLOW_TRACKING_URI", "OLIVEFLOW_LOCK_LEASE_SECONDS"):
        clean_env.setenv(name, " " if name != "OLIVEFLOW_LOCK_LEASE_SECONDS" else "")
    settings = load()
    assert settings.lock_url is settings.gpu_limit is settings.artifact_store is settings.lock_dir is None
    assert settings.mlflow_tracking_uri is None and settings.lock_lease_seconds == 60


@pytest.mark.parametrize("value, reason", [("abc", "valid number"), ("0", "greater than 0")])
def test_a_bad_value_is_a_one_line_input_error_naming_the_variable(clean_env, value, reason):
    clean_env.setenv("OLIVEFLOW_LOCK_LEASE_SECONDS", value)
    with pytest.raises(InputError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"$OLIVEFLOW_LOCK_LEASE_SECONDS={value!r}")
    assert reason in message


def test_a_bad_value_fails_the_command_in_one_line(clean_env, capsys):
    from oliveflow.cli import main

    clean_env.setenv("OLIVEFLOW_LOCK_LEASE_SECONDS", "abc")
    assert main(["cache", "info"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("oliveflow: error: $OLIVEFLOW_LOCK_LEASE_SECONDS='abc'")


def test_current_is_what_the_entry_point_installed_else_the_environment_now(clean_env, tmp_path):
    clean_env.setenv("OLIVEFLOW_HOME", str(tmp_path / "a"))
    assert current().home == tmp_path / "a"
    with use(load()) as installed:
        clean_env.setenv("OLIVEFLOW_HOME", str(tmp_path / "b"))
        assert current() is installed and current().home == tmp_path / "a"  # read once, at the entry point
        from oliveflow.config import PipelineParams, oliveflow_home

        assert oliveflow_home() == tmp_path / "a"
        assert PipelineParams().store_location() == str(tmp_path / "a" / "artifacts")
    assert current().home == tmp_path / "b"  # nothing installed: the environment as it is now


def test_the_lock_manager_comes_from_the_settings_passed(tmp_path):
    from tasks.locking import HostLockManager, lock_manager

    manager = lock_manager(Settings(home=tmp_path / "h", lock_dir=None, lock_url=None))
    assert isinstance(manager, HostLockManager)
    assert manager.lock_files_directory == (tmp_path / "h" / "locks").resolve()
    other = lock_manager(Settings(lock_dir=tmp_path / "l", lock_url=None))
    assert Path(other.lock_files_directory) == (tmp_path / "l").resolve()


def test_the_azure_variables_reach_the_registry_settings(monkeypatch):
    from oliveflow.config import AzurePrincipal, AzureWorkspace

    for name, value in {"AZURE_SUBSCRIPTION_ID": "sub-1", "AZURE_RESOURCE_GROUP": "rg", "AZUREML_WORKSPACE_NAME": "ws",
                        "AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s3cret"}.items():
        monkeypatch.setenv(name, value)
    workspace = AzureWorkspace().resolved()
    assert (workspace.subscription_id, workspace.resource_group, workspace.workspace_name) == ("sub-1", "rg", "ws")
    principal = AzurePrincipal.from_env()
    assert principal.client_secret.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(load())
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "")
    assert AzurePrincipal.from_env() is None
