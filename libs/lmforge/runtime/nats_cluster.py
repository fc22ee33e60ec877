"""`lmforge up --nats-cluster 3`: three local nats-servers routed into one JetStream cluster.

Each node is a `NatsServer` with its own store (`<home>/nats-cluster/n<i>`), its own
client, monitor and route ports (chosen on the first `up` and kept in
`<home>/run/nats-cluster-ports.json`, as `home_server` keeps the single server's),
the server name `lmforge-n<i>` and the cluster name `lmforge`; every node lists every
node's route URL (nats-server ignores the route to itself), as deploy/k8s routes its
StatefulSet pods. Streams and key-value buckets are then created with three replicas
(LMFORGE_STREAM_REPLICAS=3): a stream has one leader and two followers, and a write
is stored once a majority has it, so the cluster loses nothing when one node dies.

What a client sees when the stream leader dies: publishes go unanswered until the
two survivors elect a new leader (a few seconds, measured by
tests/chaos/test_nats_cluster.py and `benchmarks/chaos.py --nats-cluster 3`); the
bus retries them with backoff under the same `Nats-Msg-Id`. The supervisor
restarts the dead node on its own store and it catches up as a follower.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from lmforge.runtime.nats_server import NatsServer, free_port, port_is_free

log = logging.getLogger("lmforge.nats")

CLUSTER_NAME = "lmforge"
PORT_KEYS = ("port", "monitor_port", "cluster_port")


def cluster_ports_file(home: Path) -> Path:
    return home.resolve() / "run" / "nats-cluster-ports.json"


def node_name(index: int) -> str:
    """The server name of node `index` (what JetStream reports as a stream's leader)."""
    return f"lmforge-n{index}"


def home_cluster(home: Path, size: int, *, config_file: Path | None = None
                 ) -> list[NatsServer]:
    """The `size` nodes of an lmforge home's cluster, on the ports they had last time,
    each with `config_file` (users, permissions, TLS: `security.nats_secrets`) if given."""
    if size < 3 or size % 2 == 0:
        raise ValueError(f"--nats-cluster {size}: a JetStream cluster needs an odd number "
                         f"of nodes, at least 3 (a majority must survive a node's loss)")
    path = cluster_ports_file(home)
    saved: list[dict[str, int]] = []
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = [{key: int(node[key]) for key in PORT_KEYS} for node in
                 json.loads(path.read_text())]
    nodes = [dict(saved[i]) if i < len(saved) else {} for i in range(size)]
    for i, node in enumerate(nodes):
        for key in PORT_KEYS:
            if key in node and not port_is_free(node[key]):
                log.warning("the saved %s %d of NATS node %d (%s) is taken; using a new one",
                            key.replace("_", " "), node[key], i, path)
                del node[key]
            if key not in node:
                node[key] = free_port()
    if nodes != saved:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(nodes))
    home = home.resolve()
    routes = tuple(f"nats://127.0.0.1:{node['cluster_port']}" for node in nodes)
    return [NatsServer(store_dir=home / "nats-cluster" / f"n{i}", port=node["port"],
                       monitor_port=node["monitor_port"],
                       log_file=home / "logs" / f"nats-n{i}.log", server_name=node_name(i),
                       cluster_name=CLUSTER_NAME, cluster_port=node["cluster_port"],
                       routes=routes, config_file=config_file, tls=config_file is not None)
            for i, node in enumerate(nodes)]
