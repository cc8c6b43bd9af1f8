"""Build the embedded default base model: a tiny, locally pretrained Phi-3.

No model weights can be downloaded where this project runs, so the default base model is
built from the project's own data: a byte-level BPE tokenizer plus a small `Phi3ForCausalLM`
pretrained briefly on plain text (no chat template), so that a later LoRA fine-tune on the
chat template has something visible to learn. Builds are deterministic, cached by a content
fingerprint, written atomically and guarded by a file lock.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oliveflow import progress
from oliveflow.config import REPO_ROOT, oliveflow_home
from oliveflow.stages.data import read_examples
from oliveflow.store import replace_dir, scratch_dir

# Bump whenever a change to this module changes the bytes it writes, so old caches are rebuilt.
BUILDER_VERSION = "1"

MARKER_NAME = "oliveflow_tiny.json"
MODEL_DIR_PREFIX = "tiny-phi3-"

ENDOFTEXT = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SYSTEM = "<|system|>"
# Order fixes the ids (0..4): trained into the vocabulary before any merge.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, USER, ASSISTANT, END, SYSTEM)

# The bundled training data (absent in an installed wheel).
BUNDLED_DATA_FILE = REPO_ROOT / "data" / "travel_train.jsonl"


@dataclass(frozen=True)
class TinyModelParams:
    """Everything that shapes the built model; all of it goes into the fingerprint."""

    vocab_size: int = 2048
    min_frequency: int = 2
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Fixed so results do not depend on the host's core count (CPU reductions change with it).
    # 2 is ~1.75x faster than 1 on an idle 2-core box, but ~1.8x slower when another process
    # keeps a core busy (OpenMP threads wait on each other at every op).
    num_threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Example:
    prompt: str
    response: str


# ---------------------------------------------------------------------------------------------
# Data and fingerprint
# ---------------------------------------------------------------------------------------------


def _read_jsonl(data_files: Sequence[Path]) -> tuple[list[str], list[_Example]]:
    """Return (every string field value, the prompt/response pairs) from JSONL files (read as the data stage
    reads them)."""
    rows = [row for path in data_files for row in read_examples(path, [])]
    strings = [v for row in rows for v in row.values() if isinstance(v, str)]
    examples = [_Example(row["prompt"], row["response"]) for row in rows
                if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)]
    if not examples:
        raise ValueError(f"no prompt/response examples in {[str(p) for p in data_files]}")
    return strings, examples


def compute_fingerprint(
    data_files: Sequence[Path], *, seed: int = 0, params: TinyModelParams | None = None
) -> str:
    """sha256 over data contents (in the given order), params, seed and BUILDER_VERSION."""
    params = params or TinyModelParams()
    digest = hashlib.sha256()
    digest.update(f"oliveflow-tiny-model/{BUILDER_VERSION}\n".encode())
    # File contents, not names: the same data under another path is the same model.
    for path in data_files:
        file_digest = hashlib.sha256()
        with Path(path).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_digest.update(chunk)
        digest.update(file_digest.hexdigest().encode() + b"\n")
    digest.update(json.dumps({"seed": seed, "params": params.to_dict()}, sort_keys=True).encode())
    return digest.hexdigest()


def read_marker(model_dir: Path) -> dict[str, Any] | None:
    """The build marker of a finished model folder, or None when absent or unreadable."""
    try:
        marker = json.loads((Path(model_dir) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _train_tokenizer(texts: list[str], params: TinyModelParams) -> Any:
    """Byte-level BPE: every byte is in the alphabet, so nothing is ever unknown."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=END,
        unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[USER, ASSISTANT, SYSTEM],
        model_max_length=params.max_position_embeddings,
        # Cleanup would strip spaces before punctuation and break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------
# Model and pretraining
# ---------------------------------------------------------------------------------------------


@contextmanager
def _deterministic_torch(num_threads: int) -> Iterator[None]:
    """Pin threads and deterministic kernels for the build, restoring the caller's settings."""
    import torch

    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)
        torch.set_num_threads(old_threads)


def _make_model(tokenizer: Any, params: TinyModelParams, seed: int) -> Any:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    # A multiple of 64 keeps the embedding GEMMs aligned and leaves room for added tokens.
    vocab_size = max(64, math.ceil(len(tokenizer) / 64) * 64)
    config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=params.hidden_size,
        intermediate_size=params.intermediate_size,
        num_hidden_layers=params.num_hidden_layers,
        num_attention_heads=params.num_attention_heads,
        num_key_value_heads=params.num_key_value_heads,
        max_position_embeddings=params.max_position_embeddings,
        original_max_position_embeddings=params.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def _pretraining_documents(tokenizer: Any, examples: list[_Example]) -> list[list[int]]:
    """Plain text only: chat-template tokens stay unseen until the LoRA fine-tune."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    documents = []
    for example in examples:
        ids = tokenizer.encode(f"{example.prompt}\n{example.response}", add_special_tokens=False)
        documents.append([*ids, eot])
    return documents


def _batches(
    documents: list[list[int]], params: TinyModelParams, generator: Any
) -> Iterator[Any]:
    """Endless full batches packed from a token stream of reshuffled epochs.

    The stream runs across epoch boundaries, so every batch is full even on tiny data and
    chunk boundaries move from one epoch to the next.
    """
    import torch

    if not any(documents):
        raise ValueError("no pretraining tokens")
    needed = params.batch_size * params.seq_len
    buffer: list[int] = []
    while True:
        while len(buffer) < needed:
            for i in torch.randperm(len(documents), generator=generator).tolist():
                buffer.extend(documents[i])
        batch, buffer = buffer[:needed], buffer[needed:]
        yield torch.tensor(batch, dtype=torch.long).view(params.batch_size, params.seq_len)


def _pretrain(model: Any, documents: list[list[int]], params: TinyModelParams, seed: int,
              step_done: Callable[[], None] = lambda: None) -> float:
    """Full-parameter causal-LM training; returns the mean loss of the last 10 steps. ``step_done`` is called
    after each step (progress)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < params.warmup_steps:
            return (step + 1) / params.warmup_steps
        progress = (step - params.warmup_steps) / max(1, params.steps - params.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return params.min_lr_ratio + (1 - params.min_lr_ratio) * cosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    batches = _batches(documents, params, generator)
    for _ in range(params.steps):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_done()
    model.eval()
    tail = losses[-10:]
    return float(sum(tail) / len(tail)) if tail else float("nan")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def default_data_files() -> list[Path]:
    """The bundled training data the default model is built from."""
    return [BUNDLED_DATA_FILE]


def default_model_dir(data_files: Sequence[Path] | None = None, *, seed: int = 0,
                      params: TinyModelParams | None = None) -> Path:
    """`$OLIVEFLOW_HOME/models/tiny-phi3-<fingerprint[:12]>` for these inputs."""
    files = list(data_files) if data_files is not None else default_data_files()
    fingerprint = compute_fingerprint(files, seed=seed, params=params)
    return oliveflow_home() / "models" / f"{MODEL_DIR_PREFIX}{fingerprint[:12]}"


def _is_built(out_dir: Path, fingerprint: str) -> bool:
    marker = read_marker(out_dir)
    return marker is not None and marker.get("fingerprint") == fingerprint


def build_tiny_model(
    data_files: Sequence[Path],
    out_dir: Path,
    *,
    seed: int = 0,
    params: TinyModelParams | None = None,
    force: bool = False,
) -> Path:
    """Build (or reuse) the tiny pretrained Phi-3 + tokenizer in `out_dir`; returns `out_dir`.

    Reuses `out_dir` when its marker has the same fingerprint, unless `force`. Otherwise the
    model is built in a temporary sibling folder and renamed into place, under a file lock;
    an existing `out_dir` is replaced only if it is empty or holds a marker.
    """
    from filelock import FileLock

    params = params or TinyModelParams()
    data_files = [Path(p) for p in data_files]
    out_dir = Path(out_dir).absolute()
    fingerprint = compute_fingerprint(data_files, seed=seed, params=params)
    if not force and _is_built(out_dir, fingerprint):
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.lock")):
        # Another process may have finished the same build while we waited for the lock.
        if not force and _is_built(out_dir, fingerprint):
            return out_dir
        _check_replaceable(out_dir)  # fail before the build, not after it
        # out_dir may be anywhere: nothing beside it is swept.
        with scratch_dir(out_dir.parent, f".{out_dir.name}.tmp-", sweep=False) as tmp_dir:
            _build_into(tmp_dir, data_files, params, seed, fingerprint)
            _swap_into_place(tmp_dir, out_dir)
    return out_dir


def ensure_tiny_model(data_files: Sequence[Path] | None = None, *, seed: int = 0,
                      params: TinyModelParams | None = None) -> Path:
    """Return the cached default model for these inputs, building it first if missing."""
    files = list(data_files) if data_files is not None else default_data_files()
    out_dir = default_model_dir(files, seed=seed, params=params)
    return build_tiny_model(files, out_dir, seed=seed, params=params)


def _build_into(
    tmp_dir: Path, data_files: list[Path], params: TinyModelParams, seed: int, fingerprint: str
) -> None:
    import tokenizers
    import torch
    import transformers

    started = time.perf_counter()
    texts, examples = _read_jsonl(data_files)
    with (_deterministic_torch(params.num_threads), progress.without_library_bars(),
          progress.task("building the embedded model (once)", total=params.steps) as work):
        tokenizer = _train_tokenizer(texts, params)
        model = _make_model(tokenizer, params, seed)
        documents = _pretraining_documents(tokenizer, examples)
        final_loss = _pretrain(model, documents, params, seed, work.advance)
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
    seconds = time.perf_counter() - started
    marker = {
        "fingerprint": fingerprint,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "params": params.to_dict(),
        "data_files": [str(p) for p in data_files],
        "num_examples": len(examples),
        "num_pretraining_tokens": sum(len(d) for d in documents),
        "tokenizer_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "final_pretraining_loss": final_loss,
        "build_seconds": round(seconds, 3),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    # Written last: a folder with a marker is a finished folder.
    (tmp_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    _apply_umask_modes(tmp_dir)


def _apply_umask_modes(folder: Path) -> None:
    """safetensors writes 0600 files; a shared cache wants umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _check_replaceable(out_dir: Path) -> None:
    """Never delete a folder this module did not write: a mistyped out_dir must not cost data."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and read_marker(out_dir) is None):
        raise FileExistsError(f"{out_dir} exists and is not a tiny-model folder; not replacing it")


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename `tmp_dir` to `out_dir`, checking again at the last moment that an existing `out_dir` is ours."""
    _check_replaceable(out_dir)
    replace_dir(tmp_dir, out_dir, sweep=False)
