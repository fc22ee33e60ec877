"""What a LoRA step keeps for backward: by default no more than full fine-tuning keeps.

The frozen base projections save no input (their weight needs no gradient), so
LoRA's activations could only exceed full fine-tuning's through what the
adapters add. With adapter dropout each adapter keeps its own dropped copy of its
input and the mask (at 124M: 283 MiB saved against full fine-tuning's 190 MiB);
without, the adapters read the input the layer holds anyway. The bytes are
counted with autograd's saved-tensor hooks, once per storage, parameters left
out, on the trainer's own model (`build_model`) from a tiny saved base.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.base_models import inspect_base_model
from services.scheduler.adaptation import AdaptationRequest
from services.scheduler.handlers import plan_to_proto
from services.scheduler.planner import PlanRequest, plan_training
from services.trainer.config import TrainConfig
from services.trainer.training import build_model
from tests.services.scheduler.test_planner import CPU


def saved_activation_bytes(base_dir: Path, **overrides: object) -> int:
    """Bytes autograd keeps for backward over one forward of 2 x 64 tokens."""
    config = TrainConfig.from_preset("test-tiny", pretrained_dir=base_dir, **overrides)
    model = build_model(config, {"vocab_size": 1}, pad_token_id=0)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(0, int(model.config.vocab_size), (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


def test_lora_by_default_keeps_no_more_activations_than_full_fine_tuning(base_models):
    full = saved_activation_bytes(base_models["llama"], adapter_kind="full")
    lora = saved_activation_bytes(base_models["llama"], adapter_kind="lora")
    assert lora <= full, (lora, full)


def test_asked_for_adapter_dropout_is_applied_and_costs_its_copies(base_models):
    full = saved_activation_bytes(base_models["llama"], adapter_kind="full")
    dropped = saved_activation_bytes(base_models["llama"], adapter_kind="lora", dropout=0.1)
    assert dropped > 1.3 * full, (dropped, full)


def test_the_planner_plans_no_adapter_dropout_unless_asked_and_carries_an_asked_one(
        base_models):
    base = inspect_base_model(str(base_models["llama"]), [base_models["llama"].parent])

    def planned(dropout: float | None) -> float:
        request = PlanRequest(train_tokens=50_000, vocab_size=base.vocab_size, seq_len=64,
                              time_budget_s=60, family="llama", adaptation=AdaptationRequest(
                                  base=base, kind="lora", lora_dropout=dropout))
        plan = plan_to_proto(plan_training(request, [CPU]).plan)
        return TrainConfig.from_plan(plan).adapter.dropout

    assert planned(None) == 0.0
    assert planned(0.05) == 0.05
