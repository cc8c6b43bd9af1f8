"""Decode efficiency of an exported onnxruntime-genai model: tokens/s against the memory-bandwidth roofline.

    python bench/bench_decode.py --model-dir $OLIVEFLOW_HOME/artifacts/export/<key>/model \\
        --adapter $OLIVEFLOW_HOME/artifacts/export/<key>/model/adapter_weights.onnx_adapter \\
        --out bench/results/decode-cpu.json

For each runtime/export option (threads, spinning, KV buffer sharing, MatMulNBits accuracy_level) and with and
without the adapter, it measures steady-state greedy decode tokens/s (the prefill and the first token are not
timed), the bytes the model must read per decoded token (weights at their stored size + the KV cache at the
average context of the measured decode), the machine's read bandwidth (a STREAM-like sum over a buffer far
larger than the last-level cache, 1 thread and all threads) and the fraction of that bandwidth a decode uses:
``tokens/s x bytes/token / bandwidth``.

``measure()`` is importable without side effects; onnxruntime-genai, onnx and torch are imported when called.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPT = ("<|im_start|>user\nPlan a three-day trip to Lisbon with one day trip outside the city."
                  "<|im_end|>\n<|im_start|>assistant\n")
ADAPTER_NAME = "bench"

# onnx TensorProto data types -> bytes per element (int4/uint4 handled as half a byte).
_DTYPE_BYTES = {1: 4.0, 2: 1.0, 3: 1.0, 4: 2.0, 5: 2.0, 6: 4.0, 7: 8.0, 9: 1.0, 10: 2.0, 11: 8.0, 12: 4.0,
                13: 8.0, 16: 2.0, 21: 0.5, 22: 0.5}
# Options tried by default: name -> (genai_config ``model.decoder`` overlay, ``search`` overlay). The decode's
# max_length is the prompt + new tokens unless the search overlay sets one.
DEFAULT_OPTIONS = {
    "default": ({}, {}),
    "threads=1": ({"session_options": {"intra_op_num_threads": 1}}, {}),
    "threads=2": ({"session_options": {"intra_op_num_threads": 2}}, {}),
    # genai passes a session_options string value it does not know as an ORT session config entry.
    "threads=2,no-spin": ({"session_options": {"intra_op_num_threads": 2,
                                               "session.intra_op.allow_spinning": "0"}}, {}),
    "past_present_share_buffer=false": ({}, {"past_present_share_buffer": False}),
    # genai's own default max_length (the context length): the shared KV buffer is allocated for 8192 positions.
    "max_length=8192": ({}, {"max_length": 8192}),
}


# --------------------------------------------------------------------------------------------- bytes per token
def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _stored_size(init) -> int:
    """Bytes an initializer occupies where it is stored (external data length, raw data, or dims x dtype)."""
    from onnx import TensorProto

    if init.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in init.external_data}
        if "length" in info:
            return int(info["length"])
    if init.raw_data:
        return len(init.raw_data)
    return int(round(_numel(init.dims) * _DTYPE_BYTES.get(init.data_type, 4.0)))


def _category(name: str, consumers: list[tuple[str, int]]) -> str:
    ops = {op for op, _ in consumers}
    if "MatMulNBits" in ops:
        slot = min(i for op, i in consumers if op == "MatMulNBits")
        kind = {1: "int4_weights", 2: "int4_scales", 3: "int4_zero_points"}.get(slot, "int4_other")
        return ("lm_head_" if "lm_head" in name else "") + kind
    if ops & {"Gather", "GatherBlockQuantized"}:
        return "embedding"
    if any("LayerNorm" in op or "Normalization" in op for op in ops):
        return "norms"
    if "GroupQueryAttention" in ops and ("cos_cache" in name or "sin_cache" in name):
        return "rotary_cache"
    if "lora" in name.lower():
        return "lora_in_graph"
    return "other"


def weight_bytes(model_dir: Path) -> dict:
    """Weights a decode step reads, from the graph (external data is not loaded).

    Every initializer counts at its stored size, except tables read by row: an embedding Gather reads one row
    (all of the table if anything else, e.g. a tied lm_head, consumes it) and the rotary cos/sin caches one row.
    """
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node.op_type, slot))
    by_category: dict[str, int] = {}
    stored_total, unused = 0, []
    for init in graph.initializer:
        size = _stored_size(init)
        stored_total += size
        used = consumers.get(init.name, [])
        if not used:
            unused.append(init.name)
            continue
        category = _category(init.name, used)
        read = size
        # Read by row only: Gather's table (input 0), GatherBlockQuantized's codes/scales/zero points (0, 2, 3).
        row_only = all((op == "Gather" and slot == 0) or (op == "GatherBlockQuantized" and slot in (0, 2, 3))
                       for op, slot in used)
        if category == "embedding" and not row_only:
            category = "embedding_tied_lm_head"  # something else (a tied lm_head) reads the whole table
        elif category in ("embedding", "rotary_cache") and init.dims:
            read = size // int(init.dims[0])
        by_category[category] = by_category.get(category, 0) + read
    return {"per_category": dict(sorted(by_category.items())), "total": sum(by_category.values()),
            "stored_initializers_total": stored_total, "unused_initializers": len(unused)}


def adapter_bytes(adapter: Path) -> dict:
    """Bytes of the LoRA A/B matrices in an .onnx_adapter file (all read each token when the adapter is active)."""
    import onnxruntime as ort

    params = ort.AdapterFormat.read_adapter(str(adapter)).get_parameters()
    total, count = 0, 0
    for value in params.values():
        array = value.numpy()
        total += int(array.size * array.dtype.itemsize)
        count += 1
    return {"lora_matrices": count, "total": total}


def kv_bytes_per_token_of_context(model_dir: Path) -> tuple[int, dict]:
    """KV cache bytes per context position: layers x 2 x kv_heads x head_dim x element size."""
    import onnx

    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    layers, kv_heads, head_dim = (int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]),
                                  int(decoder["head_size"]))
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    kv_type = next((i.type.tensor_type.elem_type for i in graph.input if "past_key_values" in i.name), 1)
    elem = int(_DTYPE_BYTES.get(kv_type, 4.0))
    shape = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "bytes_per_element": elem,
             "dtype": onnx.TensorProto.DataType.Name(kv_type)}
    return layers * 2 * kv_heads * head_dim * elem, shape


# --------------------------------------------------------------------------------------------------- bandwidth
def memory_bandwidth(gib: float = 1.0, repeats: int = 5, threads: list[int] | None = None) -> dict:
    """STREAM-like read (sum) and copy bandwidth over a ``gib`` GiB float32 buffer, best of ``repeats``, in GB/s."""
    import torch

    threads = threads or sorted({1, os.cpu_count() or 1})
    previous = torch.get_num_threads()
    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    out: dict = {"buffer_bytes": n * 4, "repeats": repeats}
    try:
        for t in threads:
            torch.set_num_threads(t)
            src.sum(), dst.copy_(src)  # warm: page in both buffers
            reads, copies = [], []
            for _ in range(repeats):
                tick = time.perf_counter()
                src.sum()
                reads.append(n * 4 / (time.perf_counter() - tick) / 1e9)
                tick = time.perf_counter()
                dst.copy_(src)
                copies.append(2 * n * 4 / (time.perf_counter() - tick) / 1e9)  # read + write
            out[f"threads={t}"] = {"read_gbs_best": round(max(reads), 2), "read_gbs_median": round(
                statistics.median(reads), 2), "copy_gbs_best": round(max(copies), 2),
                "copy_gbs_median": round(statistics.median(copies), 2)}
    finally:
        torch.set_num_threads(previous)
        del src, dst
    return out


# ------------------------------------------------------------------------------------------------------ decode
def _decode_once(og, model, ids: list[int], new_tokens: int, search: dict, adapters=None) -> tuple[int, float]:
    """One greedy generation: the prompt (prefill) and the first token untimed, then ``new_tokens - 1`` timed
    decode steps. Returns (timed steps, seconds). ``min_length`` keeps an early EOS from ending the run."""
    params = og.GeneratorParams(model)
    length = len(ids) + new_tokens
    params.set_search_options(max_length=int(search.get("max_length", length)), min_length=length,
                              do_sample=False)
    generator = og.Generator(model, params)
    if adapters is not None:
        generator.set_active_adapter(adapters, ADAPTER_NAME)
    generator.append_tokens(ids)  # prefill: computes the logits of the first new token
    generator.generate_next_token()  # the first token: sampled from the prefill's logits, no model run
    steps = 0
    tick = time.perf_counter()
    while steps < new_tokens - 1 and not generator.is_done():
        generator.generate_next_token()  # one model run on the previous token, then the argmax
        steps += 1
    return steps, time.perf_counter() - tick


def _load(og, model_dir: Path, decoder_overlay: dict, search_overlay: dict):
    config = og.Config(str(model_dir))
    overlay = {}
    if decoder_overlay:
        overlay["model"] = {"decoder": decoder_overlay}
    if search_overlay:
        overlay["search"] = search_overlay
    if overlay:
        config.overlay(json.dumps(overlay))
    return og.Model(config)


def with_accuracy_level(model_dir: Path, level: int, into: Path) -> Path:
    """A copy of ``model_dir`` whose MatMulNBits nodes have ``accuracy_level=level`` (same weights; the external
    data and other files are linked, not copied). Valid: accuracy_level only picks the kernel's compute type."""
    import onnx

    into.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "model.onnx":
            target = into / item.name
            if not target.exists():
                target.symlink_to(item.resolve())
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(attrs + [onnx.helper.make_attribute("accuracy_level", level)])
    onnx.save(model, str(into / "model.onnx"))
    return into


def accuracy_levels(model_dir: Path) -> list[int]:
    import onnx

    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    return sorted({next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
                   for n in graph.node if n.op_type == "MatMulNBits"})


def measure(model_dir: Path, adapter: Path | None, *, new_tokens: int = 128, repeats: int = 3,
            prompt: str = DEFAULT_PROMPT, options: dict | None = None, accuracy_level_variants: tuple = (1, 4),
            bandwidth: dict | None = None, bandwidth_gib: float = 1.0) -> dict:
    """Decode tokens/s, bytes per token, memory bandwidth and the bandwidth fraction, per option.

    ``options`` maps a name to (genai_config ``model.decoder`` overlay, search overlay); default
    ``DEFAULT_OPTIONS``. ``accuracy_level_variants`` adds a run per MatMulNBits accuracy_level on a patched copy
    of the graph (default options otherwise). ``bandwidth`` reuses a ``memory_bandwidth()`` result.
    """
    import onnxruntime_genai as og

    model_dir = Path(model_dir)
    options = DEFAULT_OPTIONS if options is None else options
    weights = weight_bytes(model_dir)
    kv_per_position, kv_shape = kv_bytes_per_token_of_context(model_dir)
    lora = adapter_bytes(Path(adapter)) if adapter else None
    exported_levels = accuracy_levels(model_dir)
    bandwidth = bandwidth or memory_bandwidth(bandwidth_gib)
    # The roofline: the best read bandwidth measured at any thread count (on a loaded machine, more threads can
    # read less).
    peak = max(v["read_gbs_best"] for k, v in bandwidth.items() if k.startswith("threads="))

    scratch = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        variants = [(name, model_dir, dec, srch) for name, (dec, srch) in options.items()]
        for level in accuracy_level_variants:
            if exported_levels == [level]:
                continue  # the export already is this level: "default" measures it
            variants.append((f"accuracy_level={level}",
                             with_accuracy_level(model_dir, level, scratch / f"acc{level}"), {}, {}))
        # All variants stay loaded and the repetitions go round-robin over (variant, adapter on/off), so a change
        # in the machine's load during the run hits every variant alike; best and median are kept per variant.
        loaded = []
        for name, folder, decoder_overlay, search_overlay in variants:
            model = _load(og, folder, decoder_overlay, search_overlay)
            adapters = None
            if adapter:
                adapters = og.Adapters(model)
                adapters.load(str(adapter), ADAPTER_NAME)
            loaded.append((name, model, adapters, decoder_overlay, search_overlay))
        ids = og.Tokenizer(loaded[0][1]).encode(prompt).tolist()
        cases = [(name, label, model, active, search) for name, model, adapters, _, search in loaded
                 for label, active in (("base", None), ("adapter", adapters)) if label == "base" or adapters]
        rates: dict = {(name, label): [] for name, label, *_ in cases}
        steps_seen = 0
        for repetition in range(repeats + 1):  # repetition 0 warms each session and its allocator: not kept
            for name, label, model, active, search in cases:
                steps, seconds = _decode_once(og, model, ids, new_tokens, search, active)
                if repetition:
                    rates[(name, label)].append(steps / seconds)
                    steps_seen = steps
        # Timed step k (1..steps) runs the model on position len(ids)+k-1, attending over len(ids)+k positions.
        average_context = len(ids) + (steps_seen + 1) / 2
        kv = int(kv_per_position * average_context)
        runs: dict = {}
        for name, _, adapters, decoder_overlay, search_overlay in loaded:
            entry = runs.setdefault(name, {"genai_overlay": {"model.decoder": decoder_overlay,
                                                             "search": search_overlay}})
            threads = decoder_overlay.get("session_options", {}).get("intra_op_num_threads")
            same = bandwidth.get(f"threads={threads or os.cpu_count()}", {}).get("read_gbs_best")
            for label in ("base", "adapter"):
                if (name, label) not in rates:
                    continue
                best, median = max(rates[(name, label)]), statistics.median(rates[(name, label)])
                lora_read = lora["total"] if label == "adapter" else 0
                per_token = weights["total"] + lora_read + kv
                entry[label] = {
                    "tokens_per_s_best": round(best, 2), "tokens_per_s_median": round(median, 2),
                    "tokens_per_s_all": [round(r, 2) for r in rates[(name, label)]],
                    "bytes_per_token": {"weights": weights["total"], "lora": lora_read, "kv_cache": kv,
                                        "total": per_token},
                    "gb_per_s_used_best": round(best * per_token / 1e9, 3),
                    "fraction_of_peak_bandwidth": round(best * per_token / 1e9 / peak, 4),
                    "fraction_of_peak_bandwidth_median": round(median * per_token / 1e9 / peak, 4),
                    "fraction_of_same_threads_bandwidth": round(best * per_token / 1e9 / same, 4) if same else None,
                }
        del cases, loaded
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    return {
        "model_dir": str(model_dir), "adapter": str(adapter) if adapter else None,
        "new_tokens": new_tokens, "repeats": repeats, "exported_accuracy_level": exported_levels,
        "bytes": {"weights": weights, "lora": lora,
                  "kv_cache": {**kv_shape, "bytes_per_context_position": kv_per_position}},
        "bandwidth_gbs": bandwidth, "bandwidth_read_gbs_peak": peak, "prompt_tokens": len(ids),
        "timed_steps": steps_seen, "average_context": average_context, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime_genai": og.__version__ if hasattr(og, "__version__") else None,
                    "loadavg_at_end": list(os.getloadavg())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="exported genai folder (genai_config.json)")
    parser.add_argument("--adapter", type=Path, help="the .onnx_adapter file (default: the one in --model-dir)")
    parser.add_argument("--no-adapter", action="store_true", help="measure the base only")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", nargs="+", help=f"subset of {sorted(DEFAULT_OPTIONS)}")
    parser.add_argument("--accuracy-levels", nargs="*", type=int, default=[1, 4],
                        help="MatMulNBits accuracy_level variants on a patched copy (none: skip)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/decode-cpu.json"))
    args = parser.parse_args()

    adapter = None if args.no_adapter else (args.adapter or next(iter(sorted(args.model_dir.glob(
        "*.onnx_adapter"))), None))
    options = {k: DEFAULT_OPTIONS[k] for k in args.options} if args.options else None
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    result = measure(args.model_dir, adapter, new_tokens=args.new_tokens, repeats=args.repeats, options=options,
                     accuracy_level_variants=tuple(args.accuracy_levels), bandwidth_gib=args.bandwidth_gib)
    result["machine"]["loadavg_at_start"] = load_before
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({name: {label: {k: run[label][k] for k in ("tokens_per_s_best", "tokens_per_s_median",
                                                                  "fraction_of_peak_bandwidth")}
                             for label in ("base", "adapter") if label in run}
                      for name, run in result["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
