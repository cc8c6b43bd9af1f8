"""What a person sees: errors that suggest the fix, the parameter list, --template escapes, progress, the run's log
file and the summary (issue 15)."""

import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from oliveflow import progress, report
from oliveflow.cli import _parser, build_params, unescape
from oliveflow.config import DEFAULT_TEMPLATE, PipelineParams, parameter_fields
from oliveflow.overrides import one_line

REPO = Path(__file__).resolve().parents[2]


def cli(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oliveflow.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


# ---- errors that suggest the fix ----

@pytest.mark.parametrize("name, suggestion", [
    ("finetune.lerning_rate", "did you mean finetune.learning_rate?"),
    ("fintune.r", "did you mean finetune?"),
    ("learning_rate", "did you mean finetune.learning_rate?"),  # the right name at the wrong level
    ("registry.azure.clod", "did you mean registry.azure.cloud?"),
    ("finetune.zzz", "valid names under finetune: alpha, batch_size, "),
])
def test_an_unknown_parameter_names_the_closest_valid_ones(name, suggestion):
    with pytest.raises(ValidationError) as caught:
        build_params(_parser().parse_args(["run", "--param", f"{name}=1"]))
    message = one_line(caught.value)
    assert message.startswith(f"unknown parameter {name.split('.')[0] if name.startswith('fintune') else name}; ")
    assert suggestion in message and "Extra inputs" not in message and "\n" not in message


def test_the_typo_is_one_line_on_the_command_line():
    done = cli("run", "--param", "finetune.lerning_rate=1e-3")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("oliveflow: error: unknown parameter finetune.lerning_rate; did you mean "
                           "finetune.learning_rate? (oliveflow params lists them all)\n")


def test_params_lists_every_parameter_with_its_default_and_description():
    done = cli("params", "--json")
    assert done.returncode == 0, done.stderr
    listed = {row["name"]: row for row in json.loads(done.stdout)}
    paths = [path for path, _ in parameter_fields()]
    assert list(listed) == paths and len(paths) > 30
    assert {"finetune.learning_rate", "quantize.algorithm", "registry.azure.cloud", "output_dir"} <= set(listed)
    assert listed["finetune.max_steps"]["default"] == PipelineParams().finetune.max_steps
    assert listed["quantize.algorithm"]["default"] == "awq+gptq"
    assert all(row["description"] for row in listed.values()), [n for n, r in listed.items() if not r["description"]]
    text = cli("params").stdout
    assert "finetune.learning_rate = (empty)\n    AdamW learning rate." in text
    assert 'quantize.algorithm = "awq+gptq"' in text


# ---- --template escapes ----

def test_template_escapes():
    assert unescape(r"<|user|>\n{prompt}\t{response}") == "<|user|>\n{prompt}\t{response}"
    assert unescape(r"a\\nb") == "a\\nb"  # an escaped backslash stays one backslash, then an n
    assert unescape(r"C:\path\x {a}") == r"C:\path\x {a}"  # other escapes are left as written
    assert unescape("real\nbreak {a}") == "real\nbreak {a}"


def test_the_readmes_template_example_reaches_the_run_as_the_chat_format(tmp_path):
    """The README's own command line, split as a shell splits it, through the CLI's parsing to the template the
    run trains and answers with."""
    from oliveflow.stages.data import resolve_template

    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"--template ('[^']*')", readme).group(1)
    argv = shlex.split(f"run --template {quoted}")
    assert "\\n" in argv[-1], "the shell hands over a backslash and an n"
    template = resolve_template(build_params(_parser().parse_args(argv)).data, tmp_path)
    assert template == DEFAULT_TEMPLATE == "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"


def test_help_documents_the_template_escapes():
    help_text = " ".join(cli("run", "--help").stdout.split())
    assert "\\n and \\t in it are a line break and a tab" in help_text and "--verbose" in help_text


# ---- progress and the run's log ----

@pytest.fixture
def console(tmp_path):
    path = tmp_path / "console.txt"
    with open(path, "w") as stream, progress.console(stream):
        yield path


def test_long_work_is_never_silent_for_longer_than_the_interval(console, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    with progress.task("building", total=10) as work:
        for _ in range(10):
            time.sleep(0.1)
            work.advance()
    lines = console.read_text().splitlines()
    assert lines[0].endswith("building ...") and re.search(r"building: done in 1\.\d s$", lines[-1])
    ticks = [line for line in lines[1:-1] if re.search(r"building: \d+/10 step, \d+ s$", line)]
    assert len(ticks) >= 3 and len(ticks) == len(lines) - 2, lines
    assert all(re.match(r"\[ +\d+:\d\d\] ", line) for line in lines)


def test_only_the_innermost_work_shows_progress(console, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    with progress.task("checking the inputs"), progress.task("building", total=5) as work:
        for _ in range(5):
            time.sleep(0.15)
            work.advance()
    lines = console.read_text().splitlines()
    assert not [line for line in lines if re.search(r"checking the inputs: \d+ s$", line)], lines
    assert lines[-1].endswith(re.search(r"checking the inputs: done in \d\.\d s", lines[-1]).group())

def _read_all(leader: int) -> str:
    """Everything written to a pty so far: it hands its output over in pieces, so read until it is quiet."""
    import select

    chunks = []
    while select.select([leader], [], [], 0.5)[0]:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the other side is closed and all was read
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return b"".join(chunks).decode()


def test_a_terminal_gets_a_live_bar(monkeypatch):
    import fcntl
    import pty
    import struct
    import termios

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # a new pty is 0 columns wide
    with open(follower, "w") as stream, progress.console(stream):
        with progress.task("finetune", total=4) as work:
            for _ in range(4):
                time.sleep(0.3)
                work.advance()
    shown = _read_all(leader)
    assert "finetune ..." in shown and re.search(r"finetune: +\d+%\|", shown) and "/4 [" in shown, shown
    assert "finetune: done in" in shown


def test_work_can_get_its_step_count_once_under_way(console, monkeypatch):
    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    progress.steps(3, "prompt")()  # outside any work: nothing
    with progress.task("smoke_test"):
        answered = progress.steps(3, "prompt")
        for _ in range(2):
            time.sleep(0.3)
            answered()
        time.sleep(0.3)
    assert re.search(r"smoke_test: 2/3 prompt, \d+ s$", console.read_text(), re.M), console.read_text()


def test_a_terminal_without_a_size_gets_lines(monkeypatch):
    import pty

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    leader, follower = pty.openpty()  # 0 x 0: tqdm would draw nothing on it
    with open(follower, "w") as stream, progress.console(stream), progress.task("export"):
        time.sleep(0.5)
    shown = _read_all(leader)
    assert re.search(r"export: \d+ s\r?\n", shown), shown


def test_a_librarys_tqdm_bar_is_shown_where_the_work_has_no_count(console, monkeypatch):
    from tqdm import tqdm

    monkeypatch.setattr(progress, "EVERY_SECONDS", 0.2)
    with progress.task("quantize") as work, open(os.devnull, "w") as sink:
        bar = tqdm(total=14, desc="AWQ search", unit="layer", file=sink)
        bar.update(3)
        time.sleep(0.5)
        bar.close()
        work.outcome = "computed"
    text = console.read_text()
    assert "quantize: AWQ search 3/14 layer, 0 s" in text and re.search(r"quantize: done in .* \(computed\)", text)


def test_a_failure_ends_the_line_and_stops_the_ticker(console):
    with pytest.raises(ValueError), progress.task("export"):
        raise ValueError("boom")
    assert "export: failed after 0 s" in console.read_text()
    assert not any(t.name == "oliveflow-progress" for t in threading.enumerate())


def test_quiet_sends_every_output_to_the_log_and_restores_the_console(tmp_path, capfd):
    log_file = tmp_path / "run.log"
    with progress.quiet(log_file) as screen, progress.console(screen):
        print("a library's print")
        os.write(2, b"a C++ library's stderr\n")
        warnings.warn("a harmless library warning", UserWarning)
        # A library logger without a handler of its own (Olive's keeps the stream it got at import: under pytest,
        # maybe pytest's capture, in a run the real stderr, i.e. file descriptor 2, which goes to the log too).
        logging.getLogger("a_library").warning("a library's log line")
        progress.say("quantize ...")
        logging.getLogger("oliveflow.stages.finetune").warning("1 of 340 examples were cut; raise max_seq_len")
    print("after")
    logged, shown = log_file.read_text(), capfd.readouterr()
    for line in ("a library's print", "a C++ library's stderr", "a harmless library warning", "a library's log line",
                 "quantize ..."):
        assert line in logged
    assert "quantize ..." in shown.err and "a library" not in shown.err + shown.out and shown.out == "after\n"
    assert "] warning: 1 of 340 examples were cut; raise max_seq_len\n" in shown.err, "our own warnings are shown"
    assert "1 of 340 examples" in logged


@pytest.mark.parametrize("verbose", [False, True])
def test_oliveflow_run_is_quiet_unless_verbose(verbose, tmp_path, monkeypatch, capfd):
    """cmd_run's console and log around a stand-in for the pipeline that makes the noise libraries make."""
    from oliveflow import cli

    def noisy_run(params):
        with progress.task("finetune"):
            print("{'loss': '2.064', 'grad_norm': '0.9525'}")
            os.write(2, b"[INFO] [engine.py:665:_run_pass] Running pass\n")
            warnings.warn("Unsupported layer type, proceed at your own risk", UserWarning)
        return SimpleNamespace(smoke=SimpleNamespace(answered=True))

    monkeypatch.setenv("OLIVEFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no temporary server: the stand-in needs none
    monkeypatch.setattr(cli, "_preflight", lambda params: None)
    monkeypatch.setattr(cli, "_run_local", lambda params, server: noisy_run(params))
    monkeypatch.setattr(cli, "_where", lambda result, log: ([("run log", str(log))], []))
    monkeypatch.setattr(report, "text", lambda result, places, commands: f"SUMMARY {places}\n")
    argv = ["run", "--verbose"] if verbose else ["run"]
    assert cli._dispatch(cli._parser().parse_args(argv)) == 0
    out, err = capfd.readouterr()
    logs = list((tmp_path / "logs").glob("run-*.log"))
    assert "finetune ..." in err and "finetune: done in" in err and out.endswith("\nSUMMARY " + (
        "[('run log', 'None')]\n" if verbose else f"[('run log', '{logs[0]}')]\n"))
    if verbose:
        assert not logs and "'loss'" in out + err and "Running pass" in err
        return
    assert len(logs) == 1 and f"the run's full log (libraries' output, warnings, losses): {logs[0]}" in err
    assert "'loss'" not in out + err and "Running pass" not in err and "proceed at your own risk" not in err
    logged = logs[0].read_text()
    assert "'loss'" in logged and "Running pass" in logged and "proceed at your own risk" in logged


def test_the_log_file_is_new_per_run_under_the_home(tmp_path):
    first = progress.log_file(tmp_path)
    assert first.parent == tmp_path / "logs" and first.name.startswith("run-") and first.suffix == ".log"


# ---- the summary ----

def _result(tmp_path: Path):
    long_answer = ("The best time to visit Hanoi is autumn, from September to November, when the air is "
                   "mild and dry and the lakes are calm, and the city's street food is at its best <|end|>")
    samples = [SimpleNamespace(prompt=f"<|user|>\nQuestion {i} about | pipes?<|end|>\n<|assistant|>\n",
                               reference="ref",
                               base_answer=long_answer, finetuned_answer="Short answer.") for i in range(5)]
    smoke = SimpleNamespace(size_before_bytes=3_400_000, size_after_bytes=1_200_000, size_reduction=2.83,
                            samples=samples, rouge_l_base=0.05, rouge_l_finetuned=0.12, ttft_seconds=0.004,
                            ttft_seconds_base=0.003, decode_tokens_per_second=800.0,
                            decode_tokens_per_second_base=900.0, token_latency_p50_ms=1.2,
                            token_latency_p90_ms=1.5, token_latency_p50_ms_base=1.1, token_latency_p90_ms_base=1.3,
                            answered=True)
    adapter = SimpleNamespace(response_ppl_original=45.1, response_ppl_quantized=60.2, response_ppl_finetuned=30.3,
                              response_ppl_teacher=None, tuned_model_dir=None)
    stages = {name: SimpleNamespace(name=name, cache=cache, seconds=1.5, output_bytes=1_000_000)
              for name, cache in (("quantize", "hit"), ("finetune", "miss"), ("export", "miss"),
                                  ("smoke_test", "miss"))}
    base = SimpleNamespace(spec="embedded:tiny-phi3", architecture="Phi3ForCausalLM",
                           artifact=SimpleNamespace(size_bytes=3_400_000))
    return SimpleNamespace(base_model=base, stages=stages, smoke=smoke, adapter=adapter, samples=samples,
                           registration="registered oliveflow-model v1", template=DEFAULT_TEMPLATE, onnx_model_dir=tmp_path / "model",
                           adapter_file=tmp_path / "model" / "adapter_weights.onnx_adapter", mlflow_run_id="abc")


def test_the_summary_a_person_reads(tmp_path):
    places = [("model folder", str(tmp_path / "model")), ("MLflow", "sqlite:////h/mlflow.db  (run abc)"),
              ("run log", "/h/logs/run-1.log"), ("Prefect", "/root/.prefect  (PREFECT_HOME: ...)")]
    commands = ["mlflow ui --backend-store-uri sqlite:////h/mlflow.db", "prefect server start"]
    text = report.text(_result(tmp_path), places, commands)
    lines = text.splitlines()
    assert len(lines) < 45 and max(map(len, lines)) <= 120, text
    assert re.search(r"^finetune +miss +1\.5 +1\.00 MB$", text, re.M)
    assert re.search(r"^size +3\.40 MB +1\.20 MB \(2\.83x smaller\)$", text, re.M)
    assert "45.10 float, 60.20 int4" in text and "30.30 int4 + LoRA" in text and "0.050 no adapter" in text
    assert re.search(r"^first token +3\.0 ms +4\.0 ms$", text, re.M)
    assert text.count("  Q: ") == report.SHOWN_SAMPLES and "(3 of 5; all in MLflow)" in text
    cut = next(line for line in lines if line.strip().startswith("base:")).split("base:", 1)[1].strip()
    assert cut.endswith("…") and len(cut) <= 84 and cut[:-1] in _result(tmp_path).samples[0].base_answer
    assert _result(tmp_path).samples[0].base_answer[len(cut) - 1] == " ", "cut at a word boundary"
    assert "  Q: Question 0 about | pipes?\n" in text and "<|" not in text
    assert "run log:      /h/logs/run-1.log" in text and text.endswith("  prefect server start\n")


def test_the_summary_shows_the_float_lora_when_the_run_distilled_from_it(tmp_path):
    result = _result(tmp_path)
    assert "float LoRA" not in report.text(result) and "float LoRA" not in report.markdown(result)
    result.adapter.response_ppl_teacher = 25.0
    assert re.search(r"^response perplexity .* 30\.30 int4 \+ LoRA \(25\.00 float LoRA\)$", report.text(result), re.M)
    assert "fine-tuned **30.30** (float LoRA, the distillation teacher: 25.00)" in report.markdown(result)


def test_the_summary_says_when_the_base_graph_carries_trained_scales(tmp_path):
    result = _result(tmp_path)
    assert "train_scales" not in report.text(result) and "train_scales" not in report.markdown(result)
    result.adapter.tuned_model_dir = tmp_path / "finetune" / "model"
    text = report.text(result)
    assert "(no adapter: the int4 base with the scales trained beside the adapter, finetune.train_scales)" in text
    assert max(map(len, text.splitlines())) <= 120
    assert "Base graph: the int4 model with the scales trained with the adapter" in report.markdown(result)


def test_cut_is_at_a_word_with_an_ellipsis():
    assert report.cut("short answer") == "short answer"
    assert report.cut("one two three four", 12) == "one two…"
    assert report.cut("x" * 30, 10) == "x" * 9 + "…"  # no word boundary: cut in the word


def test_the_question_is_shown_without_the_templates_markup():
    chatml = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
              "<|im_start|>assistant\n{response}")
    rendered = chatml.split("{response}")[0].format(prompt="Tips for Kyoto?")
    assert report.question(rendered, chatml) == "Tips for Kyoto?"
    assert report.question("Q: what? {b}\nA: ", "Q: {q} {{b}}\nA: {a}") == "what?"  # literal braces in it
    assert report.question("<|user|> Hi<|end|>", "no match {x}: {y}").split() == ["Hi"]


def test_the_pyfunc_model_has_the_input_hint_mlflow_asks_for():
    """MLflow warned "Add type hints to the `predict` method" at every log of the model."""
    from mlflow.pyfunc.utils.data_validation import _get_func_info_if_type_hint_supported

    from oliveflow.mlflow_model import GenaiModel

    check = _get_func_info_if_type_hint_supported
    while hasattr(check, "__wrapped__"):  # past its cache and its once-only warning filter
        check = check.__wrapped__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check(GenaiModel.predict) is None  # a hint MLflow takes as is: no conversion, no inference
    assert not caught, [str(w.message) for w in caught]
