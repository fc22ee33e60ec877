"""LMFORGE_STREAM_REPLICAS=3 on a real three-node JetStream cluster (three nats-server
processes on 127.0.0.1, routed together as deploy/k8s/base/nats.yaml routes its pods)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from lmforge.bus import EventBus
from lmforge.contracts import subjects
from lmforge.contracts.names import Bucket
from lmforge.runtime.nats_server import free_port, nats_server_binary

pytestmark = [pytest.mark.connected, pytest.mark.processes]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[list[str]]:
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = ",".join(f"nats://127.0.0.1:{cluster}" for _, cluster in ports)
    procs = []
    for i, (client, cluster) in enumerate(ports):
        procs.append(subprocess.Popen(
            [str(nats_server_binary()), "-js", "-sd", str(tmp_path / f"n{i}"),
             "-a", "127.0.0.1", "-p", str(client), "-n", f"n{i}", "--cluster_name", "test",
             "--cluster", f"nats://127.0.0.1:{cluster}", "--routes", routes],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / f"n{i}.log").open("w")))
    try:
        yield [f"nats://127.0.0.1:{client}" for client, _ in ports]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


async def _connect_when_meta_leader_is_elected(bus: EventBus, urls: list[str],
                                               replicas: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await bus.connect(",".join(urls), stream_replicas=replicas, connect_timeout_s=10)
            return
        except (nats.js.errors.Error, nats.errors.Error) as exc:
            # A fresh cluster answers "JetStream system temporarily unavailable" until its
            # meta leader is elected.
            if time.monotonic() > deadline:
                raise AssertionError(f"cluster never accepted streams: {exc}") from exc
            if bus.nc is not None:
                await bus.nc.close()
            await asyncio.sleep(0.5)


def test_streams_and_buckets_are_replicated_on_three_nodes(nats_cluster):
    async def scenario() -> tuple[int, int, int, int]:
        bus = EventBus("test")
        await _connect_when_meta_leader_is_elected(bus, nats_cluster, 3)
        try:
            stream = await bus.js.stream_info(subjects.STREAM)
            dead = await bus.js.stream_info(subjects.DEAD_LETTER_STREAM)
            await bus.key_value(Bucket.SCALE_PINS).put("trainer", b"2")
            bucket = await bus.js.stream_info(f"KV_{Bucket.SCALE_PINS}")
            return (stream.config.num_replicas or 0, len(stream.cluster.replicas or []),
                    dead.config.num_replicas or 0, bucket.config.num_replicas or 0)
        finally:
            await bus.close(grace_s=1)

    stream_replicas, followers, dead_replicas, bucket_replicas = asyncio.run(scenario())
    assert (stream_replicas, followers, dead_replicas, bucket_replicas) == (3, 2, 3, 3)


def test_a_client_that_does_not_name_replicas_leaves_r3_streams_as_they_are(nats_cluster):
    """`lmforge run` connects without knowing the cluster's size: it used to ask for R1
    streams, an update the client role may not make, and its dataset.ready was lost."""
    async def scenario() -> int:
        services = EventBus("scheduler")
        await _connect_when_meta_leader_is_elected(services, nats_cluster, 3)
        client = EventBus("cli")
        try:
            await client.connect(",".join(nats_cluster), connect_timeout_s=10)
            info = await client.js.stream_info(subjects.STREAM)
            return info.config.num_replicas or 0
        finally:
            await client.close(grace_s=1)
            await services.close(grace_s=1)

    assert asyncio.run(scenario()) == 3
