"""TrainConfig presets: one config builder for the service, the tests and the benchmarks."""

from __future__ import annotations

import pytest

from lmforge.contracts.v1 import events_pb2 as ev
from services.trainer.config import PRESETS, ConfigError, TrainConfig


def test_the_test_tiny_preset_is_the_tiny_test_model():
    config = TrainConfig.from_preset("test-tiny", max_steps=30)
    m, b = config.model, config.batch
    assert (m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size) == (64, 2, 4, 160)
    assert (b.seq_len, b.micro_batch, b.grad_accum) == (64, 8, 1)
    assert config.optimizer.learning_rate == 3e-3
    assert (config.schedule.max_steps, config.schedule.warmup_steps) == (30, 2)


def test_overrides_name_a_field_or_a_component_and_field():
    config = TrainConfig.from_preset("small", max_steps=40, precision="bf16",
                                     checkpoint_interval=5, engine_kind="deepspeed",
                                     zero_stage=2, world_size=2, learning_rate=1)
    assert config.schedule.max_steps == 40
    assert config.engine.precision == "bf16"
    assert (config.engine.kind, config.engine.zero_stage) == ("deepspeed", 2)
    assert config.checkpoint.interval == 5
    assert config.world_size == 2
    assert config.optimizer.learning_rate == 1.0 and type(config.optimizer.learning_rate) is float
    assert config.model.hidden_size == PRESETS["small"].hidden_size


def test_warm_up_is_cut_to_max_steps_unless_given():
    assert TrainConfig.from_preset("tiny", max_steps=3).schedule.warmup_steps == 3
    assert TrainConfig.from_preset("tiny", max_steps=30).schedule.warmup_steps == 10
    with pytest.raises(ConfigError, match="warmup_steps 5 exceeds max_steps 3"):
        TrainConfig.from_preset("tiny", max_steps=3, warmup_steps=5)


@pytest.mark.parametrize(("name", "overrides", "message"), [
    ("huge", {}, "unknown preset 'huge'; known: .*'test-tiny'"),
    ("tiny", {"max_step": 3}, "unknown override 'max_step' .*max_steps"),
    ("tiny", {"max_steps": "3"}, "max_steps='3' must be of type int"),
    ("tiny", {"compile": 1}, "compile=1 must be of type bool"),
    ("tiny", {"max_steps": 3, "schedule_max_steps": 4}, "schedule.max_steps twice"),
    ("tiny", {"precision": "fp8"}, "engine.precision 'fp8' not in"),
])
def test_a_bad_preset_or_override_is_refused_with_what_was_wrong(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_preset(name, **overrides)


@pytest.mark.parametrize("overrides", [
    {"max_steps": 8},
    {"max_steps": 6, "checkpoint_interval": 3, "engine_kind": "deepspeed", "zero_stage": 3,
     "offload_params": True, "world_size": 2, "grad_accum": 2, "precision": "bf16",
     "gradient_checkpointing": True, "compile": True, "seed": 7},
])
def test_plan_fields_come_back_through_from_plan(overrides):
    config = TrainConfig.from_preset("test-tiny", **overrides)
    assert TrainConfig.from_plan(ev.ResourcePlan(**config.plan_fields(), device="cpu")) == config
