"""DeepSpeed's own launcher (``deepspeed`` over pdsh, ssh or on one node).

``deepspeed/launcher/launch.py`` gives each process ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and, instead of torchrun's names,
``LOCAL_SIZE`` (processes on this node), ``CROSS_RANK`` (this node's index) and
``CROSS_SIZE`` (the nodes). Read as a hand-set ``RANK``/``WORLD_SIZE`` job they would give
one node holding every rank; read here they give the real layout.

Example:
    >>> info = DEEPSPEED.detect({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
    ...                          "LOCAL_SIZE": "4", "CROSS_RANK": "1", "CROSS_SIZE": "2",
    ...                          "MASTER_ADDR": "worker-0", "MASTER_PORT": "29500"})
    >>> (info.launcher, info.local_world_size, info.node_rank, info.num_nodes)
    ('deepspeed', 4, 1, 2)
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.launchers.base import EnvReader, Launcher, ProcessInfo, resolve_master

__all__ = ["DEEPSPEED"]

_MARKERS = ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "RANK" not in env or not any(m in env for m in _MARKERS):
        return None
    r = EnvReader(env, "deepspeed")
    r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    r.int("local_rank", "LOCAL_RANK")
    r.int("local_world_size", ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"))
    r.int("node_rank", "CROSS_RANK")
    nodes = r.int("num_nodes", "CROSS_SIZE")
    r.check_counts()
    addr, port = resolve_master(
        r, single_node=nodes == 1, world_size=world, fallback_port=lambda: None
    )
    return r.info(master_addr=addr, master_port=port)


DEEPSPEED = Launcher("deepspeed", detect=_detect, variables=_MARKERS)
