from __future__ import annotations

import pytest

from services.scheduler.planning import (
    PRESETS,
    Parallelism,
    PlanError,
    PlanRequest,
    PoolSpec,
    plan_training,
)


def test_steps_are_bounded_by_the_time_budget_and_by_the_data():
    pool = PoolSpec(sustained_gflops=30)
    small_budget = plan_training(PlanRequest(train_tokens=10_000_000, vocab_size=4096,
                                             seq_len=128, time_budget_s=60), pool)
    big_budget = plan_training(PlanRequest(train_tokens=10_000_000, vocab_size=4096,
                                           seq_len=128, time_budget_s=600), pool)
    little_data = plan_training(PlanRequest(train_tokens=20_000, vocab_size=4096,
                                            seq_len=128, time_budget_s=600), pool)
    assert big_budget.max_steps == pytest.approx(10 * small_budget.max_steps, rel=0.02)
    assert small_budget.estimated_seconds == pytest.approx(60, rel=0.05)
    assert little_data.max_steps == int(4 * 20_000 / (16 * 128))
    for plan in (small_budget, big_budget, little_data):
        assert 1 <= plan.checkpoint_interval <= plan.max_steps
        assert plan.warmup_steps < max(plan.max_steps, 2)


def test_parameter_count_matches_transformers():
    from transformers import LlamaForCausalLM

    from lmforge.modeling import llama_config

    preset = PRESETS["tiny"]
    model = LlamaForCausalLM(llama_config(
        vocab_size=4096, hidden_size=preset.hidden_size, num_layers=preset.num_layers,
        num_heads=preset.num_heads, intermediate_size=preset.intermediate_size, seq_len=128,
        eos_token_id=0, pad_token_id=1))
    assert preset.parameters(4096) == sum(p.numel() for p in model.parameters())


def test_impossible_requests_are_refused_with_numbers():
    pool = PoolSpec()
    with pytest.raises(PlanError, match="has 100 training tokens, fewer than one sequence"):
        plan_training(PlanRequest(train_tokens=100, vocab_size=512, seq_len=128,
                                  time_budget_s=60), pool)
    with pytest.raises(PlanError, match="unknown model preset 'huge'"):
        plan_training(PlanRequest(train_tokens=10**6, vocab_size=512, seq_len=128,
                                  time_budget_s=60, preset="huge"), pool)


def test_a_plan_that_cannot_fit_is_refused_with_the_numbers():
    request = dict(train_tokens=10**9, vocab_size=32000, seq_len=2048, time_budget_s=3600,
                   preset="1b", micro_batch=8)
    gpu = PoolSpec(device="cuda", memory_gib=80, sustained_gflops=400_000)
    with pytest.raises(PlanError) as refused:
        plan_training(PlanRequest(**request), gpu)
    message = str(refused.value)
    assert "does not fit" in message and "16 B/parameter" in message and "80.0 GiB" in message
    # Sharding optimizer, gradients and weights over 8 ranks plus checkpointing fits.
    plan = plan_training(PlanRequest(**request, parallelism=Parallelism(
        engine="deepspeed", zero_stage=3, world_size=8, gradient_checkpointing=True)), gpu)
    n = plan.parameters
    assert plan.memory.optimizer_bytes == pytest.approx(12 * n / 8)
    assert plan.memory.parameters_bytes == pytest.approx(2 * n / 8)
    assert plan.memory.total_bytes < 80 * 2**30
