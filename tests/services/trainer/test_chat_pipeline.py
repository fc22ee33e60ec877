"""Chat data through data-prep, the scheduler, the trainer and the quantizer on the
in-memory bus: the conversations are rendered with the base's chat template and
trained on assistant tokens, the eval set is scored on the trained and on the
quantized weights, and `lmforge runs` folds the run to the figures of both."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.cli.runs import RunView, task_eval_summary
from lmforge.contracts import subjects
from lmforge.contracts.v1 import events_pb2 as ev
from lmforge.modeling import load_loss_mask, load_token_stream
from services.data_prep.handlers import DataPrepService
from services.quantizer.handlers import QuantizerService
from services.scheduler.handlers import SchedulerService
from services.trainer.handlers import TrainerService
from tests.buses import MemoryHarness
from tests.conftest import TEST_DATA

RUN = "chat-run"


FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach",
          "pear", "plum"]


def _conversations(n: int) -> list[dict]:
    """Questions whose answer is one word (the eval set asks the same kind)."""
    return [{"messages": [
        {"role": "system", "content": "You name the fruit that follows in the list."},
        {"role": "user", "content": f"Which fruit comes after the {FRUITS[i % 10]} "
                                    "in the usual list?"},
        {"role": "assistant", "content": FRUITS[(i + 1) % 10] + " comes next in the list"
                                         + ", as always" * (i % 3)}]}
        for i in range(n)]


def test_a_chat_run_trains_on_assistant_tokens_and_is_scored_before_and_after_quantizing(
        tmp_path, base_models):
    base = base_models["llama"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in _conversations(80)))
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(json.dumps({
        "prompt": f"Which fruit comes after the {FRUITS[i]} in the usual list?",
        "answer": FRUITS[i + 1]}) + "\n" for i in range(4)))
    request = ev.TrainingRequest(base_model=str(base), adaptation="lora", epochs=0.5,
                                 global_batch=4, eval_set=str(eval_set))
    harness = MemoryHarness()
    home = tmp_path / "home"
    common = {"home": home,
              "data_roots": [str(TEST_DATA), str(base.parent), str(tmp_path)]}

    async def scenario():
        async with harness.service(DataPrepService, **common, dataprep_semantic=False,
                                   dataprep_seq_len=256), \
                harness.service(SchedulerService, **common,
                                scheduler_instance_types=["local-cpu"]), \
                harness.service(TrainerService, **common), \
                harness.service(QuantizerService, **common, quantizer_group_size=32,
                                quantizer_calibration_samples=8,
                                quantizer_on_gate_failure="serve-fp"):
            await harness.publish(ev.DatasetReady(
                run_id=RUN, dataset_uri=str(data), model_name="counter", time_budget_s=60,
                training=request), f"{RUN}:ready")
            for _ in range(600):  # the quantized model, or a stage's failure, within 300 s
                if harness.broker.events(subjects.MODEL_QUANTIZED, run_id=RUN) or \
                        harness.broker.events(subjects.STAGE_FAILED, run_id=RUN):
                    return
                await asyncio.sleep(0.5)

    asyncio.run(scenario())
    failed = harness.broker.events(subjects.STAGE_FAILED, run_id=RUN)
    assert not failed, failed[0].reason if failed else ""
    (prepared,) = harness.broker.events(subjects.DATASET_PREPARED, run_id=RUN)
    (trained,) = harness.broker.events(subjects.MODEL_TRAINED, run_id=RUN)
    (quantized,) = harness.broker.events(subjects.MODEL_QUANTIZED, run_id=RUN)

    # data-prep rendered the conversations with the base's ChatML template and marked
    # the assistant's tokens as the only targets
    dataset = home / "artifacts" / "sha256" / prepared.dataset.digest.removeprefix("sha256:")
    tokens, mask = load_token_stream(dataset, "train"), load_loss_mask(dataset, "train")
    assert mask is not None and 0 < mask.sum() < len(tokens)
    # the trainer adapted the base with LoRA and measured the assistant tokens apart
    assert (trained.base_model, trained.adaptation) == (str(base), "lora")
    assert trained.assistant_perplexity > 1
    assert (trained.task_eval.examples, trained.task_eval.labels) == (4, 4)
    # the quantizer scored the same set on the fp model and on its own weights
    assert quantized.task_eval_fp.examples == quantized.task_eval_quantized.examples == 4
    assert quantized.task_eval_fp.exact_match == pytest.approx(trained.task_eval.exact_match)

    view = RunView(RUN)
    for subject in (subjects.DATASET_READY, subjects.DATASET_PREPARED,
                    subjects.TRAINING_SCHEDULED, subjects.MODEL_TRAINED,
                    subjects.MODEL_QUANTIZED):
        for event in harness.broker.events(subject, run_id=RUN):
            view.fold(subject.name, event, 1.0)
    served = "fp" if quantized.served == "fp32" else quantized.method
    assert set(view.task_eval) == {"fp", quantized.method, "served"}
    assert view.task_eval["served"] == served
    assert task_eval_summary(view.task_eval).count("EM ") == 2


# Four services and a quantization (a minute or more on 2 cores): not in `make unit`.
pytestmark = pytest.mark.e2e
