"""Kubeflow Trainer v2 (``TrainJob``): torchrun's arguments as ``PET_*`` variables.

The torch plugin of Trainer v2 gives each node's container ``PET_NNODES``,
``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``:
the arguments of a ``torchrun`` it expects to start the processes (torchrun reads them
itself, and ``devlayer launch`` takes its defaults from them). A script started without
torchrun is translated when each node runs one process (rank = node rank, world = nodes);
a node meant to run several (``PET_NPROC_PER_NODE`` > 1, or ``auto``/``gpu``/``cpu``) is
an error saying to use torchrun, never one process. Under torchrun the workers carry
``RANK`` and torchrun's markers, so the ``torchrun`` record matches first.

Example:
    >>> info = TRAINJOB.detect({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1",
    ...                         "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-node-0-0.job",
    ...                         "PET_MASTER_PORT": "29400"})
    >>> (info.rank, info.world_size, info.local_world_size, info.master_addr)
    (1, 2, 1, 'job-node-0-0.job')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import EnvReader, Launcher, ProcessInfo, read_port

__all__ = ["TRAINJOB", "torchrun_arguments"]

_ONE_PER_NODE = "PET_NPROC_PER_NODE=1: one process per node"
#: ``PET_*`` variable -> the ``devlayer launch`` (torchrun) option it gives.
PET_OPTIONS = {
    "PET_NNODES": "nnodes",
    "PET_NPROC_PER_NODE": "nproc",
    "PET_NODE_RANK": "node_rank",
    "PET_MASTER_ADDR": "master_addr",
    "PET_MASTER_PORT": "master_port",
}


def torchrun_arguments(env: Mapping[str, str]) -> dict[str, str]:
    """The ``devlayer launch`` options the ``PET_*`` variables of ``env`` give.

    Example:
        >>> torchrun_arguments({"PET_NNODES": "2", "PET_NODE_RANK": "1", "HOME": "/root"})
        {'nnodes': '2', 'node_rank': '1'}
    """
    return {opt: env[var].strip() for var, opt in PET_OPTIONS.items() if env.get(var, "").strip()}


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "PET_NNODES" not in env or "RANK" in env:
        return None
    nproc = env.get("PET_NPROC_PER_NODE", "").strip()
    if nproc != "1":
        raise LaunchEnvError(
            f"Kubeflow Trainer job (PET_NNODES={env['PET_NNODES'].strip()}) with "
            f"PET_NPROC_PER_NODE={nproc or '(unset)'} started without torchrun: the PET_* "
            f"variables are torchrun's arguments, and this node should run "
            f"{nproc or 'an unknown number of'} processes; start the script with torchrun "
            f"(`torchrun train.py` reads them) or `devlayer launch train.py`"
        )
    r = EnvReader(env, "trainjob")
    nodes = r.int("world_size", "PET_NNODES")
    r.put("num_nodes", nodes, "PET_NNODES")
    rank = r.int("node_rank", "PET_NODE_RANK", default=0 if nodes == 1 else None)
    r.put("rank", rank, r.sources["node_rank"] + " (" + _ONE_PER_NODE + ")")
    r.put("local_rank", 0, _ONE_PER_NODE)
    r.put("local_world_size", 1, _ONE_PER_NODE)
    r.check_counts()
    addr = r.str("master_addr", "PET_MASTER_ADDR")
    port = read_port(r, ("PET_MASTER_PORT",))
    if nodes > 1 and (addr is None or port is None):
        raise LaunchEnvError(
            f"Kubeflow Trainer job across PET_NNODES={nodes} nodes without "
            f"{'PET_MASTER_ADDR' if addr is None else 'PET_MASTER_PORT'}; the torch plugin "
            f"sets both: export it, or start the script with torchrun"
        )
    if addr is None:
        r.sources["master_addr"] = "single node: loopback"
    return r.info(master_addr=addr or "127.0.0.1", master_port=port if nodes > 1 else None)


TRAINJOB = Launcher(
    "trainjob",
    detect=_detect,
    aliases=("kubeflow-trainer",),
    prefixes=("PET_",),
)
