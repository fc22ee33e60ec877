from __future__ import annotations

from services.cost_autoscaler.observing import parse_request_total
from services.cost_autoscaler.policy import (
    PolicyConfig,
    ReactivePolicy,
    ServiceLoad,
)


def _by_service(decisions):
    return {d.service: d for d in decisions}


def test_backlog_and_request_rate_scale_up_within_bounds():
    policy = ReactivePolicy(PolicyConfig(max_replicas=3, backlog_per_replica=4,
                                         rps_per_replica=10))
    loads = {"exporter": ServiceLoad("exporter", backlog=9),
             "inference-gateway": ServiceLoad("inference-gateway", requests_per_second=15),
             "data-prep": ServiceLoad("data-prep", backlog=100)}
    got = _by_service(policy.decide(loads, {}, {}))
    assert got["exporter"].replicas == 3
    assert got["inference-gateway"].replicas == 2
    assert got["data-prep"].replicas == 3  # capped at max
    assert got["scheduler"].replicas == 1  # idle stays at min


def test_scale_down_waits_for_consecutive_low_readings():
    policy = ReactivePolicy(PolicyConfig(max_replicas=3, scale_down_after=3))
    current = {"trainer": 3}
    idle = {"trainer": ServiceLoad("trainer", backlog=0)}
    assert _by_service(policy.decide(idle, current, {}))["trainer"].replicas == 3
    assert _by_service(policy.decide(idle, current, {}))["trainer"].replicas == 3
    assert _by_service(policy.decide(idle, current, {}))["trainer"].replicas == 1


def test_sre_pin_wins_over_load():
    policy = ReactivePolicy()
    got = _by_service(policy.decide({"trainer": ServiceLoad("trainer", backlog=50)}, {},
                                    {"trainer": 0, "exporter": 2}))
    assert (got["trainer"].replicas, got["trainer"].pinned) == (0, True)
    assert got["exporter"].replicas == 2


def test_metrics_parsing():
    text = ('# HELP x\nlmforge_gateway_requests_total{code="OK",model="a"} 12.0\n'
            'lmforge_gateway_requests_total{code="NOT_FOUND",model="b"} 3.0\n'
            'lmforge_gateway_requests_created{code="OK",model="a"} 1.7e9\n')
    assert parse_request_total(text) == 15.0


def test_scale_in_waits_for_the_cooldown_after_a_change():
    policy = ReactivePolicy(PolicyConfig(max_replicas=4, scale_down_after=1,
                                         scale_in_cooldown_s=300))
    busy = {"exporter": ServiceLoad("exporter", backlog=16)}
    idle = {"exporter": ServiceLoad("exporter", backlog=0)}
    assert _by_service(policy.decide(busy, {"exporter": 1}, {}, now_s=0))["exporter"].replicas == 4
    held = _by_service(policy.decide(idle, {"exporter": 4}, {}, now_s=200))["exporter"]
    assert held.replicas == 4 and "cooldown" in held.reason
    later = _by_service(policy.decide(idle, {"exporter": 4}, {}, now_s=301))
    assert later["exporter"].replicas == 1


def test_a_second_queued_training_run_asks_for_a_second_trainer():
    policy = ReactivePolicy(PolicyConfig(max_replicas=2))
    # One job in training (unacknowledged) and one waiting: two trainers, not one.
    got = _by_service(policy.decide({"trainer": ServiceLoad("trainer", backlog=2)},
                                    {"trainer": 1}, {}))
    assert got["trainer"].replicas == 2
    assert _by_service(policy.decide({"data-prep": ServiceLoad("data-prep", backlog=2)},
                                     {}, {}))["data-prep"].replicas == 1
