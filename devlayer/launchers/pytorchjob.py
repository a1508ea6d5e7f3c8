"""Kubeflow's PyTorchJob (training-operator v1): each pod is a node.

The operator gives every pod's container ``RANK`` (the replica's index: master 0, workers
1..), ``WORLD_SIZE`` (the replicas, times ``PET_NPROC_PER_NODE`` when set), ``MASTER_ADDR``
(the master pod's service) and ``MASTER_PORT``, but no ``LOCAL_RANK``. Kubernetes gives
every pod ``KUBERNETES_SERVICE_HOST``; with it (or a ``PET_*`` variable of the operator)
and no ``LOCAL_RANK``, this process is local rank 0 of 1 on node ``RANK`` of
``WORLD_SIZE``. A pod meant to run several processes (``PET_NPROC_PER_NODE`` > 1) must
start them with torchrun, which reads the ``PET_*`` variables: without it ``RANK`` is the
pod's index, not a process rank, and that is an error saying so (``auto``, which the
operator counts as one per pod in ``WORLD_SIZE``, is not).

Example:
    >>> info = PYTORCHJOB.detect({"RANK": "3", "WORLD_SIZE": "4", "MASTER_PORT": "23456",
    ...                           "MASTER_ADDR": "job-master-0",
    ...                           "KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    >>> (info.local_rank, info.local_world_size, info.node_rank, info.num_nodes)
    (0, 1, 3, 4)
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import EnvReader, Launcher, ProcessInfo, read_port

__all__ = ["PYTORCHJOB"]

_MARKERS = ("KUBERNETES_SERVICE_HOST", "PET_NPROC_PER_NODE", "PET_NNODES", "PET_NODE_RANK")
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_ONE_PER_POD = "one process per pod (no LOCAL_RANK)"


def _nproc(env: Mapping[str, str]) -> None:
    """Refuse a pod that should run several processes but was started without torchrun.

    The operator counts a non-numeric ``nprocPerNode`` (``auto``, ``cpu``, ``gpu``) as one
    process per pod in ``WORLD_SIZE``, so only a number above 1 is refused.
    """
    nproc = env.get("PET_NPROC_PER_NODE", "1").strip()
    if nproc.isdigit() and int(nproc) > 1:
        raise LaunchEnvError(
            f"Kubeflow PyTorchJob pod with PET_NPROC_PER_NODE={nproc} but no LOCAL_RANK: the "
            f"pod should run {nproc} processes, and RANK={env.get('RANK', '').strip()} is the "
            f"pod's index, not a process rank; start the script with torchrun (it reads the "
            f"PET_* variables: `torchrun train.py`) or `devlayer launch`, or set "
            f"nprocPerNode: 1"
        )


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "RANK" not in env or "WORLD_SIZE" not in env or "LOCAL_RANK" in env:
        return None
    if not any(env.get(m, "").strip() for m in _MARKERS):
        return None
    if env.get("MASTER_ADDR", "").strip() in _LOOPBACK_NAMES:
        return None  # ranks meeting on this pod's loopback: a hand-written one-pod job
    _nproc(env)
    r = EnvReader(env, "pytorchjob", ("PET_RDZV_ID",))
    rank = r.int("rank", "RANK")
    world = r.int("world_size", "WORLD_SIZE")
    r.put("local_rank", 0, _ONE_PER_POD)
    r.put("local_world_size", 1, _ONE_PER_POD)
    r.put("node_rank", rank, "RANK (each pod is a node)")
    r.put("num_nodes", world, "WORLD_SIZE (each pod is a node)")
    for var, fieldname in (("PET_NODE_RANK", "node_rank"), ("PET_NNODES", "num_nodes")):
        raw = env.get(var, "").strip()
        if raw and raw != str(r.values[fieldname]):
            raise LaunchEnvError(
                f"{var}={raw} but {r.sources[fieldname]} gives {r.values[fieldname]}; the "
                f"pod's variables disagree (a stale export?): unset the wrong one"
            )
    r.check_counts()
    addr = r.str("master_addr", "MASTER_ADDR")
    port = read_port(r)
    if world > 1 and (addr is None or port is None):
        raise LaunchEnvError(
            f"Kubeflow PyTorchJob pod RANK={rank} of WORLD_SIZE={world} without "
            f"{'MASTER_ADDR' if addr is None else 'MASTER_PORT'}; the operator sets both "
            f"(is the master replica defined?): export MASTER_ADDR and MASTER_PORT"
        )
    if addr is None:
        r.sources["master_addr"] = "single pod: loopback"
    return r.info(master_addr=addr or "127.0.0.1", master_port=port)


PYTORCHJOB = Launcher(
    "pytorchjob",
    detect=_detect,
    aliases=("kubeflow",),
    variables=("KUBERNETES_SERVICE_HOST",),
)
