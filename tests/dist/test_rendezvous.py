"""Rendezvous failures are named quickly; the store listens on loopback on one node."""

from __future__ import annotations

import os
import socket

import pytest

import devlayer
from devlayer.testing import free_port
from tests.helpers import listening_addresses

pytestmark = [pytest.mark.dist, pytest.mark.timeout(90)]


def _env_rank(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, port: int) -> None:
    for key, value in {
        "RANK": rank,
        "WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "DEVLAYER_LAUNCHER": "env",
    }.items():
        monkeypatch.setenv(key, str(value))


def _listeners_of_master_port() -> list[str]:
    listeners = listening_addresses(int(os.environ["MASTER_PORT"]))
    devlayer.barrier(timeout=20)
    return listeners


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net")
def test_single_node_store_listens_on_loopback_only(clean_env):
    per_rank = devlayer.spawn(
        _listeners_of_master_port, nprocs=2, backend="cpu", timeout=20, join_timeout=60
    )
    for listeners in per_rank:
        assert listeners, "the store should be listening while the job runs"
        assert all(addr == "0100007F" for addr in listeners), listeners


@pytest.mark.timeout(20)
def test_master_port_in_use_is_named_fast(clean_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _env_rank(clean_env, 0, 2, port)
        # timeout=30, yet the error must come at once: the test's own limit is 20 s.
        with pytest.raises(devlayer.RendezvousError, match=f"port {port} is already in use"):
            devlayer.init(backend="cpu", timeout=30)


@pytest.mark.timeout(20)
def test_missing_rank_is_named_within_the_timeout(clean_env):
    _env_rank(clean_env, 0, 3, free_port())
    with pytest.raises(devlayer.RendezvousError) as info:
        devlayer.init(backend="cpu", timeout=2)
    message = str(info.value)
    assert "expected 3 ranks" in message and "only 1 joined" in message
    assert "missing rank(s): 1, 2" in message


@pytest.mark.timeout(25)
def test_unreachable_master_names_address_and_port(clean_env):
    port = free_port()
    _env_rank(clean_env, 1, 2, port)
    with pytest.raises(devlayer.RendezvousError, match=f"127.0.0.1:{port}"):
        devlayer.init(backend="cpu", timeout=3)
