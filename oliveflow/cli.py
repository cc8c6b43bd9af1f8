"""The ``oliveflow`` command: run the pipeline in-process, or one stage alone for debugging.

Inputs are checked (parameters, data files, model folder, output folder) before Prefect
or Olive are imported, so bad input fails in about a second with one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn, get_args

from pydantic import ValidationError

from oliveflow import progress, report
from oliveflow.config import PipelineParams, QuantizeConfig, check_registry_settings
from oliveflow.errors import InputError, ServiceError, StageError
from oliveflow.overrides import add_params, set_dotted, validate_params
from oliveflow.overrides import one_line as _one_line, single_line as _single_line
from oliveflow.settings import current, load, use
from oliveflow.stages.table import BY_NAME, BY_OUTPUT, initial_values

STAGES = ("validate_data", *BY_NAME)  # validate_data: the check every stage starts with, shown alone


def build_params(args: argparse.Namespace) -> PipelineParams:
    raw: dict[str, Any] = {}
    for flag, path in (("model", "model"), ("data", "data.train_path"), ("eval_data", "data.eval_path"),
                       ("template", "data.template"), ("quantize", "quantize.algorithm"),
                       ("max_steps", "finetune.max_steps"), ("output", "output_dir"), ("device", "export.device")):
        value = getattr(args, flag, None)
        if value is not None:
            set_dotted(raw, path, value)
    return validate_params(raw, add_params(raw, args.param or []))


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``--template`` as a shell gives it: ``'<|user|>\\n{prompt}'`` in single quotes arrives with a backslash and
    an n; ``\\n`` and ``\\t`` become a line break and a tab, ``\\\\`` one backslash, anything else stays."""
    return re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], text)


def _preflight(params: PipelineParams) -> None:
    from oliveflow.output import check_output_dir
    from oliveflow.stages.data import validate_data
    from oliveflow.stages.model import resolve_model
    from oliveflow.store import ArtifactStore

    check_output_dir(params.output_dir)
    ArtifactStore(params.store_location())  # an az:// store without adlfs fails here
    check_registry_settings(params.registry)
    validate_data(params.data)
    resolve_model(params.model, params.quantize)
    if params.export.device == "gpu":
        import onnxruntime_genai as og

        # The smoke test needs it to run the exported model: without it the run would fail after every stage.
        if not og.is_cuda_available():
            raise InputError("export.device gpu: the installed onnxruntime-genai has no CUDA; install the gpu extra "
                             "(pip install 'oliveflow[gpu]') on a CUDA machine, or use export.device=cpu")


def cmd_run(args: argparse.Namespace) -> int:
    params = build_params(args)
    from flows.server import start_server, stop_server

    # Prefect's temporary server takes seconds to answer: it starts now and comes up while this process imports
    # Prefect and checks the inputs. A PREFECT_API_URL set in a profile is only known once Prefect is imported:
    # run_local then stops this one and uses that.
    server = None if current().prefect_api_url else start_server()
    try:
        # Before the log file: bad input is one line on stderr; the embedded model's first build shows progress.
        with progress.console(sys.stderr):
            _preflight(params)
        log_path = None if args.verbose else progress.log_file(current().home)
        result = _run(params, server, log_path, args.json)
    finally:
        if server is not None:
            stop_server(server)
    if args.json:
        print(json.dumps(_json_summary(result) | {"log_file": str(log_path) if log_path else None}))
    else:
        places, commands = _where(result, log_path)
        print("\n" + report.text(result, places, commands), end="")
    return 0 if result.smoke.answered else 1


def _run(params: PipelineParams, server: Any, log_path: Path | None, json_out: bool) -> Any:
    """The flow run, with the libraries' output in ``log_path`` (None: on the console, as --verbose asks)."""
    if log_path is None:
        # Libraries (Olive, ModelBuilder) print progress to stdout; keep it for the summary alone.
        with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext(), \
                progress.console(sys.stderr):
            return _run_local(params, server)
    os.environ.setdefault("PREFECT_LOGGING_COLORS", "false")  # a file, not a terminal: no colour codes in it
    print(f"oliveflow: the run's full log (libraries' output, warnings, losses): {log_path}", file=sys.stderr)
    try:
        with progress.quiet(log_path) as screen, progress.console(screen):
            return _run_local(params, server)
    except BaseException:
        print(f"oliveflow: the run's full log: {log_path}", file=sys.stderr)
        raise


def _run_local(params: PipelineParams, server: Any) -> Any:
    with progress.task("loading Prefect"):
        from flows.pipeline import run_local
    return run_local(params, server)


def _json_summary(result: Any) -> dict:
    return {
        "onnx_model_dir": str(result.onnx_model_dir),
        "adapter_file": str(result.adapter_file),
        "size_reduction": result.size_reduction,
        "samples": [{"prompt": s.prompt, "answer": s.finetuned_answer, "base_answer": s.base_answer,
                     "reference": s.reference}
                    for s in result.samples],
        "stages": {name: {"cache": r.cache, "seconds": r.seconds} for name, r in result.stages.items()},
        "mlflow_run_id": result.mlflow_run_id,
        "registration": result.registration,
        "eval_loss": {"original": result.adapter.eval_loss_original,
                      "quantized": result.adapter.eval_loss_quantized,
                      "finetuned": result.adapter.eval_loss_finetuned},
        "response_perplexity": {"original": result.adapter.response_ppl_original,
                                "quantized": result.adapter.response_ppl_quantized,
                                "finetuned": result.adapter.response_ppl_finetuned},
        "rouge_l": {"base": result.smoke.rouge_l_base, "finetuned": result.smoke.rouge_l_finetuned},
    }


def _where(result: Any, log_path: Path | None) -> tuple[list[tuple[str, str]], list[str]]:
    """Where the run's outputs are, and the commands that open the MLflow and Prefect UIs on them."""
    from prefect.settings import get_current_settings

    from oliveflow.lineage import public_uri, tracking_uri

    places = [("model folder", str(result.onnx_model_dir))]
    commands = []
    bin_dir = Path(sys.executable).parent  # the commands of this environment, whether or not it is activated
    if result.mlflow_run_id:
        uri = public_uri(tracking_uri())
        places.append(("MLflow", f"{uri}  (run {result.mlflow_run_id})"))
        commands.append(f"{uri}   # the MLflow server's own UI" if uri.startswith(("http://", "https://")) else
                        f"{bin_dir / 'mlflow'} ui --backend-store-uri {uri}   # then http://127.0.0.1:5000")
    if log_path:
        places.append(("run log", str(log_path)))
    prefect = get_current_settings()
    if prefect.api.url:
        places.append(("Prefect", f"{prefect.ui_url or prefect.api.url}  (PREFECT_API_URL)"))
    else:
        places.append(("Prefect", f"{prefect.home}  (PREFECT_HOME: its database of flow runs, cache records)"))
        commands.append(f"PREFECT_HOME={prefect.home} {bin_dir / 'prefect'} server start   "
                        "# then http://127.0.0.1:4200")
    return places, commands


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage of the stage table from given inputs into ``--output`` (no Prefect, no cache)."""
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.model import resolve_model
    from oliveflow.store import RESULT_FILE, atomic_dir, load_result

    params = build_params(args)
    data = validate_data(params.data)
    if args.name == "validate_data":
        print(data.model_dump_json(indent=1))
        return 0
    stage = BY_NAME[args.name]
    base = resolve_model(params.model, params.quantize)
    earlier = [name for name in stage.inputs.values() if name in BY_OUTPUT]  # given as --quantized DIR, ...
    for flag in earlier:
        if getattr(args, flag) is None:
            raise InputError(f"stage {args.name} needs --{flag} DIR (the output folder of an earlier stage)")
    if args.output is None and stage.writes:
        raise InputError(f"stage {args.name} needs --output DIR for its result")
    values = initial_values(params, base, data, resolve_template(params.data, base.artifact.path))
    values.update({flag: load_result(getattr(args, flag), BY_OUTPUT[flag].result) for flag in earlier})
    arguments = stage.arguments(values)
    if not stage.writes:
        with progress.console(sys.stderr), progress.task(args.name):
            outcome = stage.call(arguments, Path("."))
        print(outcome.model_dump_json(indent=1))
        return 0
    with atomic_dir(Path(args.output).resolve()) as tmp, progress.console(sys.stderr), progress.task(args.name):
        outcome = stage.call(arguments, tmp)
        (tmp / RESULT_FILE).write_text(outcome.model_dump_json(indent=1))
    print(outcome.model_copy(update={"artifact": None}).model_dump_json(indent=1))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache info``: what the store and its surroundings hold; ``cache prune``: what nothing points at (dry run
    unless --apply). Reads Prefect's settings and record files only: no server is imported or started."""
    from oliveflow import housekeeping

    location = PipelineParams.model_validate({"artifact_store": args.store}).store_location()
    from prefect.settings import get_current_settings  # settings only: nothing here starts or imports the server

    settings = get_current_settings()
    records = housekeeping.PrefectRecords(
        Path(settings.results.local_storage_path),
        elsewhere=tuple(name for name, value in (("PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
                                                  settings.results.default_storage_block),
                                                 ("PREFECT_API_URL", settings.api.url)) if value))
    report = housekeeping.cache_report(location, prefect_storage=records, verify=args.verify,
                                       must_exist=args.store is not None)
    if args.action == "info":
        print(report.model_dump_json(indent=1) if args.json else housekeeping.describe(report))
        return 0
    plan = housekeeping.prune_plan(report)
    outcome = housekeeping.apply(plan) if args.apply else None
    if args.json:
        print(json.dumps({"items": [item.model_dump(mode="json") for item in plan], "notes": report.notes,
                          "total_bytes": sum(item.bytes for item in plan), "applied": args.apply,
                          "outcome": outcome.model_dump(mode="json") if outcome else None}))
    else:
        print(housekeeping.describe_plan(plan, report, outcome))
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """Every parameter by dotted path, its default and description: the fields of the Prefect UI form."""
    from oliveflow.config import parameter_default, parameter_fields

    rows = [{"name": path, "default": parameter_default(info), "description": info.description or ""}
            for path, info in parameter_fields()]
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    import textwrap

    for row in rows:
        default = "(empty)" if row["default"] is None else json.dumps(row["default"], default=str)
        print(f"{row['name']} = {default}")
        print(textwrap.fill(row["description"], width=100, initial_indent="    ", subsequent_indent="    "))
    print("\nSet any of them with --param NAME=VALUE (the value is JSON where it parses as JSON, else text).")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the command (no usage block)."""

    def error(self, message: str) -> None:
        self.exit(2, f"oliveflow: error: {_single_line(message)}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oliveflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="Hugging Face id, local model folder, .gguf file, "
                       "embedded:smollm2-135m-instruct (a real 135 M model), or embedded:tiny-phi3 (default)")
        p.add_argument("--data", help="training JSONL: a path, or a URL such as az://container/train.jsonl "
                                      "(default: the bundled travel set)")
        p.add_argument("--eval-data", help="held-out JSONL: a path or a URL")
        p.add_argument("--template", type=unescape,
                       help="text template with {field} placeholders (default: the model's chat template over "
                       "prompt/response); \\n and \\t in it are a line break and a tab, so "
                       "'<|user|>\\n{prompt}<|end|>' works in single quotes (\\\\ is one backslash)")
        p.add_argument("--quantize", choices=get_args(QuantizeConfig.model_fields["algorithm"].annotation),
                       help="quantization algorithm")
        p.add_argument("--max-steps", type=int, help="LoRA optimizer steps")
        p.add_argument("--device", choices=["cpu", "gpu"], help="export target")
        p.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="any parameter by dotted path, e.g. finetune.r=8 (repeatable)")

    run = sub.add_parser("run", help="run the whole pipeline in-process (Prefect ephemeral mode)")
    common(run)
    run.add_argument("--output", type=Path, help="folder that receives the final model folder")
    run.add_argument("--json", action="store_true", help="end stdout with one JSON summary object")
    run.add_argument("--verbose", action="store_true", help="show every library's output on the console (by "
                     "default it goes to the run's log file, $OLIVEFLOW_HOME/logs/, whose path is printed)")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage alone from given inputs, for debugging")
    stage.add_argument("name", choices=STAGES)
    common(stage)
    stage.add_argument("--output", type=Path, help="folder for this stage's output")
    stage.add_argument("--quantized", type=Path, help="output folder of the quantize stage")
    stage.add_argument("--adapter", type=Path, help="output folder of the finetune stage")
    stage.add_argument("--onnx", type=Path, help="output folder of the export stage")
    stage.set_defaults(func=cmd_stage)

    params = sub.add_parser("params", help="list every parameter (--param NAME=VALUE) with its default and "
                                           "description")
    params.add_argument("--json", action="store_true", help="print one JSON list")
    params.set_defaults(func=cmd_params)

    cache = sub.add_parser("cache", help="the artifact store's size and leftovers; remove what nothing points at")
    actions = cache.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="sizes of the store, stale temp folders, Olive's leftovers, cache "
                                           "records, lock files and the home's folders")
    prune = actions.add_parser("prune", help="list (or with --apply remove) what no cache record, kept artifact "
                                             "or registered model points at")
    for p in (info, prune):
        p.add_argument("--store", help="artifact store: a folder or a URL (default: $OLIVEFLOW_ARTIFACT_STORE, "
                                       "else $OLIVEFLOW_HOME/artifacts)")
        p.add_argument("--verify", action="store_true", help="hash every artifact instead of checking its manifest "
                                                             "and size (slow on big stores)")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=cmd_cache)
    prune.add_argument("--apply", action="store_true", help="remove the listed items (default: a dry run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Nothing here may phone home: this runs on machines with no internet.
    for name, value in (("OLIVE_DISABLE_TELEMETRY", "1"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                        ("HF_HUB_DISABLE_TELEMETRY", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(name, value)
    code = _dispatch(args)
    if argv is None and args.command == "run":  # the command line, not a caller in this process
        _exit_without_teardown(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    try:
        with use(load()):  # the environment is read here, once; what the command calls gets it from current()
            return args.func(args)
    except ValidationError as exc:
        print(f"oliveflow: error: {_single_line(_one_line(exc))}", file=sys.stderr)
    except (InputError, StageError, ServiceError) as exc:
        print(f"oliveflow: error: {_single_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("oliveflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `oliveflow params | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


def _exit_without_teardown(code: int) -> NoReturn:
    """End the process as interpreter exit would, minus freeing the ~5000 modules a run imported (Prefect, MLflow,
    Olive): that took ~0.9 s of a 6 s cached run. Threads are joined, exit handlers run and output is flushed
    first, as interpreter exit does them."""
    import atexit
    import logging
    import threading

    threading._shutdown()  # what interpreter exit calls first: waits for the threads that are not daemons
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a reader that went away (| head) ends the output, not the exit
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
