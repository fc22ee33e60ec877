"""The planner's choices, one per constraint: memory-bound runs shard or offload,
budget-bound runs go to spot, devices without bf16 train in fp16; Young/Daly sizes
the checkpoint interval; a calibration changes the next plan."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from lmforge.calibration import Calibration
from lmforge.catalog import SHIPPED_CATALOG, InstanceType, load_catalog
from lmforge.checkpoint_interval import checkpoint_interval_steps, young_daly_interval_s
from services.scheduler.planner import PlanError, PlanRequest, plan_training

GPU = InstanceType(
    name="gpu", accelerator="test GPU", device="cuda", memory_gib=80.0,
    tflops={"bf16": 300.0, "fp16": 300.0, "fp32": 20.0}, interconnect="nvlink",
    interconnect_gb_per_s=300, host_link_gb_per_s=25, counts=(1,),
    on_demand_usd_per_hour=4.0, spot_usd_per_hour=1.5, spot_preemptions_per_hour=0.05,
    efficiency=0.35, compile_speedup=1.0, checkpoint_write_gb_per_s=0.5)
CPU = InstanceType(
    name="cpu", accelerator="test CPU", device="cpu", memory_gib=16.0, tflops={"fp32": 0.1},
    interconnect="none", interconnect_gb_per_s=0, host_link_gb_per_s=0, counts=(1,),
    on_demand_usd_per_hour=0.0, spot_usd_per_hour=None, spot_preemptions_per_hour=0.0,
    efficiency=0.3, compile_speedup=1.0, checkpoint_write_gb_per_s=0.5, size_exponent=0.0)
BIG_RUN = dict(train_tokens=200_000_000, vocab_size=32000, seq_len=2048, preset="1b",
               global_batch=32, epochs=1.0)


def test_steps_are_bounded_by_the_time_budget_and_by_the_data():
    def steps(tokens: int, budget_s: float) -> int:
        request = PlanRequest(train_tokens=tokens, vocab_size=4096, seq_len=128,
                              time_budget_s=budget_s)
        return plan_training(request, [CPU]).plan.option.max_steps

    assert steps(10_000_000, 600) == pytest.approx(10 * steps(10_000_000, 60), rel=0.1)
    assert steps(20_000, 600) == math.ceil(4 * 20_000 / (16 * 128))


def test_a_memory_bound_run_shards_or_offloads():
    small = replace(GPU, memory_gib=24.0)
    report = plan_training(PlanRequest(**BIG_RUN, time_budget_s=30 * 86400), [small])
    par = report.plan.parallelism
    # 1B needs 16 B/parameter = 14.2 GiB of state before activations: on one 24 GiB
    # device the optimizer state has to go to the host.
    assert par.engine == "deepspeed" and par.offload_optimizer
    assert report.plan.option.headroom_gib >= 0
    # On eight of them ZeRO shards the state instead, without the slow host link.
    eight = replace(small, counts=(8,))
    par8 = plan_training(PlanRequest(**BIG_RUN, time_budget_s=30 * 86400), [eight]
                         ).plan.parallelism
    assert par8.zero_stage >= 1 and not par8.offload_optimizer
    tiny_device = replace(GPU, name="tiny", memory_gib=2.0)
    with pytest.raises(PlanError, match=r"tiny x1 .*does not fit: the leanest layout "
                                        r"\(ZeRO-3\+offload optimizer\+offload params"):
        plan_training(PlanRequest(**BIG_RUN, time_budget_s=86400), [tiny_device])


def test_a_budget_bound_run_goes_to_spot():
    on_demand_only = plan_training(PlanRequest(**BIG_RUN, time_budget_s=30 * 86400,
                                               market="on-demand"), [GPU]).plan.option
    assert on_demand_only.complete and on_demand_only.market == "on-demand"
    budget = on_demand_only.usd * 0.6  # spot costs 1.5/4 of on-demand, plus its overhead
    report = plan_training(PlanRequest(**BIG_RUN, budget_usd=budget), [GPU])
    chosen = report.plan.option
    assert chosen.market == "spot" and chosen.complete and chosen.usd <= budget
    (refusal,) = [r for r in report.refused if r.label == "gpu x1 on-demand"]
    assert f"over the ${budget:,.2f} budget" in refusal.reason


def test_a_device_without_bf16_trains_in_fp16_and_refuses_bf16():
    turing = replace(GPU, name="t4", tflops={"fp16": 65.0, "fp32": 8.1})
    request = PlanRequest(**{**BIG_RUN, "preset": "124m"}, time_budget_s=30 * 86400)
    assert plan_training(request, [turing]).plan.option.precision == "fp16"
    assert plan_training(request, [GPU]).plan.option.precision == "bf16"
    with pytest.raises(PlanError, match=r"bf16 asked for, but test GPU computes only "
                                        r"\['fp16', 'fp32'\]"):
        plan_training(replace(request, precision="bf16"), [turing])


def test_young_daly_interval_from_checkpoint_cost_and_preemption_rate():
    # 30 s per checkpoint, one preemption every 20 h: sqrt(2 * 30 * 72000) = 2078 s.
    assert young_daly_interval_s(30.0, 0.05) == pytest.approx(math.sqrt(2 * 30 * 72_000))
    assert young_daly_interval_s(30.0, 0.0) == 0.0
    assert checkpoint_interval_steps(step_seconds=10, total_steps=10_000,
                                     checkpoint_cost_s=30, preemptions_per_hour=0.05) == 208
    # Nothing preempts: a tenth of the run, at most a minute of work.
    assert checkpoint_interval_steps(step_seconds=10, total_steps=30,
                                     checkpoint_cost_s=30, preemptions_per_hour=0) == 3
    spot = plan_training(PlanRequest(**BIG_RUN, time_budget_s=30 * 86400, market="spot"),
                         [GPU]).plan.option
    expected = math.sqrt(2 * spot.checkpoint_cost_s * 3600 / GPU.spot_preemptions_per_hour)
    assert spot.checkpoint_interval_s == pytest.approx(expected)
    assert spot.checkpoint_interval == round(expected / spot.step.total_s)
    # A costlier checkpoint (a slower disk) means a longer interval, by the square root.
    slow = replace(GPU, checkpoint_write_gb_per_s=0.05)
    slower = plan_training(PlanRequest(**BIG_RUN, time_budget_s=30 * 86400, market="spot"),
                           [slow]).plan.option
    ratio = math.sqrt(slower.checkpoint_cost_s / spot.checkpoint_cost_s)
    assert slower.checkpoint_interval_s == pytest.approx(spot.checkpoint_interval_s * ratio)


def test_a_measured_throughput_replaces_the_catalog_figure():
    request = PlanRequest(train_tokens=10**9, vocab_size=4096, seq_len=128,
                          time_budget_s=60)
    before = plan_training(request, [CPU]).plan.option
    assert before.step.source == "catalog"
    measured = Calibration(instance_type="cpu", precision="fp32",
                           flops_per_device=before.step.flops_per_device / 2, hidden_size=64,
                           compiled=False, zero_stage=0, measured_at_unix=0.0, how="test")
    after = plan_training(request, [CPU], {measured.key: measured}).plan.option
    assert after.step.source == "calibrated"
    assert after.step.flops_per_device == pytest.approx(before.step.flops_per_device / 2)
    assert after.max_steps == pytest.approx(before.max_steps / 2, rel=0.1)


def test_impossible_requests_are_refused_with_numbers():
    with pytest.raises(PlanError, match="has 100 training tokens, fewer than one sequence"):
        plan_training(PlanRequest(train_tokens=100, vocab_size=512, seq_len=128,
                                  time_budget_s=60), [CPU])
    with pytest.raises(PlanError, match="unknown model size 'huge'"):
        plan_training(PlanRequest(train_tokens=10**6, vocab_size=512, seq_len=128,
                                  time_budget_s=60, preset="huge"), [CPU])


def test_every_shipped_figure_has_a_source_and_an_override_changes_one_field(tmp_path):
    shipped = json.loads(SHIPPED_CATALOG.read_text())["types"]
    priced = ("memory_gib", "tflops", "on_demand_usd_per_hour", "spot_preemptions_per_hour")
    for name, entry in shipped.items():
        assert set(priced) <= set(entry["sources"]), name
        assert entry["spot_usd_per_hour"] is None or "spot_usd_per_hour" in entry["sources"]
    override = tmp_path / "catalog.json"
    override.write_text(json.dumps({"types": {"gcp-t4": {"on_demand_usd_per_hour": 0.5}}}))
    catalog = load_catalog(override)
    assert catalog.types["gcp-t4"].on_demand_usd_per_hour == 0.5
    assert catalog.types["gcp-t4"].memory_gib == shipped["gcp-t4"]["memory_gib"]
    assert catalog.types["local-cpu"].memory_gib > 0  # this machine's RAM
