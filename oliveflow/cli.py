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
from typing import Any, NoReturn

from pydantic import ValidationError

from oliveflow.config import PipelineParams
from oliveflow.errors import InputError, ServiceError, StageError

STAGES = ("validate_data", "quantize", "finetune", "export", "smoke_test")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for depth, name in enumerate(parents, start=1):
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            group = ".".join(parents[:depth])
            raise InputError(f"--param {dotted}: {group} was already given a whole value; set either {group}=... "
                             f"or its fields ({group}.NAME=...), not both")
    tree[leaf] = value


def build_params(args: argparse.Namespace) -> PipelineParams:
    raw: dict[str, Any] = {}
    for flag, path in (("model", "model"), ("data", "data.train_path"), ("eval_data", "data.eval_path"),
                       ("template", "data.template"), ("quantize", "quantize.algorithm"),
                       ("max_steps", "finetune.max_steps"), ("output", "output_dir"), ("device", "export.device")):
        value = getattr(args, flag, None)
        if value is not None:
            _set(raw, path, value)
    texts: dict[tuple[str, ...], str] = {}  # --param values that JSON turned into something else than text
    for item in args.param or []:
        if "=" not in item:
            raise InputError(f"--param {item!r} is not key=value; write e.g. --param finetune.r=8")
        key, value = item.split("=", 1)
        parsed = _value(value)
        _set(raw, key.strip(), parsed)
        if not isinstance(parsed, str):
            texts[tuple(key.strip().split("."))] = value
    try:
        return PipelineParams.model_validate(raw)
    except ValidationError as exc:
        # `--param registry.version=2` means the text "2" where a field takes text: retry those as written.
        refused = {loc for loc in (tuple(map(str, error["loc"])) for error in exc.errors()
                                   if error["type"] in ("string_type", "path_type")) if loc in texts}
        if not refused:
            raise
        for key in refused:
            _set(raw, ".".join(key), texts[key])
        return PipelineParams.model_validate(raw)


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid parameter {where}: {message}" if where else f"invalid parameters: {message}"


def _preflight(params: PipelineParams) -> None:
    from oliveflow.output import check_output_dir
    from oliveflow.registry import check_registry_settings
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
    server = None if os.environ.get("PREFECT_API_URL") else start_server()
    try:
        _preflight(params)
        from flows.pipeline import run_local
        from oliveflow.report import markdown

        # Libraries (Olive, ModelBuilder) print progress to stdout; keep it for the summary alone.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            result = run_local(params, server)
    finally:
        if server is not None:
            stop_server(server)
    if args.json:
        summary = {
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
        print(json.dumps(summary))
    else:
        print(markdown(result))
    return 0 if result.smoke.passed else 1


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage from given inputs into ``--output`` (no Prefect, no cache)."""
    from oliveflow import results
    from oliveflow.stages.data import resolve_template, validate_data
    from oliveflow.stages.model import resolve_model
    from oliveflow.store import RESULT_FILE, atomic_dir, load_result

    params = build_params(args)
    data = validate_data(params.data)
    if args.name == "validate_data":
        print(data.model_dump_json(indent=1))
        return 0
    base = resolve_model(params.model, params.quantize)
    needs = {"finetune": ["quantized"], "export": ["quantized", "adapter"], "smoke_test": ["onnx"]}
    for flag in needs.get(args.name, []):
        if getattr(args, flag) is None:
            raise InputError(f"stage {args.name} needs --{flag} DIR (the output folder of an earlier stage)")
    if args.output is None and args.name != "smoke_test":
        raise InputError(f"stage {args.name} needs --output DIR for its result")
    template = resolve_template(params.data, base.artifact.path)

    def run(out: Path):
        if args.name == "quantize":
            from oliveflow.stages.quantize import quantize

            return quantize(base, params.quantize, out, data=data)
        if args.name == "finetune":
            from oliveflow.stages.finetune import finetune

            model = load_result(args.quantized, results.QuantizedModel)
            return finetune(base, model, data, template, params.finetune, out)
        if args.name == "export":
            from oliveflow.stages.export import export_onnx

            model = load_result(args.quantized, results.QuantizedModel)
            return export_onnx(model, load_result(args.adapter, results.Adapter), params.export, out)
        from oliveflow.stages.smoke_test import smoke_test

        return smoke_test(load_result(args.onnx, results.OnnxModel), base, data, template, params.smoke_test)

    if args.name == "smoke_test":
        print(run(Path(".")).model_dump_json(indent=1))
        return 0
    with atomic_dir(Path(args.output).resolve()) as tmp:
        outcome = run(tmp)
        (tmp / RESULT_FILE).write_text(outcome.model_dump_json(indent=1))
    print(outcome.model_copy(update={"artifact": None}).model_dump_json(indent=1))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """``cache info``: what the store and its surroundings hold; ``cache prune``: what nothing points at (dry run
    unless --apply). Reads Prefect's settings and record files only: no server is imported or started."""
    from oliveflow import housekeeping

    location = PipelineParams.model_validate({"artifact_store": args.store}).store_location()
    report = housekeeping.cache_report(location, verify=args.verify, must_exist=args.store is not None)
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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the command (no usage block)."""

    def error(self, message: str) -> None:
        self.exit(2, f"oliveflow: error: {_single_line(message)}; see {self.prog} --help\n")


def _single_line(text: str) -> str:
    """``text`` with every line break escaped: an error names user input, which may hold any character."""
    return _LINE_BREAKS.sub(lambda match: repr(match.group())[1:-1], text)


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")  # where str.splitlines() breaks


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="oliveflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="Hugging Face id, local model folder, .gguf file, "
                       "embedded:smollm2-135m-instruct (a real 135 M model), or embedded:tiny-phi3 (default)")
        p.add_argument("--data", help="training JSONL: a path, or a URL such as az://container/train.jsonl "
                                      "(default: the bundled travel set)")
        p.add_argument("--eval-data", help="held-out JSONL: a path or a URL")
        p.add_argument("--template", help="text template with {field} placeholders (default: the model's chat "
                       "template over prompt/response)")
        p.add_argument("--quantize", choices=["rtn", "gptq", "awq"], help="quantization algorithm")
        p.add_argument("--max-steps", type=int, help="LoRA optimizer steps")
        p.add_argument("--device", choices=["cpu", "gpu"], help="export target")
        p.add_argument("--param", action="append", metavar="KEY=VALUE",
                       help="any parameter by dotted path, e.g. finetune.r=8 (repeatable)")

    run = sub.add_parser("run", help="run the whole pipeline in-process (Prefect ephemeral mode)")
    common(run)
    run.add_argument("--output", type=Path, help="folder that receives the final model folder")
    run.add_argument("--json", action="store_true", help="end stdout with one JSON summary object")
    run.set_defaults(func=cmd_run)

    stage = sub.add_parser("stage", help="run one stage alone from given inputs, for debugging")
    stage.add_argument("name", choices=STAGES)
    common(stage)
    stage.add_argument("--output", type=Path, help="folder for this stage's output")
    stage.add_argument("--quantized", type=Path, help="output folder of the quantize stage")
    stage.add_argument("--adapter", type=Path, help="output folder of the finetune stage")
    stage.add_argument("--onnx", type=Path, help="output folder of the export stage")
    stage.set_defaults(func=cmd_stage)

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
        return args.func(args)
    except ValidationError as exc:
        print(f"oliveflow: error: {_single_line(_one_line(exc))}", file=sys.stderr)
    except (InputError, StageError, ServiceError) as exc:
        print(f"oliveflow: error: {_single_line(str(exc))}", file=sys.stderr)
    except KeyboardInterrupt:
        print("oliveflow: interrupted", file=sys.stderr)
        return 130
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
