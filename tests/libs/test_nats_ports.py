"""The embedded nats-server of a home keeps its port across `lmforge down` / `up`."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from lmforge.runtime.nats_server import home_server, ports_file


def test_a_home_gets_the_same_nats_ports_every_time(tmp_path: Path):
    first = home_server(tmp_path / "home")
    again = home_server(tmp_path / "home")
    assert (again.port, again.monitor_port) == (first.port, first.monitor_port)
    assert again.url == first.url
    assert again.store_dir == (tmp_path / "home" / "nats").resolve()
    assert json.loads(ports_file(tmp_path / "home").read_text()) == {
        "port": first.port, "monitor_port": first.monitor_port}
    assert home_server(tmp_path / "other").port != first.port


def test_a_saved_port_another_program_took_is_replaced_and_saved(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    first = home_server(tmp_path / "home")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()
        with caplog.at_level(logging.WARNING, logger="lmforge.nats"):
            moved = home_server(tmp_path / "home")
    assert moved.port != first.port and moved.monitor_port == first.monitor_port
    assert f"saved NATS port {first.port}" in caplog.text
    assert home_server(tmp_path / "home").port == moved.port  # the new one is kept
