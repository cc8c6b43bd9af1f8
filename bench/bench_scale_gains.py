"""LoRA on the int4 model with and without a trainable gain on every quantization scale (PEQA-style), against
the LoRA on the float model. An experiment: its own training loop for every row (AdamW, constant lr after 3 warmup
steps, batch 8, 100 steps, float32), the default quantizer, held-out response perplexity (oliveflow.sft).

Usage: PEQA_PLAN='[["int4",0,null],["peqa",0,5e-4],["float",0,null]]' python bench/bench_scale_gains.py MODEL OUT
"""
import json, os, sys, time, types
from pathlib import Path
import torch
from oliveflow.config import DataConfig, QuantizeConfig
from oliveflow.stages.data import validate_data, resolve_template, read_examples
from oliveflow.stages.model import resolve_model
from oliveflow.stages.quantize import quantize
from oliveflow.sft import encode_rows, pad_batch, held_out_loss
from oliveflow.olive_ext import QuantLinear, QuantLinearLora, dequantize_once
from olive.model import HfModelHandler

from transformers import AutoTokenizer, AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

spec, out = sys.argv[1], Path(sys.argv[2])
qdir_given = sys.argv[3] if len(sys.argv) > 3 else None
out.mkdir(parents=True, exist_ok=True)
data = validate_data(DataConfig()); qc = QuantizeConfig()
base = resolve_model(spec, qc); template = resolve_template(DataConfig(), base.artifact.path)
if qdir_given:
    qmodel_dir = Path(qdir_given)
else:
    (out / "q").mkdir(exist_ok=True)
    qmodel_dir = quantize(base, qc, out / "q", data=data).model_dir
tok = AutoTokenizer.from_pretrained(qmodel_dir)
train, _ = encode_rows(tok, template, read_examples(data.train_path, data.fields), 128)
evals, _ = encode_rows(tok, template, read_examples(data.eval_path, data.fields), 128)
pad = tok.pad_token_id or 0
dev = "cuda" if torch.cuda.is_available() else "cpu"
rows = []


def dequantize_once_one(mod):
    from oliveflow.olive_ext import _dequantized_forward
    mod.forward = types.MethodType(_dequantized_forward, mod)


def gain_forward(self, x):
    c = self._centered
    w = (c * (self.scales * self.gain).unsqueeze(-1)).reshape(self.rows, self.cols)
    return torch.nn.functional.linear(x, w, bias=self.bias).to(x.dtype)


def run(kind, seed, scale_lr=None, steps=100, lr=5e-4):
    torch.manual_seed(seed)
    if kind == "float":
        m = AutoModelForCausalLM.from_pretrained(base.artifact.path, dtype=torch.float32).to(dev)
    else:
        m = HfModelHandler(model_path=str(qmodel_dir)).load_model().to(dev)
        if kind == "int4":
            m = dequantize_once(m)
    gains = []
    if kind == "peqa":
        from olive.common.quant.utils import unpack_from_uint8 as unpack
        for name, mod in m.named_modules():
            if not isinstance(mod, QuantLinear):
                continue
            if "lm_head" in name:
                dequantize_once_one(mod)
                continue
            with torch.no_grad():
                codes = unpack(mod.qweight, mod.quantizer.bits, (mod.qweight.shape[0], mod.cols))
                zeros = (unpack(mod.qzeros, mod.quantizer.bits, mod.scales.shape) if mod.qzeros is not None
                         else torch.full_like(mod.scales, mod.quantizer.midq, dtype=torch.int32))
            centered = codes.reshape(*mod.scales.shape, -1).float() - zeros.unsqueeze(-1).float()
            mod.__dict__["_centered"] = centered.to(mod.scales.dtype)
            with torch.no_grad():
                ref = mod.unpack_and_dequantize(mod.qweight, mod.scales, mod.qzeros)
                assert torch.equal((centered.to(mod.scales.dtype) * mod.scales.unsqueeze(-1)).reshape(mod.rows, mod.cols), ref)
            mod.gain = torch.nn.Parameter(torch.ones_like(mod.scales, dtype=torch.float32))
            mod.forward = types.MethodType(gain_forward, mod)
    names = {n.rsplit(".", 1)[-1] for n, _ in m.named_modules()}
    targets = ["q_proj", "v_proj"] if "q_proj" in names else ["qkv_proj"]
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0, bias="none")
    cfg._register_custom_module({QuantLinear: QuantLinearLora})
    pm = get_peft_model(m, cfg)
    lora_params = [p for n, p in pm.named_parameters() if "lora_" in n]
    groups = [{"params": lora_params, "lr": lr}]
    if kind == "peqa":
        for n, p in pm.named_parameters():
            if n.endswith(".gain"):
                p.requires_grad_(True); gains.append(p)
        groups.append({"params": gains, "lr": scale_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in groups]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=g).tolist()
    started = time.time(); pm.train()
    for step in range(steps):
        for grp, b in zip(opt.param_groups, base_lrs):
            grp["lr"] = b * min(1.0, (step + 1) / 3)
        idx = [order[(step * 8 + i) % len(order)] for i in range(8)]
        batch = {k: v.to(dev) for k, v in pad_batch([train[i] for i in idx], pad).items()}
        loss = pm(**batch).loss
        opt.zero_grad(); loss.backward(); opt.step()
    ppl = held_out_loss(pm, evals, pad, 8).response_perplexity
    row = {"kind": kind, "seed": seed, "scale_lr": scale_lr, "lr": lr, "steps": steps, "ppl": ppl,
           "seconds": round(time.time() - started, 1)}
    if gains:
        allg = torch.cat([p.detach().flatten() for p in gains])
        row["gain_abs_dev_mean"] = float((allg - 1).abs().mean()); row["gain_abs_dev_max"] = float((allg - 1).abs().max())
        row["trainable_gains"] = int(allg.numel())
    rows.append(row); print(json.dumps(row), flush=True)
    (out / "peqa.json").write_text(json.dumps({"spec": spec, "device": dev, "rows": rows}, indent=1))


plan = json.loads(os.environ.get("PEQA_PLAN", '[["float",0,null],["int4",0,null],["peqa",0,1e-4],["peqa",0,5e-4],["peqa",0,2e-3]]'))
for kind, seed, slr in plan:
    run(kind, seed, slr)
