"""The fine-tune's memory plan (oliveflow.memory): what it picks for a card, and the shapes it reads."""

import pytest

from oliveflow.memory import USABLE_SHARE, DoesNotFit, ModelShape, plan_training

PHI35 = ModelShape(layers=32, hidden=3072, intermediate=8192, vocab=32064, heads=32, kv_heads=32, head_dim=96)
GIB = 2**30


def phi35_plan(gib: float, **overrides):
    args = dict(budget_bytes=int(gib * GIB), weights_bytes=int(2.12e9), batch_size=8, sequence_tokens=1024,
                dtype_bytes=2, lora_r=64, device="test")
    return plan_training(PHI35, **{**args, **overrides})


def test_a_24_gib_card_gets_checkpointing_and_the_whole_batch_under_its_share():
    plan = phi35_plan(24)
    assert plan.gradient_checkpointing and plan.float_base
    assert plan.micro_batch_size * plan.gradient_accumulation_steps == 8
    assert plan.estimated_peak_gb * 1e9 <= USABLE_SHARE * 24 * GIB


def test_a_large_card_trains_the_whole_batch_without_checkpointing():
    plan = phi35_plan(139)
    assert (plan.micro_batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing) == (8, 1, False)


def test_what_a_person_sets_is_kept_and_the_rest_planned_around_it():
    no_checkpointing = phi35_plan(24, checkpointing=False)
    assert not no_checkpointing.gradient_checkpointing
    assert (no_checkpointing.micro_batch_size, no_checkpointing.gradient_accumulation_steps) == (1, 8)
    assert phi35_plan(139, micro_batch_size=2).gradient_accumulation_steps == 4


def test_the_float_base_is_given_up_before_the_run_is():
    plan = phi35_plan(12)  # int4 weights + LoRA + a 7 GB float copy leave no room for activations
    assert not plan.float_base
    assert plan.estimated_peak_gb * 1e9 <= USABLE_SHARE * 12 * GIB


def test_a_card_too_small_is_refused_with_the_sizes():
    with pytest.raises(DoesNotFit, match=r"needs about .* GB even at micro-batch 1 .* has 4\.3 GB"):
        phi35_plan(4)


def test_trained_scales_count_the_unpacked_codes_the_rebuilt_weights_and_the_deltas():
    plain, scales = phi35_plan(139), phi35_plan(139, train_scales=True)
    float_copy = 2 * PHI35.linear_parameters
    deltas = 16 * PHI35.linear_parameters // 32
    assert (scales.micro_batch_size, scales.gradient_checkpointing) == (8, False)
    # Without checkpointing: the unpacked codes and every layer's rebuilt weight, instead of the one float copy.
    assert scales.estimated_peak_gb == pytest.approx(plain.estimated_peak_gb + (float_copy + deltas) / 1e9, abs=0.01)
    assert phi35_plan(24, train_scales=True).gradient_checkpointing  # fits, with checkpointing
    with pytest.raises(DoesNotFit, match="with gradient checkpointing and trained scales"):
        phi35_plan(12, train_scales=True)  # the plain LoRA fits here by giving up the float base
    assert phi35_plan(139, train_scales=True, group_size=128).estimated_peak_gb < scales.estimated_peak_gb


def test_a_small_model_on_a_cpu_keeps_the_old_settings():
    smol = ModelShape(layers=30, hidden=576, intermediate=1536, vocab=49152, heads=9, kv_heads=3, head_dim=64)
    plan = plan_training(smol, budget_bytes=8 * GIB, weights_bytes=int(1.1e8), batch_size=8, sequence_tokens=128,
                         dtype_bytes=4, lora_r=16, device="cpu")
    assert (plan.micro_batch_size, plan.gradient_checkpointing, plan.float_base) == (8, False, True)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_the_shape_counts_the_decoder_linears_of_a_real_model(kind):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, head_dim=32))
    else:
        model = Phi3ForCausalLM(Phi3Config(**common, num_key_value_heads=4, pad_token_id=0))
    shape = ModelShape.from_config(model.config.to_dict())
    linears = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and name.startswith("model.layers."))
    assert shape.linear_parameters == linears
    lora = sum(shape_in + shape_out for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")
               for shape_out, shape_in in [m.weight.shape])
    # Exact with q/k/v and gate/up apart (Llama); an upper bound for Phi-3's fused qkv_proj and gate_up_proj.
    assert shape.lora_parameters(8) == 8 * lora if kind == "llama" else shape.lora_parameters(8) > 8 * lora
