"""Planning a run from a base model: sized from the base's real count and shape, full or
LoRA by memory (and saying why), QLoRA only where a kernel exists, every LoRA setting
carried to the trainer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.base_models import BaseModelInfo, inspect_base_model
from services.scheduler.adaptation import AdaptationRequest, lora_parameters
from services.scheduler.handlers import plan_to_proto
from services.scheduler.planner import PlanError, PlanRequest, plan_training
from services.trainer.config import TrainConfig
from tests.services.scheduler.test_planner import CPU, GPU

SEVEN_B = BaseModelInfo(
    directory=Path("/models/llama-7b"), family="llama", hidden_size=4096, num_layers=32,
    num_heads=32, num_kv_heads=32, intermediate_size=11008, vocab_size=32000,
    max_position_embeddings=4096, tie_word_embeddings=False, parameters=6_738_415_616,
    weight_files=("model.safetensors",), weight_format="safetensors", eos_token_id=2,
    pad_token_id=None, chat_template=None)
"""Llama-2-7B's shape and count, described without its 13 GB of weights."""


def _request(adaptation: AdaptationRequest, **fields) -> PlanRequest:
    return PlanRequest(**{"train_tokens": 2_000_000, "vocab_size": 32000, "seq_len": 512,
                          "time_budget_s": 3600 * 24, "global_batch": 8, "epochs": 1.0,
                          "family": "llama", "adaptation": adaptation, **fields})


def test_a_base_run_is_sized_from_the_bases_own_count_and_shape(base_models):
    base = inspect_base_model(str(base_models["qwen2"]), [base_models["qwen2"].parent])
    request = PlanRequest(train_tokens=50_000, vocab_size=base.vocab_size, seq_len=64,
                          time_budget_s=60, family="qwen2",
                          adaptation=AdaptationRequest(base=base, kind="lora", lora_rank=4,
                                                       lora_targets=("q_proj", "v_proj")))
    plan = plan_training(request, [CPU]).plan
    assert plan.parameters == base.parameters  # from the safetensors headers
    proto = plan_to_proto(plan)
    assert (proto.hidden_size, proto.num_layers, proto.family) == (64, 2, "qwen2")
    assert proto.base_model == str(base.directory) and proto.adaptation == "lora"
    assert proto.trainable_parameters == lora_parameters(base, 4, ("q_proj", "v_proj"))
    config = TrainConfig.from_plan(proto)
    assert config.model.pretrained_dir == base.directory
    assert (config.adapter.kind, config.adapter.rank, config.adapter.alpha) == ("lora", 4, 8.0)
    assert config.adapter.targets == ("q_proj", "v_proj")


def test_lora_memory_is_the_frozen_base_plus_the_adapters_state():
    full = plan_training(_request(AdaptationRequest(base=SEVEN_B, kind="full")),
                         [GPU]).plan
    lora = plan_training(_request(AdaptationRequest(base=SEVEN_B, kind="lora")), [GPU]).plan
    int4 = plan_training(_request(AdaptationRequest(base=SEVEN_B, kind="lora",
                                                    base_weights="int4")), [GPU]).plan
    n, t = SEVEN_B.parameters, lora.adaptation.trainable_parameters
    assert lora.memory.parameters_bytes == 4 * n and int4.memory.parameters_bytes == 0.5 * n
    assert lora.memory.optimizer_bytes == 12 * t and lora.memory.gradients_bytes == 4 * t
    assert full.memory.gradients_bytes > 100 * lora.memory.gradients_bytes


def test_unasked_the_planner_takes_lora_when_full_fine_tuning_fits_nowhere():
    # A 64 GiB CPU machine: full fine-tuning of 7B needs 16 B/parameter (108 GB) before
    # activations, and a CPU has no ZeRO to shard or offload it.
    machine = replace(CPU, name="cpu-64", memory_gib=64.0)
    plan = plan_training(_request(AdaptationRequest(base=SEVEN_B)), [machine]).plan
    assert plan.adaptation.kind == "lora"
    assert "full fine-tuning has no plan" in plan.adaptation.reason
    assert "does not fit" in plan.adaptation.reason
    tiny = replace(SEVEN_B, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                   intermediate_size=512, parameters=17_000_000)
    chosen = plan_training(_request(AdaptationRequest(base=tiny)), [machine]).plan.adaptation
    assert chosen.kind == "full" and "full fine-tuning fits" in chosen.reason


def test_quantized_base_weights_are_refused_where_no_kernel_exists():
    with pytest.raises(PlanError, match=r"int4 base weights .QLoRA. need bitsandbytes' CUDA "
                                        r"kernels; test CPU has none"):
        plan_training(_request(AdaptationRequest(base=SEVEN_B, kind="lora",
                                                 base_weights="int4")), [CPU])
    with pytest.raises(PlanError, match="base weights int8 need LoRA"):
        plan_training(_request(AdaptationRequest(base=SEVEN_B, kind="full",
                                                 base_weights="int8")), [GPU])


@pytest.mark.parametrize("asked", ["on", "off"])
def test_gradient_checkpointing_asked_for_is_honoured(asked):
    request = PlanRequest(train_tokens=2_000_000, vocab_size=4096, seq_len=128,
                          time_budget_s=600, gradient_checkpointing=asked)
    plan = plan_training(request, [CPU]).plan
    assert plan.parallelism.gradient_checkpointing is (asked == "on")
