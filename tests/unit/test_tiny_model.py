"""Unit tests for oliveflow.tiny_model (small pretraining budgets keep them fast)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oliveflow import tiny_model as tm

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA = REPO_ROOT / "data" / "travel_train.jsonl"

# A few steps are enough to exercise every code path; the real default is much longer.
# One thread: on a busy 2-core box, 2 OpenMP threads on tiny ops spin at barriers (10-100x slower).
FAST = tm.TinyModelParams(vocab_size=512, batch_size=4, steps=8, warmup_steps=2, num_threads=1)

CITIES = ["Lisbon", "Kyoto", "Paris", "Rome", "Prague", "Vienna", "Seoul", "Lima", "Oslo", "Cairo"]
TEMPLATES = [
    (
        "What should I pack for {c}?",
        "For {c}, pack light layers, comfortable shoes and a rain jacket. Keep your passport handy.",
    ),
    (
        "Suggest a day in {c}.",
        "Start in the old town of {c}, visit a museum, then enjoy dinner at a local restaurant.",
    ),
    (
        "How do I get around {c}?",
        "In {c}, buy a transit pass, walk between sights and take trains instead of taxis.",
    ),
]


def _write_dataset(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for city in CITIES:
            for prompt, response in TEMPLATES:
                record = {"prompt": prompt.format(c=city), "response": response.format(c=city)}
                handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Path:
    return tm.build_tiny_model([dataset], tmp_path_factory.mktemp("models") / "tiny", params=FAST)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.is_dir())


def test_build_writes_loadable_model(built: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (built / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert isinstance(model, Phi3ForCausalLM)
    config = model.config
    assert config.hidden_size == 128 and config.num_hidden_layers == 2
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert config.bos_token_id == config.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == config.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("Plan a trip to Rome.\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_build_uses_umask_modes(built: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert built.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (built / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_marker_records_build(built: Path, dataset: Path) -> None:
    marker = tm.read_marker(built)
    assert marker is not None
    assert marker["fingerprint"] == tm.compute_fingerprint([dataset], seed=0, params=FAST)
    assert marker["params"] == FAST.to_dict()
    assert marker["builder_version"] == tm.BUILDER_VERSION
    assert marker["build_seconds"] > 0
    assert math.isfinite(marker["final_pretraining_loss"])
    assert marker["num_parameters"] > 100_000


def test_special_tokens_are_single_tokens(built: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.bos_token == tokenizer.pad_token == tokenizer.unk_token == "<|endoftext|>"
    for token in tm.SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
        assert ids[0] in tokenizer.all_special_ids, token
    text = "<|user|>\nWhere to eat in Kyoto?<|end|>\n<|assistant|>\nTry ramen.<|end|>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_tokenizer_json_round_trips(built: Path) -> None:
    # The same file onnxruntime-genai's og.Tokenizer reads (it needs a BPE, not WordLevel, model).
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(built / "tokenizer.json"))
    assert json.loads((built / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    for text in ["Pack a rain jacket for Lisbon, please!", "  two  spaces\tand tab\n", "Zürich café 東京 🚆"]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_pretraining_text_has_no_chat_template(dataset: Path) -> None:
    texts, examples = tm._read_jsonl([dataset])
    tokenizer = tm._train_tokenizer(texts, FAST)
    documents = tm._pretraining_documents(tokenizer, examples)
    template_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")}
    assert not template_ids & {tok for doc in documents for tok in doc}
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert all(doc[-1] == eot for doc in documents)


def test_deterministic_bytes(tmp_path: Path, dataset: Path, built: Path) -> None:
    other = tm.build_tiny_model([dataset], tmp_path / "again", params=FAST)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (built / name).read_bytes(), name


def test_cache_hit_skips_rebuild(built: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker_before = (built / tm.MARKER_NAME).read_text()
    mtime_before = (built / "model.safetensors").stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt despite a matching marker")

    monkeypatch.setattr(tm, "_build_into", fail)
    assert tm.build_tiny_model([dataset], built, params=FAST) == built
    assert (built / tm.MARKER_NAME).read_text() == marker_before
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime_before


def test_changed_inputs_rebuild_atomically(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "tiny"
    tm.build_tiny_model([dataset], out, params=FAST)
    first = tm.read_marker(out)
    tm.build_tiny_model([dataset], out, seed=1, params=FAST)
    second = tm.read_marker(out)
    assert first and second and first["fingerprint"] != second["fingerprint"]
    assert second["seed"] == 1
    assert _leftovers(tmp_path, "tiny") == []


def test_force_rebuilds(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "tiny"
    calls: list[Path] = []

    def fake_build(tmp_dir: Path, *args: object) -> None:
        calls.append(tmp_dir)
        (tmp_dir / tm.MARKER_NAME).write_text(json.dumps({"fingerprint": "x", "n": len(calls)}))

    monkeypatch.setattr(tm, "_build_into", fake_build)
    tm.build_tiny_model([dataset], out, params=FAST)
    tm.build_tiny_model([dataset], out, params=FAST, force=True)
    assert len(calls) == 2
    assert tm.read_marker(out) == {"fingerprint": "x", "n": 2}
    assert _leftovers(tmp_path, "tiny") == []


def test_refuses_to_replace_foreign_folder(tmp_path: Path, dataset: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        tm.build_tiny_model([dataset], out, params=FAST)
    with pytest.raises(FileExistsError):
        tm._swap_into_place(tmp_path / "fresh", out)  # the last-moment check, too
    assert (out / "notes.txt").read_text() == "keep me"
    assert _leftovers(tmp_path, "precious") == []


def test_failed_build_leaves_nothing(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(tmp_dir: Path, *args: object) -> None:
        (tmp_dir / "partial.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tm, "_build_into", boom)
    with pytest.raises(RuntimeError, match="boom"):
        tm.build_tiny_model([dataset], tmp_path / "tiny", params=FAST)
    assert not (tmp_path / "tiny").exists()
    assert _leftovers(tmp_path, "tiny") == []


def test_concurrent_builds_build_once(tmp_path: Path, dataset: Path) -> None:
    # Two processes race for the same folder: the file lock lets one build, the other reuses it.
    log = tmp_path / "builds.log"
    out = tmp_path / "tiny"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from oliveflow import tiny_model as tm
        real = tm._build_into
        def logged(*args):
            with open({str(log)!r}, "a") as handle:
                handle.write("build\\n")
            real(*args)
        tm._build_into = logged
        params = tm.TinyModelParams(**{FAST.to_dict()!r})
        tm.build_tiny_model([Path({str(dataset)!r})], Path({str(out)!r}), params=params)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT) for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert log.read_text().splitlines() == ["build"]
    assert tm.read_marker(out) is not None
    assert _leftovers(tmp_path, "tiny") == []


def test_fingerprint_depends_on_contents_not_path(tmp_path: Path, dataset: Path) -> None:
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(dataset.read_bytes())
    base = tm.compute_fingerprint([dataset], params=FAST)
    assert tm.compute_fingerprint([copy], params=FAST) == base
    assert tm.compute_fingerprint([dataset], seed=1, params=FAST) != base
    assert tm.compute_fingerprint([dataset], params=tm.TinyModelParams()) != base
    with copy.open("a") as handle:
        handle.write(json.dumps({"prompt": "x", "response": "y"}) + "\n")
    assert tm.compute_fingerprint([copy], params=FAST) != base


def test_ensure_uses_cache_dir(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path / "home"))
    expected = tm.default_model_dir([dataset], params=FAST)
    fingerprint = tm.compute_fingerprint([dataset], params=FAST)
    assert expected == tmp_path / "home" / "models" / f"tiny-phi3-{fingerprint[:12]}"
    assert tm.ensure_tiny_model([dataset], params=FAST) == expected
    assert tm.read_marker(expected)["fingerprint"] == fingerprint  # type: ignore[index]


def test_rejects_data_without_examples(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no prompt here"}\n\n')
    with pytest.raises(ValueError, match="no prompt/response"):
        tm.build_tiny_model([empty], tmp_path / "tiny", params=FAST)


@pytest.mark.skipif(not BUNDLED_DATA.is_file(), reason=f"bundled dataset {BUNDLED_DATA} not present")
def test_builds_on_bundled_data(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tm.build_tiny_model([BUNDLED_DATA], tmp_path / "tiny", params=FAST)
    tokenizer = AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)
    assert len(tokenizer) > len(tm.SPECIAL_TOKENS) + 256
