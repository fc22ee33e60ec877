"""Base-model runs through data-prep, the scheduler and the trainer on the in-memory bus:
each run option the user sets in dataset.ready reaches the plan and the trained model."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from services.data_prep.handlers import DataPrepService
from services.scheduler.handlers import SchedulerService
from services.trainer.handlers import TrainerService
from tests.buses import MemoryHarness
from tests.conftest import TEST_DATA


async def _run(tmp_path, base_models, request: ev.TrainingRequest, run_id: str,
               wanted=subjects.MODEL_TRAINED):
    harness = MemoryHarness()
    home = tmp_path / "home"
    roots = [str(TEST_DATA), str(base_models["llama"].parent), str(tmp_path)]
    common = {"home": home, "data_roots": roots}
    async with harness.service(DataPrepService, **common, dataprep_semantic=False,
                               dataprep_seq_len=64), \
            harness.service(SchedulerService, **common, scheduler_instance_types=["local-cpu"]), \
            harness.service(TrainerService, **common):
        await harness.publish(ev.DatasetReady(
            run_id=run_id, dataset_uri=str(TEST_DATA / "fortunes-sample.txt"), format="text",
            model_name="acme", time_budget_s=30, training=request), f"{run_id}:ready")
        done = await harness.wait_for(wanted, 1, run_id=run_id, timeout=240)
        scheduled = harness.broker.events(subjects.TRAINING_SCHEDULED, run_id=run_id)
    return done[0], (scheduled[0] if scheduled else None), home


@pytest.mark.parametrize(("family", "options"), [
    ("llama", {"adaptation": "full", "gradient_checkpointing": "on", "grad_accum": 2}),
    ("qwen2", {"adaptation": "lora", "lora_rank": 4, "lora_alpha": 16.0, "lora_dropout": 0.0,
               "lora_targets": ["q_proj", "v_proj"], "gradient_checkpointing": "off"}),
])
def test_a_base_model_run_carries_its_options_to_the_trained_model(tmp_path, base_models,
                                                                   family, options):
    base = base_models[family]
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps({"prompt": f"Fortune {i}?", "answer": a}) + "\n"
                                for i, a in enumerate(["yes", "no", "yes"])))
    request = ev.TrainingRequest(base_model=str(base), epochs=0.2, global_batch=4,
                                 eval_set=str(eval_set), **options)
    trained, scheduled, home = asyncio.run(_run(tmp_path, base_models, request, family))
    plan = scheduled.plan
    assert plan.base_model == str(base) and plan.family == family
    assert plan.adaptation == options["adaptation"] and not plan.adaptation_reason
    assert plan.gradient_checkpointing is (options["gradient_checkpointing"] == "on")
    assert plan.vocab_size == 600  # the base's embedding rows, not a trained tokenizer's
    if options["adaptation"] == "lora":
        assert (plan.lora_rank, plan.lora_alpha, plan.lora_dropout) == (4, 16.0, 0.0)
        assert list(plan.lora_targets) == ["q_proj", "v_proj"]
        assert 0 < trained.trainable_parameters < trained.parameters / 10
        assert trained.adapter_dir == "adapter"
    else:
        assert plan.grad_accum == 2
        assert trained.trainable_parameters == trained.parameters
        assert trained.adapter_dir == ""
    assert (trained.base_model, trained.adaptation) == (str(base), options["adaptation"])
    # The eval set was scored on the trained model (a few steps from random weights
    # answer neither label, but every example was answered and both labels counted).
    assert trained.HasField("task_eval")
    assert (trained.task_eval.examples, trained.task_eval.labels) == (3, 2)
    model_dir = home / "artifacts" / "sha256" / trained.model.digest.removeprefix("sha256:")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == family
    assert (model_dir / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    if options["adaptation"] == "lora":
        assert (model_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_base_model_outside_the_roots_fails_the_run_naming_it(tmp_path, base_models):
    request = ev.TrainingRequest(base_model="/usr/share/models/tiny")
    failed, _, _ = asyncio.run(_run(tmp_path, base_models, request, "outside",
                                    wanted=subjects.STAGE_FAILED))
    assert failed.stage == "data-prep"
    assert "base model directory '/usr/share/models/tiny' is outside the allowed roots" \
        in failed.reason
