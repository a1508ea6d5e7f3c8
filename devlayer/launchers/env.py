"""``env``: ``RANK`` and ``WORLD_SIZE`` exported by hand or by :func:`devlayer.spawn`.

Without ``LOCAL_RANK`` the local layout is derived, never assumed: from
``LOCAL_WORLD_SIZE`` (and ``NODE_RANK`` when set) when it is given; as one node when
``MASTER_ADDR`` is loopback (or unset: the store then listens on loopback) or this host's
name, since only ranks on this machine can reach it; otherwise a :class:`LaunchEnvError`
asks for ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``. Without ``GROUP_RANK`` or ``NODE_RANK``
the node rank follows block placement. When a scheduler or MPI launcher also matches, the
precedence list compares the two instead of choosing silently.

Example:
    >>> info = ENV.detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"})
    >>> (info.launcher, info.local_rank, info.sources["local_rank"])
    ('env', 1, 'MASTER_ADDR unset (loopback): every rank on this host')
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
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
    else:
        local_world = _derive_local(r, env, rank, world)
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


def _derive_local(r: EnvReader, env: Mapping[str, str], rank: int, world: int) -> int:
    """Local rank and size when ``LOCAL_RANK`` is not set: derived where they can be known.

    Raises:
        LaunchEnvError: Several ranks, no ``LOCAL_WORLD_SIZE``, and a ``MASTER_ADDR`` that
            other machines could reach (the ranks may span nodes).
    """
    if r.first(("LOCAL_WORLD_SIZE",)) is not None:
        local_world = r.int("local_world_size", "LOCAL_WORLD_SIZE")
        node = r.first(("GROUP_RANK", "NODE_RANK"))
        if node is None or local_world < 1:  # validate() names a bad size
            r.put("local_rank", rank % max(local_world, 1), "RANK mod LOCAL_WORLD_SIZE")
            return local_world
        first = r.int("node_rank", node[0]) * local_world
        local = r.put("local_rank", rank - first, f"RANK - {node[0]} * LOCAL_WORLD_SIZE")
        if not 0 <= local < local_world:
            raise LaunchEnvError(
                f"{node[0]}={node[1]} cannot hold RANK={rank} with LOCAL_WORLD_SIZE="
                f"{local_world} (ranks {first} to {first + local_world - 1} run there); "
                f"export LOCAL_RANK and a {node[0]} that agree, as torchrun does"
            )
        return local_world
    why = _one_machine(env.get("MASTER_ADDR", "").strip())
    if why is None and world > 1:
        raise LaunchEnvError(
            f"RANK={rank}, WORLD_SIZE={world} are set without LOCAL_RANK or "
            f"LOCAL_WORLD_SIZE, and MASTER_ADDR={env['MASTER_ADDR'].strip()!r} is not "
            f"loopback nor this host's name, so the ranks may span nodes and devlayer cannot "
            f"tell this rank's local rank (it would take rank {rank} as local rank {rank}). "
            f"export LOCAL_RANK=<rank on this node> and LOCAL_WORLD_SIZE=<ranks per node> "
            f"for every rank, or start the job with torchrun / devlayer launch"
        )
    r.put("local_rank", rank, why or "a single rank")
    return r.put("local_world_size", world, why or "a single rank")


def _one_machine(addr: str) -> str | None:
    """Why every rank runs on this machine when they meet at ``addr``, else ``None``.

    Only this machine reaches a loopback address, and an unset ``MASTER_ADDR`` makes the
    store listen on loopback. This host's own name (compared as text: no DNS lookup, which
    could block) is what a hand-written one-machine job exports; a rank on another machine
    sees a name that is not its own and is refused.
    """
    if not addr:
        return "MASTER_ADDR unset (loopback): every rank on this host"
    host = addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost" or host.lower().endswith(".localhost")
    if loopback:
        return f"MASTER_ADDR={addr} is loopback: every rank on this host"
    here = socket.gethostname().lower()
    if host.lower() in (here, here.split(".")[0]):
        return f"MASTER_ADDR={addr} is this host: one node"
    return None


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
