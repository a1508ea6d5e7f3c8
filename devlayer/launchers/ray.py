"""Ray Train's workers (``ray.train.torch.TorchTrainer``): torchrun's names, set by Ray.

Ray Train creates the process group before the train loop runs (``init_process_group`` with
``env://``) and exports, in every worker (``ray/train/torch/config.py``,
``_set_torch_distributed_env_vars`` and ``_TorchBackend.on_start``): ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Every Ray worker process also has ``RAY_RAYLET_PID`` and ``RAY_JOB_ID``
(Ray's internal flags): with all five of the layout variables they mark a Ray Train
worker; a ``RANK`` set by hand in a Ray actor is left to the ``env`` launcher.

Ray comes before the MPI launchers and SLURM in the precedence list: a Ray cluster started
with ``srun ... ray start`` (Ray's SLURM guide) or under ``mpirun`` leaves that step's
``SLURM_PROCID=0`` or ``OMPI_COMM_WORLD_RANK=0`` in every worker, which is not the worker's
rank. Ray exports no node count: ``num_nodes`` is derived from ``WORLD_SIZE`` and
``LOCAL_WORLD_SIZE`` within the bounds ``RANK``, ``LOCAL_RANK`` and ``NODE_RANK`` set, and
its source says "estimated" where they leave a choice (:func:`_nodes`).

Example:
    >>> info = RAY.detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
    ...                    "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.5",
    ...                    "MASTER_PORT": "43579", "RAY_RAYLET_PID": "31560",
    ...                    "RAY_JOB_ID": "01000000"})
    >>> (info.launcher, info.rank, info.local_rank, info.node_rank, info.num_nodes, info.job_id)
    ('ray', 3, 1, 1, 2, 'RAY_JOB_ID=01000000')
"""

from __future__ import annotations

from collections.abc import Mapping

from devlayer.errors import LaunchEnvError
from devlayer.launchers.base import EnvReader, Launcher, ProcessInfo, num_nodes, read_port

__all__ = ["RAY"]

#: Set by Ray in every worker process it starts (``ray_constants.RAY_INTERNAL_FLAGS``).
_MARKERS = ("RAY_RAYLET_PID", "RAY_JOB_ID")
_LAYOUT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK")
_NODES_RULE = "WORLD_SIZE / LOCAL_WORLD_SIZE, NODE_RANK (Ray exports no node count)"


def _detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if not any(m in env for m in _MARKERS) or not all(v in env for v in _LAYOUT):
        return None  # a plain Ray task, or a RANK set by hand in it: not Ray Train's set
    _require(env, ("MASTER_ADDR", "MASTER_PORT"))
    r = EnvReader(env, "ray", ("RAY_JOB_ID",))
    r.int("rank", "RANK")
    r.int("world_size", "WORLD_SIZE")
    r.int("local_rank", "LOCAL_RANK")
    r.int("local_world_size", "LOCAL_WORLD_SIZE")
    r.int("node_rank", "NODE_RANK")
    r.put("num_nodes", *_nodes(r.values))
    r.check_counts()
    addr = r.str("master_addr", "MASTER_ADDR")
    return r.info(master_addr=addr, master_port=read_port(r))


def _nodes(v: Mapping[str, int]) -> tuple[int, str]:
    """The node count, which Ray does not export, and its source, from this worker's layout.

    Ray numbers workers node by node (``WorkerGroup``: ranks grouped by node, ``NODE_RANK``
    in order of first appearance), so ``RANK - LOCAL_RANK`` workers run on the nodes before
    this one and the rest on the nodes after it: at least one more node when any remain, at
    most one per remaining worker. ``WORLD_SIZE / LOCAL_WORLD_SIZE`` (rounded up) is taken
    within those bounds: exact for equal nodes and for a last node that runs fewer workers;
    where the bounds leave a choice, the source says it is an estimate.

    Example:
        >>> _nodes({"rank": 3, "world_size": 4, "local_rank": 0, "local_world_size": 1,
        ...         "node_rank": 1})
        (2, 'derived: WORLD_SIZE / LOCAL_WORLD_SIZE, NODE_RANK (Ray exports no node count)')
    """
    after = max(v["world_size"] - (v["rank"] - v["local_rank"]) - v["local_world_size"], 0)
    low = v["node_rank"] + 1 + min(after, 1)
    high = v["node_rank"] + 1 + after
    nodes = min(max(num_nodes(v["world_size"], v["local_world_size"]), low), high)
    if low == high:
        return nodes, f"derived: {_NODES_RULE}"
    return nodes, (
        f"estimated: {_NODES_RULE}; {after} worker(s) on later nodes, so {low} to {high} "
        f"nodes: exact when every node runs LOCAL_WORLD_SIZE workers"
    )


def _require(env: Mapping[str, str], names: tuple[str, ...]) -> None:
    """Every variable Ray Train exports must be there; name the missing ones and the fix."""
    missing = [name for name in names if not env.get(name, "").strip()]
    if missing:
        raise LaunchEnvError(
            f"Ray Train worker (RAY_RAYLET_PID/RAY_JOB_ID and {', '.join(_LAYOUT)} set) "
            f"without {', '.join(missing)}: Ray Train's TorchTrainer exports them with its "
            f"default TorchConfig(init_method='env'); use that (init_method='tcp' exports no "
            f"MASTER_ADDR/MASTER_PORT), or export them yourself in the train loop"
        )


RAY = Launcher(
    "ray",
    detect=_detect,
    aliases=("ray-train",),
    variables=_MARKERS,
    job_id_vars=("RAY_JOB_ID",),
)
