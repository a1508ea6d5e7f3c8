"""Ray Train's worker environment, read by :func:`devlayer.launchers.detect` (pure, plain dicts).

The variables are what Ray 2.60's ``TorchTrainer`` exported in a worker here (printed by a
real run; ``ray/train/torch/config.py`` sets them); tests/ray runs Ray itself.
"""

from __future__ import annotations

import pytest

from devlayer.errors import LaunchEnvError
from devlayer.launchers import detect


def _ray(rank: int, world: int, local: int, local_world: int, node: int) -> dict[str, str]:
    """A Ray Train worker's environment as Ray 2.60 sets it (init_method='env', the default)."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": str(local_world),
        "NODE_RANK": str(node),
        "MASTER_ADDR": "192.0.2.2",
        "MASTER_PORT": "43579",
        "ACCELERATE_TORCH_DEVICE": "cpu",
        "RAY_JOB_ID": "01000000",
        "RAY_RAYLET_PID": "31560",
        "RAY_CLIENT_MODE": "0",
    }


#: What the srun step that started the Ray cluster leaves in every worker (Ray's SLURM guide:
#: ``srun --nodes=1 --ntasks=1 ray start --head --block``).
SRUN_STEP = {
    "SLURM_JOB_ID": "42",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "1",
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NNODES": "1",
    "SLURM_STEP_NODELIST": "node01",
    "SLURM_STEP_TASKS_PER_NODE": "1",
}

MPIRUN_PROCESS = {
    "OMPI_COMM_WORLD_RANK": "0",
    "OMPI_COMM_WORLD_SIZE": "1",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
}


def test_y25_1_a_ray_train_worker_is_read_as_ray_with_every_value_from_rays_variables():
    """Y25-1: the environment Ray Train gives rank 1 of 2 on one node is launcher 'ray', rank 1
    of 2, local rank 1 of 2, node 0 of 1, Ray's store address, job id RAY_JOB_ID; each source
    names the variable Ray set (the node count: the derivation, as Ray exports none)."""
    info = detect(_ray(1, 2, 1, 2, 0))
    assert (info.launcher, info.rank, info.world_size) == ("ray", 1, 2)
    assert (info.local_rank, info.local_world_size, info.node_rank, info.num_nodes) == (1, 2, 0, 1)
    assert (info.master_addr, info.master_port) == ("192.0.2.2", 43579)
    assert info.job_id == "RAY_JOB_ID=01000000"
    assert info.sources["rank"] == "RANK" and info.sources["local_rank"] == "LOCAL_RANK"
    assert info.sources["node_rank"] == "NODE_RANK"
    assert info.sources["num_nodes"].startswith("derived: WORLD_SIZE / LOCAL_WORLD_SIZE")


@pytest.mark.parametrize("outer", [SRUN_STEP, MPIRUN_PROCESS], ids=["srun-step", "mpirun"])
def test_y25_2_ray_started_by_srun_or_mpirun_uses_rays_ranks_not_the_outer_launchers(outer):
    """Y25-2: a Ray cluster started by ``srun ... ray start`` or under mpirun leaves that
    step's rank 0 of 1 in every worker; rank 1 of Ray's 2 is still rank 1 of 2 (it was a
    'conflicting launcher variables' error, so devlayer.init() failed in Ray's workers)."""
    info = detect({**outer, **_ray(1, 2, 1, 2, 0)})
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("ray", 1, 2, 1)


@pytest.mark.parametrize(
    ("layout", "nodes"),
    [
        # (rank, world, local rank, local world, node rank) of every worker of one job
        ([(0, 4, 0, 3, 0), (1, 4, 1, 3, 0), (2, 4, 2, 3, 0), (3, 4, 0, 1, 1)], 2),
        ([(r, 4, r % 2, 2, r // 2) for r in range(4)], 2),
        ([(r, 6, 0, 1, r) for r in range(6)], 6),
        ([(r, 2, r, 2, 0) for r in range(2)], 1),
    ],
    ids=["3+1", "2+2", "1x6", "one-node"],
)
def test_y25_3_every_worker_derives_the_same_node_count_also_for_unequal_nodes(layout, nodes):
    """Y25-3: Ray exports no node count; every worker of a job derives the same one, also
    when nodes run unequal numbers of workers (3+1: WORLD_SIZE/LOCAL_WORLD_SIZE alone gave
    the last node 4 nodes while the first said 2)."""
    found = {detect(_ray(*worker)).num_nodes for worker in layout}
    assert found == {nodes}


def test_y25_3_a_node_count_the_layout_leaves_open_is_marked_as_an_estimate():
    """Y25-3: 1+3 workers: rank 0 (alone on node 0) cannot tell whether the 3 others share one
    node or three; its num_nodes source says "estimated" with the bounds (2 to 4), while the
    workers of the last node, for which the layout is exact, say "derived"."""
    first = detect(_ray(0, 4, 0, 1, 0))
    assert first.sources["num_nodes"].startswith("estimated:"), first.sources
    assert "2 to 4 nodes" in first.sources["num_nodes"]
    last = detect(_ray(3, 4, 2, 3, 1))
    assert (last.num_nodes, last.sources["num_nodes"][:8]) == (2, "derived:")


def test_y25_4_a_ray_worker_without_the_store_variables_is_an_error_naming_the_fix():
    """Y25-4: TorchConfig(init_method='tcp') exports no MASTER_ADDR/MASTER_PORT: an error
    that names them and the default init_method, not a guess or a single process."""
    env = _ray(0, 2, 0, 2, 0)
    del env["MASTER_ADDR"], env["MASTER_PORT"]
    with pytest.raises(LaunchEnvError, match=r"without MASTER_ADDR, MASTER_PORT.*'env'"):
        detect(env)


def test_a_ray_process_without_rank_is_not_a_ray_train_worker():
    """A plain Ray task or actor (Ray's variables, no RANK) is one process."""
    env = {"RAY_JOB_ID": "01000000", "RAY_RAYLET_PID": "31560"}
    assert detect(env).launcher == "none"


def test_torchrun_started_inside_a_ray_worker_is_torchrun():
    """torchrun's own markers win over the Ray worker's variables its children inherit."""
    env = {**_ray(0, 2, 0, 2, 0), "TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4"}
    env.update(LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1", GROUP_WORLD_SIZE="2")
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size) == ("torchrun", 3, 4)


def test_a_hand_set_world_inside_a_ray_actor_is_still_read_as_env():
    """RANK, WORLD_SIZE and MASTER_PORT set by hand in a Ray actor (not Ray Train's full set:
    no NODE_RANK, LOCAL_WORLD_SIZE) are the env launcher's, as without Ray, not an error."""
    env = {"RAY_JOB_ID": "01000000", "RAY_RAYLET_PID": "31560"}
    env.update(RANK="1", WORLD_SIZE="2", MASTER_PORT="29511")
    info = detect(env)
    assert (info.launcher, info.rank, info.world_size) == ("env", 1, 2)
