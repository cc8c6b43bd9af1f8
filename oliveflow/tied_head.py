"""A head tied to the input embedding ships once: as the head's quantized codes, read by both.

Olive unties a tied head to quantize it, leaving a float embedding table beside the int4 head (for
SmolLM2-135M, 113 MB of the 197 MB checkpoint). Here:

- ``tie_embedding_to_head`` (quantize stage): the checkpoint's embedding becomes the head's dequantized
  grid, so the fine-tune trains against exactly the table the graph will hold;
- ``share_embedding_with_head`` (export stage): the graph's float ``Gather`` over that table becomes a
  ``GatherBlockQuantized`` over the head's ``MatMulNBits`` codes, scales and zero points. It is only done
  when the two dequantize to the same values, checked on the whole table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head"


def tensor_file(model_dir: Path, key: str) -> Path | None:
    """The ``*.safetensors`` file of ``model_dir`` that holds ``key``, or None."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if key in f.keys():
                return path
    return None


def head_grid(model_dir: Path) -> torch.Tensor | None:
    """The Olive-quantized head's dequantized weight [vocab, hidden], or None when the head is not quantized."""
    from olive.common.quant.utils import WeightQuantizer, unpack_from_uint8
    from safetensors import safe_open

    path = tensor_file(model_dir, f"{HEAD}.qweight")
    if path is None:
        return None
    config = json.loads((model_dir / "config.json").read_text())["quantization_config"]
    settings = {**config, **((config.get("overrides") or {}).get(HEAD) or {})}
    quantizer = WeightQuantizer(bits=settings["bits"], symmetric=settings["symmetric"],
                                group_size=settings["group_size"])
    with safe_open(str(path), "pt") as f:
        scales = f.get_tensor(f"{HEAD}.scales")
        qweight = f.get_tensor(f"{HEAD}.qweight")
        qzeros = f.get_tensor(f"{HEAD}.qzeros") if f"{HEAD}.qzeros" in f.keys() else None
    rows = qweight.shape[0]
    cols = scales.shape[1] * settings["group_size"] if settings["group_size"] > 0 else qweight.shape[1] * 8 // \
        settings["bits"]
    codes = unpack_from_uint8(qweight, settings["bits"], (rows, cols))
    if qzeros is None or qzeros.numel() == 0:
        zeros = torch.full_like(scales, quantizer.midq, dtype=torch.int32)
    else:
        zeros = unpack_from_uint8(qzeros, settings["bits"], scales.shape)
    return quantizer.dequantize(codes, scales, zeros)


def tie_embedding_to_head(model_dir: Path) -> int:
    """Overwrite the checkpoint's embedding table with the quantized head's grid; return the table's bytes (which the
    graph will not hold), 0 when there is nothing to tie."""
    from safetensors.torch import load_file, save_file

    grid = head_grid(model_dir)
    path = tensor_file(model_dir, EMBEDDING)
    if grid is None or path is None:
        return 0
    tensors = load_file(str(path))
    if tensors[EMBEDDING].shape != grid.shape:
        return 0
    tensors[EMBEDDING] = grid.to(tensors[EMBEDDING].dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors[EMBEDDING].nbytes


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def share_embedding_with_head(onnx_path: Path) -> bool:
    """Replace the float embedding Gather by a GatherBlockQuantized over the head's codes (see the module doc).

    False, and the graph untouched, when there is no float embedding table, no quantized head, or the two
    differ (an untied model): then both stay as they are.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] == EMBEDDING), None)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head/")), None)
    if gather is None or head is None or EMBEDDING not in inits:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    bits, block, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    table = numpy_helper.to_array(inits[EMBEDDING])
    if table.shape != (n, k) or k % block:
        return False
    codes = numpy_helper.to_array(inits[head.input[1]]).reshape(n, -1)  # [N, K * bits / 8] uint8
    scales = numpy_helper.to_array(inits[head.input[2]]).reshape(n, -1)  # [N, K / block]
    has_zeros = len(head.input) > 3 and bool(head.input[3])
    zeros_packed = numpy_helper.to_array(inits[head.input[3]]).reshape(n, -1) if has_zeros else None
    zeros = (_unpack(zeros_packed, bits)[:, : scales.shape[1]] if has_zeros
             else np.full(scales.shape, 2 ** (bits - 1)))
    grid = ((_unpack(codes, bits).reshape(n, -1, block).astype(np.float32) - zeros[..., None].astype(np.float32))
            * scales[..., None].astype(np.float32)).reshape(n, k)
    exact = table.dtype == np.float32
    same = np.array_equal(grid, table) if exact else np.allclose(grid.astype(table.dtype), table, rtol=2e-3, atol=0)
    if not same:
        return False

    added = []

    def constant_reshape(source: str, shape: list[int], name: str) -> str:
        shape_name = f"{name}/shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
        added.append(helper.make_node("Reshape", [source, shape_name], [f"{name}/output_0"], name=name))
        return f"{name}/output_0"

    inputs = [constant_reshape(head.input[1], [n, k * bits // 8], "/model/embed_tokens/codes/Reshape"),
              gather.input[1],
              constant_reshape(head.input[2], [n, k // block], "/model/embed_tokens/scales/Reshape")]
    if has_zeros:
        inputs.append(constant_reshape(head.input[3], list(zeros_packed.shape), "/model/embed_tokens/zeros/Reshape"))
    added.append(helper.make_node("GatherBlockQuantized", inputs, list(gather.output),
                                  name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                                  bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    nodes = [new for node in graph.node for new in (added if node is gather else [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.remove(inits[EMBEDDING])
    _save_like(model, onnx_path)
    return True


def _save_like(model, onnx_path: Path) -> None:
    """Save in place, with the weights in the same external-data file when the graph had one."""
    import onnx

    data = onnx_path.with_name(onnx_path.name + ".data")
    if data.exists():
        data.unlink()
        onnx.save(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    elif model.ByteSize() > 2**31 - 2**20:
        onnx.save(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(onnx_path))
