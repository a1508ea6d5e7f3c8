"""``env``: ``RANK`` and ``WORLD_SIZE`` exported by hand or by :func:`devlayer.spawn`.

Without ``LOCAL_RANK`` all ranks are assumed on one node; without ``GROUP_RANK`` or
``NODE_RANK`` the node rank follows block placement. When a scheduler or MPI launcher also
matches, the precedence list compares the two instead of choosing silently.

Example:
    >>> info = ENV.detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"})
    >>> (info.launcher, info.local_rank, info.sources["local_rank"])
    ('env', 1, 'assumed single node')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.launchers.base import (
    BLOCK_PLACEMENT,
    EnvReader,
    Launcher,
    ProcessInfo,
    num_nodes,
    refuse_node_without_local_world,
    resolve_master,
)

__all__ = ["ENV"]


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    r = EnvReader(env, "env")
    rank = r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    if "LOCAL_RANK" in env:
        r.int("local_rank", "LOCAL_RANK")
        local_world = r.int("local_world_size", "LOCAL_WORLD_SIZE", default=world)
    else:  # a hand-written env:// job on one machine
        r.put("local_rank", rank, "assumed single node")
        local_world = r.put("local_world_size", world, "assumed single node")
    nodes = r.put("num_nodes", num_nodes(world, local_world), "world_size / local_world_size")
    refuse_node_without_local_world(r, world)
    if r.first(("GROUP_RANK", "NODE_RANK")) is not None:
        r.int("node_rank", ("GROUP_RANK", "NODE_RANK"))
    else:  # block placement, as torchrun and `devlayer launch` do
        r.put("node_rank", rank // local_world if local_world > 0 else 0, BLOCK_PLACEMENT)
    r.check_counts()
    addr, port = resolve_master(
        r, single_node=nodes == 1, world_size=world, fallback_port=lambda: None
    )
    return r.info(master_addr=addr, master_port=port)


ENV = Launcher(
    "env",
    detect=_detect,
    aliases=("spawn",),
    variables=(
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ),
)
