"""resolve_model: turn a model spec (embedded name, local folder, Hub id) into a checked, hashed folder.

Everything that would make a later stage fail for the model's sake is checked here,
before any heavy work: it is a causal LM, the exporter takes its architecture, and its
dimensions divide by the quantization group size.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import os
import struct
from pathlib import Path

from oliveflow.config import EMBEDDED_MODEL, REAL_MODEL, QuantizeConfig, oliveflow_home
from oliveflow.errors import InputError
from oliveflow.hashing import config_sha256, tree_files, tree_sha256, tree_size
from oliveflow.results import Artifact, BaseModelRef


@functools.cache
def exportable_architectures() -> frozenset[str]:
    """The causal-LM architectures the installed onnxruntime-genai ModelBuilder dispatches on.

    Read from its own ``create_model`` (every ``config.architectures[0] == "..."`` test in builder.py),
    without importing it, so a newer builder widens the set with no change here. Multimodal
    ``...ForConditionalGeneration`` entries are left out: this pipeline trains text-only causal LMs.
    """
    source = Path(importlib.util.find_spec("onnxruntime_genai.models.builder").origin).read_text()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Subscript) and \
                ast.unparse(node.left) == "config.architectures[0]":
            found.update(c.value for c in node.comparators
                         if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return frozenset(name for name in found if name.endswith("ForCausalLM"))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as exc:
        raise InputError(f"model {repo_id!r} is not a local folder and could not be fetched from the Hugging Face "
                         f"Hub ({type(exc).__name__}); pass a local model folder or check network/HF_TOKEN") from None


def locate(spec: str) -> Path:
    """The local folder for a model spec (builds the embedded model, downloads a Hub id)."""
    if spec == EMBEDDED_MODEL:
        from oliveflow.tiny_model import ensure_tiny_model

        return ensure_tiny_model()
    if spec == REAL_MODEL:
        from oliveflow.real_models import ensure_smollm2

        return ensure_smollm2()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        from oliveflow.real_models import convert_gguf

        return convert_gguf(path)
    if path.exists():
        return path.resolve()
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1) or spec.count("/") != 1:
        raise InputError(f"model path {spec} does not exist; pass a model folder, a .gguf file, a Hub id like "
                         f"'microsoft/Phi-3.5-mini-instruct', {REAL_MODEL!r} or {EMBEDDED_MODEL!r}")
    return _hub_snapshot(spec)


def _hash_with_memo(folder: Path) -> str:
    """Tree hash, memoized on (path, size, mtime) of every file: re-hashing a 7 GB base per run is waste."""
    stamp = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in tree_files(folder)])
    memo_dir = oliveflow_home() / "hash-memo"
    memo = memo_dir / (config_sha256(stamp) + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    digest = tree_sha256(folder)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(digest)
    os.replace(tmp, memo)
    return digest


def check_model_folder(folder: Path, quantize: QuantizeConfig) -> dict:
    """Validate a model folder for this pipeline; return its config dict."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"model folder {folder} has no config.json; pass a Hugging Face model folder "
                         "(config.json + safetensors weights + tokenizer)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError:
        raise InputError(f"{config_file} is not valid JSON; re-save the model with save_pretrained") from None
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    if not architecture.endswith("ForCausalLM"):
        raise InputError(f"model {folder} is not a causal language model (architectures={architectures}); "
                         "pass a *ForCausalLM checkpoint")
    if architecture not in exportable_architectures():
        raise InputError(f"model {folder} has architecture {architecture}, which the installed onnxruntime-genai "
                         f"exporter cannot take; use one of {', '.join(sorted(exportable_architectures()))}")
    if "quantization_config" in config:
        raise InputError(f"model {folder} is already quantized ({config['quantization_config'].get('quant_method')});"
                         " pass the unquantized base model")
    if not any(folder.glob("*.safetensors")):
        raise InputError(f"model folder {folder} has no .safetensors weights; re-save it with save_pretrained")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise InputError(f"model folder {folder} has no tokenizer (tokenizer.json); save the tokenizer beside it")
    group = quantize.group_size
    if group > 0:
        for name in ("hidden_size", "intermediate_size"):
            size = config.get(name)
            if size is not None and size % group:
                raise InputError(f"model {folder}: {name}={size} is not divisible by quantize.group_size={group}; "
                                 f"pick a group size that divides it (e.g. {_largest_pow2_divisor(size, group)})")
    return config


def _largest_pow2_divisor(size: int, upper: int) -> int:
    group = upper
    while group > 16 and size % group:
        group //= 2
    return group


def resolve_model(spec: str, quantize: QuantizeConfig) -> BaseModelRef:
    folder = locate(spec)
    config = check_model_folder(folder, quantize)
    return BaseModelRef(
        spec=spec,
        artifact=Artifact(path=folder, sha256=_hash_with_memo(folder), size_bytes=_weights_size(folder)),
        model_type=config.get("model_type", ""),
        architecture=config["architectures"][0],
        hidden_size=config.get("hidden_size", 0),
        intermediate_size=config.get("intermediate_size", 0),
        parameters=count_parameters(folder),
    )


def count_parameters(folder: Path) -> int:
    """Parameters in the folder's safetensors files, from their headers (no weights are read)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return total


def _weights_size(folder: Path) -> int:
    return sum(tree_size(p) for p in folder.glob("*.safetensors"))
