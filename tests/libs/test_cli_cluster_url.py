"""The CLI reaches NATS through a cluster's comma-separated URL list (what `lmforge up
--nats-cluster 3` writes to the state file); `lmforge run` used to fail with a
traceback ("Port could not be cast to integer value as '47681,nats:'")."""

from __future__ import annotations

import asyncio

from lmforge.cli.runs import connect_nats
from lmforge.runtime.nats_server import free_port


def test_connect_nats_takes_a_comma_separated_list_of_servers(nats_server) -> None:
    async def scenario() -> bool:
        dead = f"nats://127.0.0.1:{free_port()}"
        nc = await connect_nats(f"{nats_server.url},{dead}")
        try:
            return nc.is_connected
        finally:
            await nc.close()

    assert asyncio.run(scenario())
