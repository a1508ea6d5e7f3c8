"""Hand-set ``RANK``/``WORLD_SIZE`` without ``LOCAL_RANK`` (issue 25: layout values not read
are derived or cross-checked, never assumed).

Before, the ``env`` detector read such a job as one node (local rank = rank) whatever
``MASTER_ADDR`` said, and ignored ``LOCAL_WORLD_SIZE``: on the second node of a two-node
job, rank 5 of 8 became local rank 5 and picked device 5 on a four-device machine.
"""

from __future__ import annotations

import socket

import pytest

from devlayer.errors import LaunchEnvError
from devlayer.launchers import detect
from devlayer.testing import slurm_env


def _layout(env: dict[str, str]) -> tuple[int, ...]:
    info = detect(env)
    assert info.launcher == "env"
    return (info.rank, info.world_size, info.local_rank, info.local_world_size,
            info.node_rank, info.num_nodes)  # fmt: skip


def test_a21_n2_a_remote_master_without_local_rank_is_refused() -> None:
    """A21-N2: RANK/WORLD_SIZE with neither LOCAL_RANK nor LOCAL_WORLD_SIZE and a
    MASTER_ADDR that is not loopback and not this host's name: the ranks may be on several
    nodes, so detect() raises a LaunchEnvError naming the values seen, LOCAL_RANK and
    LOCAL_WORLD_SIZE and the fix (was: local rank = rank, one node assumed). Forcing the
    env launcher does not bypass it."""
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-node07.x", "MASTER_PORT": "29500"}
    for case in (env, {**env, "DEVLAYER_LAUNCHER": "env"}):
        with pytest.raises(LaunchEnvError) as err:
            detect(case)
        text = str(err.value)
        for part in ("RANK=5", "WORLD_SIZE=8", "MASTER_ADDR='gpu-node07.x'", "LOCAL_RANK",
                     "LOCAL_WORLD_SIZE", "export"):  # fmt: skip
            assert part in text, text


def test_a21_n2_local_world_size_gives_the_local_rank() -> None:
    """A21-N2: with LOCAL_WORLD_SIZE and no LOCAL_RANK, the local rank is derived, from the
    node rank when one is set (RANK - NODE_RANK * LOCAL_WORLD_SIZE), else by block
    placement (RANK mod LOCAL_WORLD_SIZE), each with its source; a node rank that cannot
    hold the rank is refused by name (was: LOCAL_WORLD_SIZE ignored, one node of 8)."""
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip
    assert _layout(env) == (5, 8, 1, 4, 1, 2)
    assert "LOCAL_WORLD_SIZE" in detect(env).sources["local_rank"]
    with_node = {**env, "NODE_RANK": "1"}
    assert _layout(with_node) == (5, 8, 1, 4, 1, 2)
    assert "NODE_RANK" in detect(with_node).sources["local_rank"]
    with pytest.raises(LaunchEnvError, match="NODE_RANK=0") as err:
        detect({**env, "NODE_RANK": "0"})
    assert "LOCAL_RANK" in str(err.value)


@pytest.mark.parametrize("addr", [None, "127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_a21_n2_a_loopback_master_means_every_rank_is_here(addr: str | None) -> None:
    """A21-N2: a loopback MASTER_ADDR (or none: the store then listens on loopback) can only
    be reached from this machine, so every rank runs here: one node, local rank = rank,
    with that reason as the source (was: "assumed single node")."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    if addr is not None:
        env["MASTER_ADDR"] = addr
    assert _layout(env) == (1, 2, 1, 2, 0, 1)
    source = detect(env).sources["local_rank"]
    assert "loopback" in source and "assumed" not in source, source


def test_a21_n2_a_master_named_as_this_host_keeps_one_node() -> None:
    """A21-N2: MASTER_ADDR naming this host (its name, as a hand-written one-machine job
    exports it) reads as one node, with that reason as the source; another host's name
    is refused, and a single rank needs no local layout at all."""
    here = socket.gethostname()
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": here, "MASTER_PORT": "29500"}
    assert _layout(env) == (1, 2, 1, 2, 0, 1)
    assert "this host" in detect(env).sources["local_rank"]
    with pytest.raises(LaunchEnvError, match="LOCAL_RANK"):
        detect({**env, "MASTER_ADDR": f"not-{here}"})
    assert _layout({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "far-away"}) == (
        0, 1, 0, 1, 0, 1,
    )  # fmt: skip


def test_a21_n2_a_scheduler_beside_a_hand_set_rank_still_decides() -> None:
    """A21-N2: inside srun, hand-set RANK/WORLD_SIZE with a remote MASTER_ADDR and no
    LOCAL_RANK are compared with SLURM's values (which win), not refused."""
    env = {**slurm_env(5, 8, nodelist="gpu-node[07-08]"), "RANK": "5", "WORLD_SIZE": "8",
           "MASTER_ADDR": "gpu-node07"}  # fmt: skip
    info = detect(env)
    assert (info.launcher, info.local_rank, info.node_rank) == ("slurm", 1, 1)
