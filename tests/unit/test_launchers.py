"""Launcher detection as a pure function of an environment mapping.

Every case is a plain dict: no processes, no ``os.environ``. The big table pins the
launcher that wins and the nine values it yields; the tests after it pin provenance
(``sources``), notes, errors (which must name the variable and the value), the port rule
for SLURM and the node-list / tasks-per-node expansion.
"""

from __future__ import annotations

import dataclasses
import doctest
import os
import types

import pytest

import devlayer.launchers
import devlayer.launchers.mpich
from devlayer.errors import DevlayerError, LaunchEnvError
from devlayer.launchers import (
    LAUNCHERS,
    ProcessInfo,
    detect,
    expand_nodelist,
    expand_tasks_per_node,
)
from devlayer.testing import intelmpi_env, openmpi_env, slurm_env, torchrun_env

LO = "127.0.0.1"
FIELDS = (
    "launcher",
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "node_rank",
    "num_nodes",
    "master_addr",
    "master_port",
)

# Derived ports: 15000 + (job % 1250) * 16 + step % 16, where an MPI launcher's job-id text
# gives its last two numbers as job and step (one number: the job). Literal values, computed
# once by hand, so a change of the rule shows up here.
PORT_OMPI_JOB = 29896  # OMPI_MCA_ess_base_jobid=3735879681 (openmpi_env): 931 * 16
PORT_IMPI_JOB = 27432  # I_MPI_JOB_ID=777 (intelmpi_env)
PORT_PRTE_NS = 15016  # PMIX_NAMESPACE=prterun-x@1
PORT_MPIRUN_ID = 17400  # MPIRUN_ID=5150: 150 * 16
PORT_PALS_APID = 16968  # PALS_APID=abc-123
PORT_PBS_JOB = 16968  # PBS_JOBID=123.aurora-pbs
# SLURM: SLURM_JOB_ID and SLURM_STEP_ID; slurm_env uses job 4242 (492 * 16), step 0.
PORT_SLURM_4242 = 22872

ACCELERATE = {
    "ACCELERATE_MIXED_PRECISION": "bf16",
    "ACCELERATE_DYNAMO_BACKEND": "NO",
    "ACCELERATE_USE_CPU": "False",
}


def _with(base: dict[str, str], **changes: str | None) -> dict[str, str]:
    """A copy of ``base`` with variables set (``None`` removes one)."""
    env = dict(base)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _slurm_batch(**changes: str | None) -> dict[str, str]:
    """The sbatch batch shell of an 8-task, 2-node job."""
    return _with(slurm_env(0, 8, nodelist="gpu-node[07-08]", batch=True), **changes)


# salloc with use_interactive_step: the shell itself runs as step 0xfffffffa (real dump).
SALLOC_INTERACTIVE = {
    "SLURM_JOB_ID": "1731344",
    "SLURM_JOBID": "1731344",
    "SLURM_STEP_ID": "4294967290",
    "SLURM_STEPID": "4294967290",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_STEP_NUM_TASKS": "1",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_TASKS_PER_NODE": "1",
    "SLURM_STEP_NODELIST": "GPU71E4",
    "SLURM_TASKS_PER_NODE": "8",
    "SLURM_JOB_NODELIST": "GPU71E4",
    "SLURM_SRUN_COMM_PORT": "37845",
    "SLURM_STEP_LAUNCHER_PORT": "37845",
}

# srun --mpi=pmi2 sets these four in each task (Slurm's mpi/pmi2 plugin).
SRUN_PMI2 = {"PMI_FD": "7", "PMI_JOBID": "4242.0"}
# srun --mpi=pmix (Slurm's mpi/pmix plugin): a rank, a namespace, no sizes or local ranks.
SRUN_PMIX = {
    "PMIX_NAMESPACE": "slurm.pmix.4242.0",
    "PMIX_SERVER_URI41": "pmix-server.35133;tcp4://127.0.0.1:43189",
    "PMIX_VERSION": "5.0.3",
    "SLURM_MPI_TYPE": "pmix",
}

MVAPICH = {
    "MV2_COMM_WORLD_RANK": "3",
    "MV2_COMM_WORLD_SIZE": "4",
    "MV2_COMM_WORLD_LOCAL_RANK": "3",
    "MV2_COMM_WORLD_LOCAL_SIZE": "4",
    "MPIRUN_ID": "5150",
}

# (env, expected launcher, rank, world_size, local_rank, local_world_size, node_rank,
#  num_nodes, master_addr, master_port)
CASES = [
    # ---------------------------------------------------------------- torchrun / accelerate
    pytest.param(
        torchrun_env(0, 4), ("torchrun", 0, 4, 0, 4, 0, 1, LO, 29500), id="torchrun-1node-rank0"
    ),
    pytest.param(
        torchrun_env(3, 4, master_port=29511),
        ("torchrun", 3, 4, 3, 4, 0, 1, LO, 29511),
        id="torchrun-1node-last-rank",
    ),
    pytest.param(
        torchrun_env(5, 8, local_world_size=4, master_addr="10.1.0.7", master_port=29400),
        ("torchrun", 5, 8, 1, 4, 1, 2, "10.1.0.7", 29400),
        id="torchrun-2nodes-group-rank-1",
    ),
    pytest.param(
        torchrun_env(15, 16, local_world_size=4, master_addr="node01"),
        ("torchrun", 15, 16, 3, 4, 3, 4, "node01", 29500),
        id="torchrun-4nodes-last-rank",
    ),
    pytest.param(
        torchrun_env(1, 2, restart_count=3),
        ("torchrun", 1, 2, 1, 2, 0, 1, LO, 29500),
        id="torchrun-after-restarts",
    ),
    pytest.param(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "TORCHELASTIC_RUN_ID": "job-17",
            "MASTER_ADDR": "trainer-0",
            "MASTER_PORT": "1234",
        },
        ("torchrun", 1, 2, 1, 2, 0, 1, "trainer-0", 1234),
        id="torchrun-minimal-no-local-world-size",
    ),
    pytest.param(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "1",
            "MASTER_ADDR": "a0",
            "MASTER_PORT": "29500",
        },
        ("torchrun", 3, 4, 1, 2, 1, 2, "a0", 29500),
        id="torchrun-group-rank-marker-only",
    ),
    pytest.param(
        _with(torchrun_env(1, 2), MASTER_ADDR=None),
        ("torchrun", 1, 2, 1, 2, 0, 1, LO, 29500),
        id="torchrun-no-master-addr-loopback",
    ),
    pytest.param(
        {**torchrun_env(1, 2), **ACCELERATE},
        ("accelerate", 1, 2, 1, 2, 0, 1, LO, 29500),
        id="accelerate-1node",
    ),
    pytest.param(
        {**torchrun_env(6, 8, local_world_size=4, master_addr="10.0.0.2"), **ACCELERATE},
        ("accelerate", 6, 8, 2, 4, 1, 2, "10.0.0.2", 29500),
        id="accelerate-2nodes",
    ),
    pytest.param(
        {
            **slurm_env(1, 2, nodelist="gpu-node[07-08]"),
            **torchrun_env(5, 8, local_world_size=4, master_addr="gpu-node07"),
        },
        ("torchrun", 5, 8, 1, 4, 1, 2, "gpu-node07", 29500),
        id="torchrun-inside-srun-torchrun-wins",
    ),
    # ---------------------------------------------------------------- hand-set env://
    pytest.param(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"},
        ("env", 1, 2, 1, 2, 0, 1, LO, 29511),
        id="env-minimal",
    ),
    pytest.param(
        {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "localhost", "MASTER_PORT": "12355"},
        ("env", 0, 4, 0, 4, 0, 1, "localhost", 12355),
        id="env-without-local-rank",
    ),
    pytest.param(
        {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "MASTER_PORT": "29500"},
        ("env", 2, 4, 2, 4, 0, 1, LO, 29500),
        id="env-with-local-rank",
    ),
    pytest.param(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "NODE_RANK": "1",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        },
        ("env", 5, 8, 1, 4, 1, 2, "10.0.0.1", 29500),
        id="env-2nodes-node-rank",
    ),
    pytest.param(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500",
        },
        ("env", 5, 8, 1, 4, 1, 2, "10.0.0.1", 29500),
        id="env-2nodes-node-rank-derived",
    ),
    pytest.param(
        {
            "RANK": "4",
            "WORLD_SIZE": "6",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "2",
            "NODE_RANK": "1",
            "MASTER_ADDR": "n0",
            "MASTER_PORT": "29500",
        },
        ("env", 4, 6, 0, 2, 1, 3, "n0", 29500),
        id="env-uneven-last-node",
    ),
    pytest.param(
        {"RANK": "0", "WORLD_SIZE": "1"},
        ("env", 0, 1, 0, 1, 0, 1, LO, None),
        id="env-world-1-needs-no-port",
    ),
    pytest.param(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "3",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": LO,
            "MASTER_PORT": "41234",
        },
        ("env", 3, 4, 3, 4, 0, 1, LO, 41234),
        id="env-devlayer-spawn-child",
    ),
    # ---------------------------------------------------------------- SLURM srun
    pytest.param(
        slurm_env(0, 4, nodelist="gpu-node07"),
        ("slurm", 0, 4, 0, 4, 0, 1, LO, PORT_SLURM_4242),
        id="slurm-1node-rank0",
    ),
    pytest.param(
        slurm_env(3, 4, nodelist="gpu-node07"),
        ("slurm", 3, 4, 3, 4, 0, 1, LO, PORT_SLURM_4242),
        id="slurm-1node-rank3",
    ),
    pytest.param(
        slurm_env(5, 8, nodelist="gpu-node[07-08]"),
        ("slurm", 5, 8, 1, 4, 1, 2, "gpu-node07", PORT_SLURM_4242),
        id="slurm-2nodes-4x2",
    ),
    pytest.param(
        slurm_env(3, 7, tasks_per_node="2(x3),1", nodelist="gpu-node[07-09,12]"),
        ("slurm", 3, 7, 1, 2, 1, 4, "gpu-node07", PORT_SLURM_4242),
        id="slurm-2(x3),1-middle-node",
    ),
    pytest.param(
        slurm_env(6, 7, tasks_per_node="2(x3),1", nodelist="gpu-node[07-09,12]"),
        ("slurm", 6, 7, 0, 1, 3, 4, "gpu-node07", PORT_SLURM_4242),
        id="slurm-2(x3),1-last-node-one-task",
    ),
    pytest.param(
        slurm_env(3, 6, tasks_per_node="4,2", nodelist="n[1-2]"),
        ("slurm", 3, 6, 3, 4, 0, 2, "n1", PORT_SLURM_4242),
        id="slurm-heterogeneous-4,2-first-node",
    ),
    pytest.param(
        slurm_env(5, 6, tasks_per_node="4,2", nodelist="n[1-2]"),
        ("slurm", 5, 6, 1, 2, 1, 2, "n1", PORT_SLURM_4242),
        id="slurm-heterogeneous-4,2-second-node",
    ),
    pytest.param(
        slurm_env(7, 8, nodelist="rack[1-2]-node[01-02]"),
        ("slurm", 7, 8, 1, 2, 3, 4, "rack1-node01", PORT_SLURM_4242),
        id="slurm-two-bracket-groups",
    ),
    pytest.param(
        slurm_env(2, 3, nodelist="alpha,beta,gamma"),
        ("slurm", 2, 3, 0, 1, 2, 3, "alpha", PORT_SLURM_4242),
        id="slurm-comma-separated-nodes",
    ),
    pytest.param(
        slurm_env(1, 4, nodelist="gpu[001-004]"),
        ("slurm", 1, 4, 0, 1, 1, 4, "gpu001", PORT_SLURM_4242),
        id="slurm-zero-padded-nodes",
    ),
    pytest.param(
        {
            **slurm_env(5, 8, nodelist="gpu-node[07-08]"),
            "MASTER_ADDR": "10.9.9.9",
            "MASTER_PORT": "23456",
        },
        ("slurm", 5, 8, 1, 4, 1, 2, "10.9.9.9", 23456),
        id="slurm-explicit-master-addr-port",
    ),
    pytest.param(
        slurm_env(0, 2, nodelist="n1", job_id=123456, step_id=3),
        ("slurm", 0, 2, 0, 2, 0, 1, LO, 30299),
        id="slurm-port-from-job-and-step",
    ),
    pytest.param(
        slurm_env(1, 2, nodelist="n1", job_id=987654321),
        ("slurm", 1, 2, 1, 2, 0, 1, LO, 24136),
        id="slurm-port-large-job-id",
    ),
    pytest.param(
        {
            "SLURM_JOB_ID": "77",
            "SLURM_STEPID": "0",
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "0",
            "SLURM_TASKS_PER_NODE": "2",
            "SLURM_NODELIST": "c1",
        },
        ("slurm", 1, 2, 1, 2, 0, 1, LO, 16232),
        id="slurm-old-style-variables",
    ),
    pytest.param(
        slurm_env(0, 1, nodelist="n1"),
        ("slurm", 0, 1, 0, 1, 0, 1, LO, None),
        id="slurm-one-task",
    ),
    pytest.param(
        {
            **slurm_env(5, 8, nodelist="gpu-node[07-08]"),
            **SRUN_PMI2,
            "PMI_RANK": "5",
            "PMI_SIZE": "8",
        },
        ("slurm", 5, 8, 1, 4, 1, 2, "gpu-node07", PORT_SLURM_4242),
        id="srun-mpi-pmi2-2nodes",
    ),
    pytest.param(
        {**slurm_env(1, 2, nodelist="n1"), **SRUN_PMI2, "PMI_RANK": "1", "PMI_SIZE": "2"},
        ("slurm", 1, 2, 1, 2, 0, 1, LO, PORT_SLURM_4242),
        id="srun-mpi-pmi2-1node",
    ),
    pytest.param(
        {**slurm_env(6, 8, nodelist="gpu-node[07-08]"), **SRUN_PMIX, "PMIX_RANK": "6"},
        ("slurm", 6, 8, 2, 4, 1, 2, "gpu-node07", PORT_SLURM_4242),
        id="srun-mpi-pmix-2nodes",
    ),
    pytest.param(
        {**slurm_env(5, 8, nodelist="gpu-node[07-08]"), "RANK": "5", "WORLD_SIZE": "8"},
        ("slurm", 5, 8, 1, 4, 1, 2, "gpu-node07", PORT_SLURM_4242),
        id="srun-hand-set-rank-agrees-no-local-rank",
    ),
    pytest.param(
        {
            **slurm_env(5, 8, nodelist="gpu-node[07-08]"),
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
        },
        ("slurm", 5, 8, 1, 4, 1, 2, "gpu-node07", PORT_SLURM_4242),
        id="srun-hand-set-rank-and-local-rank-agree",
    ),
    # ---------------------------------------------------------------- sbatch / salloc shells
    pytest.param(_slurm_batch(), ("none", 0, 1, 0, 1, 0, 1, LO, None), id="sbatch-shell"),
    pytest.param(
        _slurm_batch(SLURM_STEP_ID="batch"),
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="sbatch-shell-step-id-batch",
    ),
    pytest.param(
        _slurm_batch(SLURM_STEP_ID="4294967291", SLURM_STEPID="4294967291"),
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="sbatch-shell-numeric-batch-step",
    ),
    pytest.param(
        _slurm_batch(SLURM_STEP_ID="4294967294"),
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="sbatch-shell-old-numeric-batch-step",
    ),
    pytest.param(
        {**slurm_env(0, 1, nodelist="n1"), "SLURM_STEP_ID": "4294967292"},
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="slurm-extern-step",
    ),
    pytest.param(
        SALLOC_INTERACTIVE, ("none", 0, 1, 0, 1, 0, 1, LO, None), id="salloc-interactive-step"
    ),
    # ---------------------------------------------------------------- MPI families
    pytest.param(
        openmpi_env(1, 4), ("openmpi", 1, 4, 1, 4, 0, 1, LO, PORT_OMPI_JOB), id="openmpi-1node"
    ),
    pytest.param(
        {**openmpi_env(6, 8, local_size=4), "MASTER_ADDR": "node01", "MASTER_PORT": "29500"},
        ("openmpi", 6, 8, 2, 4, 1, 2, "node01", 29500),
        id="openmpi-2nodes",
    ),
    pytest.param(
        {**openmpi_env(6, 8, local_size=4), "MASTER_ADDR": "node01"},
        ("openmpi", 6, 8, 2, 4, 1, 2, "node01", PORT_OMPI_JOB),
        id="openmpi-2nodes-port-from-job-id",
    ),
    pytest.param(openmpi_env(0, 1), ("openmpi", 0, 1, 0, 1, 0, 1, LO, None), id="openmpi-one-rank"),
    pytest.param(
        {
            **slurm_env(1, 2, nodelist="n[1-2]"),
            **openmpi_env(5, 8, local_size=4),
            "MASTER_ADDR": "n1",
        },
        ("openmpi", 5, 8, 1, 4, 1, 2, "n1", PORT_OMPI_JOB),
        id="mpirun-under-slurm-mpi-wins",
    ),
    pytest.param(
        intelmpi_env(2, 4), ("mpich", 2, 4, 2, 4, 0, 1, LO, PORT_IMPI_JOB), id="intelmpi-1node"
    ),
    pytest.param(
        {**intelmpi_env(5, 8, local_size=4), "MASTER_ADDR": "c001", "MASTER_PORT": "29700"},
        ("mpich", 5, 8, 1, 4, 1, 2, "c001", 29700),
        id="intelmpi-2nodes",
    ),
    pytest.param(
        {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
        ("mpich", 1, 2, 1, 2, 0, 1, LO, 29500),
        id="mpich-hydra-default-port",
    ),
    pytest.param(
        {
            **slurm_env(0, 2, nodelist="n[1-2]"),
            **intelmpi_env(3, 8, local_size=4),
            "MASTER_ADDR": "n1",
        },
        ("mpich", 3, 8, 3, 4, 0, 2, "n1", PORT_IMPI_JOB),
        id="mpiexec-hydra-under-slurm-mpi-wins",
    ),
    pytest.param(
        {
            "PMIX_RANK": "1",
            "PMIX_SIZE": "4",
            "PMIX_LOCAL_RANK": "1",
            "PMIX_LOCAL_SIZE": "4",
            "PMIX_NAMESPACE": "prterun-x@1",
        },
        ("pmix", 1, 4, 1, 4, 0, 1, LO, PORT_PRTE_NS),
        id="pmix-1node",
    ),
    pytest.param(
        {"PMIX_RANK": "0", "PMIX_SIZE": "2", "MASTER_PORT": "29600", "LOCAL_WORLD_SIZE": "2"},
        ("pmix", 0, 2, 0, 2, 0, 1, LO, 29600),
        id="pmix-no-local-ranks-local-world-size-exported",
    ),
    pytest.param(MVAPICH, ("mvapich", 3, 4, 3, 4, 0, 1, LO, PORT_MPIRUN_ID), id="mvapich-1node"),
    pytest.param(
        {
            **MVAPICH,
            "MV2_COMM_WORLD_RANK": "6",
            "MV2_COMM_WORLD_SIZE": "8",
            "MV2_COMM_WORLD_LOCAL_RANK": "2",
            "MASTER_ADDR": "ib-node1",
        },
        ("mvapich", 6, 8, 2, 4, 1, 2, "ib-node1", PORT_MPIRUN_ID),
        id="mvapich-2nodes",
    ),
    pytest.param(
        {
            "PALS_RANKID": "2",
            "PALS_LOCAL_RANKID": "2",
            "PALS_NODEID": "0",
            "PMI_RANK": "2",
            "PMI_SIZE": "4",
            "PMI_LOCAL_SIZE": "4",
            "PALS_APID": "abc-123",
        },
        ("pals", 2, 4, 2, 4, 0, 1, LO, PORT_PALS_APID),
        id="pals-1node-pmi-size",
    ),
    pytest.param(
        {
            "PALS_RANKID": "13",
            "PALS_LOCAL_RANKID": "1",
            "PALS_NODEID": "1",
            "PALS_LOCAL_SIZE": "12",
            "PMI_SIZE": "24",
            "MASTER_ADDR": "x1000c0s0b0n0",
            "PBS_JOBID": "123.aurora-pbs",
        },
        ("pals", 13, 24, 1, 12, 1, 2, "x1000c0s0b0n0", PORT_PBS_JOB),
        id="pals-2nodes",
    ),
    # ---------------------------------------------------------------- single process
    pytest.param({}, ("none", 0, 1, 0, 1, 0, 1, LO, None), id="empty-env"),
    pytest.param(
        {"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "8"},
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="unrelated-variables",
    ),
    # ---------------------------------------------------------------- forcing / disabling
    pytest.param(
        {**torchrun_env(1, 2), "DEVLAYER_LAUNCHER": "none"},
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="force-none-over-torchrun",
    ),
    pytest.param(
        {
            **slurm_env(0, 2, nodelist="n1"),
            "RANK": "1",
            "WORLD_SIZE": "2",
            "MASTER_PORT": "29555",
            "DEVLAYER_LAUNCHER": "env",
        },
        ("env", 1, 2, 1, 2, 0, 1, LO, 29555),
        id="force-env-over-conflicting-slurm",
    ),
    pytest.param(
        {
            **slurm_env(1, 2, nodelist="gpu-node[07-08]"),
            **torchrun_env(5, 8, local_world_size=4, master_addr="gpu-node07"),
            "DEVLAYER_LAUNCHER": "SLURM",
        },
        ("slurm", 1, 2, 0, 1, 1, 2, "gpu-node07", 29500),
        id="force-slurm-inside-torchrun",
    ),
    pytest.param(
        {**intelmpi_env(1, 2), "DEVLAYER_LAUNCHER": "intelmpi"},
        ("mpich", 1, 2, 1, 2, 0, 1, LO, PORT_IMPI_JOB),
        id="force-alias-intelmpi",
    ),
    pytest.param(
        {**torchrun_env(1, 2), **ACCELERATE, "DEVLAYER_LAUNCHER": "accelerate"},
        ("accelerate", 1, 2, 1, 2, 0, 1, LO, 29500),
        id="force-alias-accelerate",
    ),
    pytest.param(
        {
            **slurm_env(1, 2, nodelist="gpu-node[07-08]"),
            **torchrun_env(5, 8, local_world_size=4, master_addr="gpu-node07"),
            "DEVLAYER_DISABLE_LAUNCHERS": "torchrun, env",
        },
        ("slurm", 1, 2, 0, 1, 1, 2, "gpu-node07", 29500),
        id="disable-torchrun-and-env",
    ),
    pytest.param(
        {**slurm_env(5, 8, nodelist="gpu-node[07-08]"), "DEVLAYER_DISABLE_LAUNCHERS": "srun"},
        ("none", 0, 1, 0, 1, 0, 1, LO, None),
        id="disable-slurm-by-alias",
    ),
]


def _values(info: ProcessInfo) -> tuple[object, ...]:
    return tuple(getattr(info, f) for f in FIELDS)


@pytest.mark.parametrize(("env", "expected"), CASES)
def test_detect_table(env: dict[str, str], expected: tuple[object, ...]) -> None:
    before = dict(env)
    info = detect(types.MappingProxyType(env))  # any read-only Mapping will do
    assert _values(info) == expected
    assert env == before  # never modified
    assert info.is_distributed == (info.world_size > 1)


def test_table_is_large_and_ids_unique() -> None:
    ids = [p.id for p in CASES]
    assert len(ids) >= 45
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------- restarts, notes


def test_torchrun_restart_count() -> None:
    info = detect(torchrun_env(1, 2, restart_count=3))
    assert info.restart_count == 3
    assert info.sources["restart_count"] == "TORCHELASTIC_RESTART_COUNT"
    assert detect(torchrun_env(1, 2)).restart_count == 0


def test_l27_3_torchrun_records_its_agent_store_and_max_restarts() -> None:
    """L27-3: the torchrun detector records ``TORCHELASTIC_USE_AGENT_STORE`` (true only for
    ``"True"``, torch's own test) and ``TORCHELASTIC_MAX_RESTARTS`` on ProcessInfo, with
    their sources; without them (an older torchrun) both are off; a max_restarts that is no
    integer is refused naming the variable."""
    info = detect(torchrun_env(1, 2, max_restarts=3))
    assert (info.agent_store, info.max_restarts) == (True, 3)
    assert info.sources["agent_store"] == "TORCHELASTIC_USE_AGENT_STORE"
    assert info.sources["max_restarts"] == "TORCHELASTIC_MAX_RESTARTS"
    assert detect(torchrun_env(1, 2, agent_store=False)).agent_store is False
    for odd in ("true", "1", ""):
        env = {**torchrun_env(1, 2), "TORCHELASTIC_USE_AGENT_STORE": odd}
        assert detect(env).agent_store is False, odd
    env = torchrun_env(1, 2)
    del env["TORCHELASTIC_USE_AGENT_STORE"], env["TORCHELASTIC_MAX_RESTARTS"]
    assert (detect(env).agent_store, detect(env).max_restarts) == (False, 0)
    with pytest.raises(LaunchEnvError, match="TORCHELASTIC_MAX_RESTARTS='many'"):
        detect({**torchrun_env(1, 2), "TORCHELASTIC_MAX_RESTARTS": "many"})
    assert detect(slurm_env(0, 2)).agent_store is False


def test_r27_2_torchruns_agent_is_seen_once_by_the_detector() -> None:
    """R27-2: ``ProcessInfo.agent_supervised`` (what turns the survivor watch off) is true
    when torchrun's agent started the process (``TORCHELASTIC_RUN_ID``, which torchrun always
    sets), whatever the store; false under another launcher or without the variable."""
    assert detect(torchrun_env(1, 2)).agent_supervised is True
    assert detect(torchrun_env(1, 2, agent_store=False)).agent_supervised is True
    env = torchrun_env(1, 2)
    del env["TORCHELASTIC_RUN_ID"]
    assert detect(env).agent_supervised is False
    assert detect(slurm_env(0, 2)).agent_supervised is False


@pytest.mark.parametrize(
    "env",
    [
        pytest.param(_slurm_batch(), id="no-step-variables"),
        pytest.param(_slurm_batch(SLURM_STEP_ID="batch"), id="step-id-batch"),
        pytest.param(SALLOC_INTERACTIVE, id="salloc-interactive"),
    ],
)
def test_sbatch_shell_is_one_process_with_note(env: dict[str, str]) -> None:
    info = detect(env)
    assert (info.launcher, info.world_size) == ("none", 1)
    assert len(info.notes) == 1
    assert "sbatch/salloc shell" in info.notes[0]
    assert "srun" in info.notes[0]


def test_sbatch_note_absent_when_slurm_disabled() -> None:
    info = detect(_slurm_batch(), disable=["slurm"])
    assert info.launcher == "none"
    assert info.notes == ()


def test_plain_single_process_has_no_note() -> None:
    info = detect({})
    assert info.notes == ()
    assert info.sources == {"rank": "single process"}


def test_force_none_note() -> None:
    info = detect({**torchrun_env(1, 2), "DEVLAYER_LAUNCHER": "none"})
    assert info.launcher == "none"
    assert info.notes == ("DEVLAYER_LAUNCHER=none: launcher variables ignored",)
    assert detect(torchrun_env(1, 2), force="none").notes == (
        "force=none: launcher variables ignored",
    )


def test_hand_set_agreeing_with_slurm_keeps_slurm_values_and_notes_it() -> None:
    env = {**slurm_env(5, 8, nodelist="gpu-node[07-08]"), "RANK": "5", "WORLD_SIZE": "8"}
    info = detect(env)
    assert info.launcher == "slurm"
    assert info.sources["rank"] == "SLURM_PROCID"
    assert "RANK/WORLD_SIZE agree" in info.notes


def test_srun_pmi2_note_says_srun_started_the_tasks() -> None:
    env = {**slurm_env(5, 8, nodelist="n[1-2]"), **SRUN_PMI2, "PMI_RANK": "5", "PMI_SIZE": "8"}
    info = detect(env)
    assert info.launcher == "slurm"
    assert any(n.startswith("mpich variables without local ranks") for n in info.notes)


def test_mpirun_with_local_ranks_is_not_replaced_by_slurm() -> None:
    # mpirun's daemons are an srun step too, but OMPI gives local ranks: OMPI wins.
    env = {**slurm_env(1, 2, nodelist="n[1-2]"), **openmpi_env(1, 2, local_size=1)}
    env["MASTER_ADDR"] = "n1"
    info = detect(env)
    assert info.launcher == "openmpi"
    assert info.notes == ()


# --------------------------------------------------------------------------- forcing, disabling


def test_force_argument_beats_variable() -> None:
    env = {**torchrun_env(1, 2), "DEVLAYER_LAUNCHER": "none"}
    assert detect(env, force="torchrun").launcher == "torchrun"


def test_empty_devlayer_launcher_means_auto() -> None:
    assert detect({**torchrun_env(1, 2), "DEVLAYER_LAUNCHER": ""}).launcher == "torchrun"


def test_disable_argument_and_variable_combine() -> None:
    env = {
        **slurm_env(1, 2, nodelist="gpu-node[07-08]"),
        **torchrun_env(5, 8, local_world_size=4, master_addr="gpu-node07"),
        "DEVLAYER_DISABLE_LAUNCHERS": "torchrun",
    }
    info = detect(env, disable=["ENV"])
    assert (info.launcher, info.rank, info.world_size) == ("slurm", 1, 2)


def test_disable_accelerate_alias_disables_torchrun() -> None:
    env = {**torchrun_env(1, 2), **ACCELERATE}
    info = detect(env, disable=["accelerate", "env"])
    assert info.launcher == "none"


def test_disable_openmpi_and_pmix_gives_single_process() -> None:
    assert detect(openmpi_env(1, 2), disable=("openmpi", "pmix")).launcher == "none"


def test_unknown_forced_launcher_lists_known_ones() -> None:
    with pytest.raises(LaunchEnvError) as err:
        detect({"DEVLAYER_LAUNCHER": "sge"})
    msg = str(err.value)
    assert "DEVLAYER_LAUNCHER='sge' is not a known launcher" in msg
    assert (
        "known: none, torchrun, ray, pytorchjob, deepspeed, env, azureml, lsf, flux, openmpi, "
        "mvapich, pals, mpich, pmix, slurm, trainjob" in msg
    )


def test_forced_launcher_without_its_variables() -> None:
    with pytest.raises(LaunchEnvError, match=r"DEVLAYER_LAUNCHER='slurm' but the environment"):
        detect({**torchrun_env(1, 2), "DEVLAYER_LAUNCHER": "slurm"})


def test_launchers_precedence_order() -> None:
    assert list(LAUNCHERS) == [
        "torchrun",
        "ray",
        "pytorchjob",
        "deepspeed",
        "env",
        "azureml",
        "lsf",
        "flux",
        "openmpi",
        "mvapich",
        "pals",
        "mpich",
        "pmix",
        "slurm",
        "trainjob",
    ]


# --------------------------------------------------------------------------- provenance


def test_sources_slurm_multi_node() -> None:
    info = detect(slurm_env(5, 8, nodelist="gpu-node[07-08]"))
    assert info.sources["rank"] == "SLURM_PROCID"
    assert info.sources["world_size"] == "SLURM_STEP_NUM_TASKS"
    assert info.sources["local_rank"] == "SLURM_LOCALID"
    assert info.sources["node_rank"] == "SLURM_NODEID"
    assert info.sources["local_world_size"] == "SLURM_STEP_TASKS_PER_NODE[1]"
    assert info.sources["master_addr"] == "first node of SLURM_STEP_NODELIST"
    assert info.sources["master_port"] == "derived from SLURM_JOB_ID=4242, SLURM_STEP_ID=0"


def test_sources_slurm_single_node_and_explicit_port() -> None:
    info = detect({**slurm_env(0, 2, nodelist="n1"), "MASTER_PORT": "23456"})
    assert info.sources["master_addr"] == "single node: loopback"
    assert info.sources["master_port"] == "MASTER_PORT"


def test_sources_slurm_old_style_fallbacks() -> None:
    env = {
        "SLURM_JOBID": "77",
        "SLURM_STEPID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NPROCS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_TASKS_PER_NODE": "2",
    }
    info = detect(env)
    assert (info.rank, info.world_size, info.master_port) == (1, 2, 16232)
    assert info.sources["world_size"] == "SLURM_NPROCS"
    assert info.sources["local_world_size"] == "SLURM_TASKS_PER_NODE[0]"
    assert info.sources["master_port"] == "derived from SLURM_JOB_ID=77, SLURM_STEP_ID=0"


def test_sources_torchrun() -> None:
    info = detect(torchrun_env(5, 8, local_world_size=4))
    assert info.sources["rank"] == "RANK"
    assert info.sources["node_rank"] == "GROUP_RANK"
    assert info.sources["num_nodes"] == "GROUP_WORLD_SIZE"
    assert info.sources["master_port"] == "MASTER_PORT"


def test_sources_env_single_node_from_loopback() -> None:
    info = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29500"})
    loopback = "MASTER_ADDR unset (loopback): every rank on this host"
    assert info.sources["local_rank"] == loopback
    assert info.sources["local_world_size"] == loopback
    assert info.sources["master_addr"] == "single node: loopback"


def test_sources_mpi() -> None:
    info = detect(openmpi_env(1, 4))
    assert info.sources["rank"] == "OMPI_COMM_WORLD_RANK"
    assert info.sources["local_world_size"] == "OMPI_COMM_WORLD_LOCAL_SIZE"
    assert info.sources["node_rank"] == "rank // local_world_size"
    assert info.sources["master_port"] == "derived from OMPI_MCA_ess_base_jobid=3735879681"
    plain = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    assert plain.sources["master_port"] == "default"
    pals = detect({"PALS_RANKID": "0", "PALS_NODEID": "0", "PMI_SIZE": "1"})
    assert pals.sources["world_size"] == "PMI_SIZE"
    assert pals.sources["node_rank"] == "PALS_NODEID"


def test_sources_not_part_of_equality() -> None:
    a = ProcessInfo(rank=1, world_size=2, sources={"rank": "RANK"}, notes=("x",))
    b = ProcessInfo(rank=1, world_size=2, sources={"rank": "SLURM_PROCID"})
    assert a == b


# --------------------------------------------------------------------------- SLURM port rule


def test_slurm_port_same_for_every_rank_of_a_step() -> None:
    ports = {
        detect(slurm_env(r, 8, nodelist="gpu-node[07-08]", job_id=555123)).master_port
        for r in range(8)
    }
    assert ports == {15000 + 123 * 16}


def test_slurm_port_differs_between_steps_of_a_job() -> None:
    a = detect(slurm_env(0, 2, nodelist="n1", step_id=0)).master_port
    b = detect(slurm_env(0, 2, nodelist="n1", step_id=1)).master_port
    assert (a, b) == (PORT_SLURM_4242, PORT_SLURM_4242 + 1)


@pytest.mark.parametrize("job_id", [0, 1, 19999, 20000, 4242, 10**9 + 7, 4294967295])
def test_slurm_port_in_range(job_id: int) -> None:
    port = detect(slurm_env(0, 2, nodelist="n1", job_id=job_id)).master_port
    assert port is not None
    assert 15000 <= port <= 34999
    assert port == 15000 + (job_id % 1250) * 16


def _slurm_port(job: int, step: int) -> int | None:
    return detect(slurm_env(0, 2, nodelist="n1", job_id=job, step_id=step)).master_port


@pytest.mark.parametrize("job", [1, 4242, 19999, 20000, 555123, 4294967294])
def test_r5_l1_neighbouring_slurm_jobs_and_steps_get_different_ports(job: int) -> None:
    """R5-L1: job J's steps and job J+1's steps (0..15 each) never share a derived port.

    The old rule 15000 + (job + step) gave job J's step 1 and job J+1's step 0 one port, so
    two sbatch jobs on a node met in one world.
    """
    pairs = [(j, s) for j in (job, job + 1) for s in range(16)]
    ports = {pair: _slurm_port(*pair) for pair in pairs}
    assert len(set(ports.values())) == len(pairs), ports
    assert _slurm_port(job, 1) != _slurm_port(job + 1, 0)


def test_r5_l1_derived_ports_differ_for_a_thousand_consecutive_jobs() -> None:
    """R5-L1: 1250 consecutive SLURM job ids (step 0) all derive distinct ports in range."""
    ports = [_slurm_port(j, 0) for j in range(7000, 8250)]
    assert len(set(ports)) == 1250
    assert all(p is not None and 15000 <= p <= 34999 for p in ports)


@pytest.mark.parametrize(
    ("variable", "ids"),
    [
        ("I_MPI_JOB_ID", ("777", "778")),
        ("PMI_JOBID", ("4242.0", "4242.1", "4243.0")),
        ("PMIX_NAMESPACE", ("prterun-n1-4100@1", "prterun-n1-4101@1", "prterun-n1-4100@2")),
        ("OMPI_MCA_ess_base_jobid", ("3735879681", "3735879682")),
    ],
)
def test_r5_l1_neighbouring_mpi_job_ids_get_different_ports(
    variable: str, ids: tuple[str, ...]
) -> None:
    """R5-L1: MPI job ids that count up (jobs, steps, pids) derive different ports too."""
    base = openmpi_env(0, 2) if variable.startswith("OMPI") else intelmpi_env(0, 2)
    base = {k: v for k, v in base.items() if k not in ("I_MPI_JOB_ID", "OMPI_MCA_ess_base_jobid")}
    if variable == "PMIX_NAMESPACE":
        base = {"PMIX_RANK": "0", "PMIX_SIZE": "2", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "2"}
    ports = [detect({**base, variable: value}).master_port for value in ids]
    assert len(set(ports)) == len(ids), dict(zip(ids, ports, strict=True))


def test_slurm_port_non_numeric_job_id_still_in_range() -> None:
    env = {**slurm_env(0, 2, nodelist="n1"), "SLURM_JOB_ID": "4242_7", "SLURM_JOBID": "4242_7"}
    port = detect(env).master_port
    assert port is not None
    assert 15000 <= port <= 34999
    assert port == detect(env).master_port  # deterministic


# --------------------------------------------------------------------------- errors


def _multi_node_openmpi() -> dict[str, str]:
    return openmpi_env(6, 8, local_size=4)


ERRORS = [
    pytest.param(
        {"RANK": "4", "WORLD_SIZE": "4", "MASTER_PORT": "29500"},
        ["RANK=4 is out of range for WORLD_SIZE=4", "0 to 3"],
        id="rank-equals-world-size",
    ),
    pytest.param(
        {"RANK": "4", "WORLD_SIZE": "4"},
        ["RANK=4 is out of range for WORLD_SIZE=4"],
        id="rank-error-before-missing-port",
    ),
    pytest.param(
        {"RANK": "-1", "WORLD_SIZE": "4", "MASTER_PORT": "29500"},
        ["RANK=-1 is out of range"],
        id="negative-rank",
    ),
    pytest.param(
        {"RANK": "one", "WORLD_SIZE": "4", "MASTER_PORT": "29500"},
        ["RANK='one' is not an integer"],
        id="rank-not-integer",
    ),
    pytest.param(
        {"RANK": "0", "WORLD_SIZE": "0"},
        ["WORLD_SIZE=0 is not a valid world size"],
        id="world-size-zero",
    ),
    pytest.param(
        {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "0"},
        ["LOCAL_WORLD_SIZE=0", "WORLD_SIZE=2"],
        id="env-local-world-size-zero",
    ),
    pytest.param(
        _with(torchrun_env(1, 2), LOCAL_WORLD_SIZE="0", GROUP_WORLD_SIZE=None),
        ["LOCAL_WORLD_SIZE=0"],
        id="torchrun-local-world-size-zero",
    ),
    pytest.param(
        _with(intelmpi_env(1, 2), MPI_LOCALNRANKS="0"),
        ["MPI_LOCALNRANKS=0"],
        id="mpich-local-size-zero",
    ),
    pytest.param(
        {**slurm_env(0, 2, nodelist="n1"), "RANK": "1", "WORLD_SIZE": "2"},
        ["conflicting launcher variables", "RANK=1", "SLURM_PROCID=0", "(slurm)"],
        id="conflict-rank-vs-slurm-procid",
    ),
    pytest.param(
        {**slurm_env(0, 2, nodelist="n1"), "RANK": "0", "WORLD_SIZE": "4"},
        ["WORLD_SIZE=4", "SLURM_STEP_NUM_TASKS=2"],
        id="conflict-world-size-vs-slurm",
    ),
    pytest.param(
        {**slurm_env(1, 2, nodelist="n1"), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
        ["LOCAL_RANK=0", "SLURM_LOCALID=1"],
        id="conflict-local-rank-vs-slurm",
    ),
    pytest.param(
        {**openmpi_env(1, 2), "RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"},
        ["RANK=0", "OMPI_COMM_WORLD_RANK=1", "(openmpi)"],
        id="conflict-rank-vs-openmpi",
    ),
    pytest.param(
        {**slurm_env(0, 2, nodelist="n1"), "RANK": "x", "WORLD_SIZE": "2"},
        ["RANK='x' is not an integer"],
        id="hand-set-garbage-under-slurm",
    ),
    pytest.param(
        _with(torchrun_env(1, 4), LOCAL_RANK="4"),
        ["LOCAL_RANK=4 is out of range for LOCAL_WORLD_SIZE=4"],
        id="local-rank-equals-local-world-size",
    ),
    pytest.param(
        _with(torchrun_env(1, 4), GROUP_RANK="2", GROUP_WORLD_SIZE="2"),
        ["GROUP_RANK=2 is out of range for 2 node(s)"],
        id="group-rank-out-of-range",
    ),
    pytest.param(
        _with(torchrun_env(1, 2), MASTER_PORT="abc"),
        ["MASTER_PORT='abc' is not a port number"],
        id="master-port-not-a-number",
    ),
    pytest.param(
        _with(torchrun_env(1, 2), MASTER_PORT="70000"),
        ["MASTER_PORT=70000 is out of range"],
        id="master-port-too-large",
    ),
    pytest.param(
        {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "0"},
        ["MASTER_PORT=0 is out of range"],
        id="master-port-zero",
    ),
    pytest.param(
        {**slurm_env(0, 2, nodelist="n1"), "MASTER_PORT": "http"},
        ["MASTER_PORT='http'"],
        id="slurm-explicit-bad-port",
    ),
    pytest.param(
        _with(torchrun_env(1, 2), MASTER_PORT=None),
        ["MASTER_PORT", "WORLD_SIZE=2"],
        id="torchrun-without-master-port",
    ),
    pytest.param(
        {"RANK": "1", "WORLD_SIZE": "2"},
        ["MASTER_PORT is not set", "export MASTER_PORT"],
        id="env-without-master-port",
    ),
    pytest.param(
        {
            "RANK": "5",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "4",
            "MASTER_PORT": "29500",
        },
        ["MASTER_ADDR is not set", "export MASTER_ADDR"],
        id="env-multi-node-without-master-addr",
    ),
    pytest.param(
        _multi_node_openmpi(),
        ["openmpi launch across several nodes", "export MASTER_ADDR"],
        id="openmpi-multi-node-without-master-addr",
    ),
    pytest.param(
        _with(slurm_env(5, 8, nodelist="gpu-node[07-08]"), SLURM_NODEID="2"),
        ["SLURM_NODEID=2", "SLURM_STEP_TASKS_PER_NODE='4(x2)'", "only 2 node(s)"],
        id="slurm-nodeid-beyond-tasks-per-node",
    ),
    pytest.param(
        _with(slurm_env(5, 8, nodelist="gpu-node[07-08]"), SLURM_STEP_NODELIST="gpu-node[07-08"),
        ["'gpu-node[07-08'", "node list"],
        id="slurm-malformed-node-list",
    ),
    pytest.param(
        _with(slurm_env(1, 2, nodelist="n1"), SLURM_STEP_TASKS_PER_NODE="2(x"),
        ["'2(x'", "tasks-per-node"],
        id="slurm-malformed-tasks-per-node",
    ),
    pytest.param(
        _with(slurm_env(1, 2, nodelist="n1"), SLURM_LOCALID=None),
        ["SLURM_LOCALID", "local_rank"],
        id="slurm-missing-localid",
    ),
    pytest.param(
        _with(slurm_env(1, 2, nodelist="n1"), SLURM_PROCID="x"),
        ["SLURM_PROCID='x' is not an integer"],
        id="slurm-procid-not-integer",
    ),
    pytest.param(
        _with(openmpi_env(1, 4), OMPI_COMM_WORLD_RANK="4"),
        ["OMPI_COMM_WORLD_RANK=4 is out of range for OMPI_COMM_WORLD_SIZE=4"],
        id="openmpi-rank-out-of-range",
    ),
    pytest.param(
        {"PMI_RANK": "1"},
        ["none of PMI_SIZE is set"],
        id="mpich-without-size",
    ),
]


@pytest.mark.parametrize(("env", "fragments"), ERRORS)
def test_detect_errors(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(LaunchEnvError) as err:
        detect(env)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_launch_env_error_is_a_devlayer_error() -> None:
    assert issubclass(LaunchEnvError, DevlayerError)


def test_forced_env_skips_the_conflict_check() -> None:
    env = {**slurm_env(0, 2, nodelist="n1"), "RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}
    with pytest.raises(LaunchEnvError, match="conflicting"):
        detect(env)
    assert detect(env, force="env").rank == 1
    assert detect(env, force="slurm").rank == 0


# --------------------------------------------------------------------------- expansion helpers


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu-node07", ["gpu-node07"]),
        ("gpu-node[07-09,12]", ["gpu-node07", "gpu-node08", "gpu-node09", "gpu-node12"]),
        ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
        ("node[08-10]", ["node08", "node09", "node10"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        (
            "rack[1-2]-node[01-02]",
            ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"],
        ),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("n[1-2],m[3-4]", ["n1", "n2", "m3", "m4"]),
        ("gpu-node[07-08],login1", ["gpu-node07", "gpu-node08", "login1"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu-node[07-", "node[3-1]", "node[a-c]", "node[]", "node]1["])
def test_expand_nodelist_errors(bad: str) -> None:
    with pytest.raises(LaunchEnvError) as err:
        expand_nodelist(bad)
    assert repr(bad) in str(err.value)
    assert "node[01-04,07]" in str(err.value)


@pytest.mark.parametrize(
    ("spec", "counts"),
    [
        ("8", [8]),
        ("4(x2)", [4, 4]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("4,2", [4, 2]),
        ("1(x3),2(x2)", [1, 1, 1, 2, 2]),
        (" 2(x2) , 1 ", [2, 2, 1]),
    ],
)
def test_expand_tasks_per_node(spec: str, counts: list[int]) -> None:
    assert expand_tasks_per_node(spec) == counts


@pytest.mark.parametrize("bad", ["", "2(x", "x2", "2(xa)", "two"])
def test_expand_tasks_per_node_errors(bad: str) -> None:
    with pytest.raises(LaunchEnvError) as err:
        expand_tasks_per_node(bad)
    assert repr(bad) in str(err.value)
    assert "2(x3),1" in str(err.value)


# --------------------------------------------------------------------------- ProcessInfo


def test_torch_env_multi_node() -> None:
    info = detect(slurm_env(5, 8, nodelist="gpu-node[07-08]"))
    assert info.torch_env() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu-node07",
        "MASTER_PORT": str(PORT_SLURM_4242),
    }


def test_torch_env_single_process_has_no_port() -> None:
    assert detect({}).torch_env() == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="single"),
        pytest.param(slurm_env(5, 8, nodelist="gpu-node[07-08]"), id="slurm"),
        pytest.param({**openmpi_env(6, 8, local_size=4), "MASTER_ADDR": "n1"}, id="openmpi"),
    ],
)
def test_torch_env_round_trips(env: dict[str, str]) -> None:
    # What devlayer.init() exports is read back alike by a child process (which then sees
    # RANK/WORLD_SIZE set by hand, not a torchrun marker).
    info = detect(env)
    again = detect(info.torch_env())
    assert _values(again)[1:] == _values(info)[1:]
    assert again.launcher == "env"


def test_process_info_is_frozen() -> None:
    info = detect(torchrun_env(1, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.master_port = 1  # type: ignore[misc]


def test_process_info_defaults() -> None:
    info = ProcessInfo()
    assert _values(info) == ("none", 0, 1, 0, 1, 0, 1, LO, None)
    assert not info.is_distributed
    assert info.restart_count == 0


# --------------------------------------------------------------------------- doctests


def test_doctests() -> None:
    result = doctest.testmod(devlayer.launchers, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


def test_exported_env_is_not_mistaken_for_torchrun() -> None:
    # init() exports torch_env(); a child process must not detect it as torchrun (whose
    # values would win over a real srun step without any comparison).
    info = detect(slurm_env(5, 8, nodelist="gpu-node[07-08]"))
    assert detect(info.torch_env()).launcher == "env"


def test_unknown_disabled_launcher_is_an_error() -> None:
    with pytest.raises(LaunchEnvError, match="'slrum', which is not a launcher"):
        detect({"DEVLAYER_DISABLE_LAUNCHERS": "slrum"})
    with pytest.raises(LaunchEnvError, match="disable names 'nope'"):
        detect({}, disable=["nope"])


def test_launcher_auto_means_detect() -> None:
    env = {**slurm_env(1, 2, nodelist="n1"), "DEVLAYER_LAUNCHER": "auto"}
    assert detect(env).launcher == "slurm"


def test_force_argument_is_named_as_such() -> None:
    with pytest.raises(LaunchEnvError, match=r"^force='slurm' but the environment"):
        detect({}, force="slurm")


@pytest.mark.parametrize(
    ("env", "job_id"),
    [
        ({}, None),
        ({"SLURM_JOB_ID": "42"}, "SLURM_JOB_ID=42"),  # the sbatch shell: one process
        (
            {**torchrun_env(0, 2), "TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "7"},
            "SLURM_JOB_ID=7",
        ),
        ({**torchrun_env(0, 2), "TORCHELASTIC_RUN_ID": "abc"}, "TORCHELASTIC_RUN_ID=abc"),
        (
            {**slurm_env(0, 2), "SLURM_JOB_ID": "9", "TORCHELASTIC_RUN_ID": "x"},
            "SLURM_JOB_ID=9",
        ),
        (
            {**openmpi_env(0, 2), "OMPI_MCA_ess_base_jobid": "123"},
            "OMPI_MCA_ess_base_jobid=123",
        ),
    ],
)
def test_process_info_names_the_job(env: dict[str, str], job_id: str | None) -> None:
    info = detect(env)
    assert info.job_id == job_id
    assert info == dataclasses.replace(info, job_id="other")  # a label, not part of equality


# --------------------------------------------------------------------------- issue 20 (9)


@pytest.mark.parametrize(
    ("env", "seen"),
    [
        pytest.param({"WORLD_SIZE": "2"}, "WORLD_SIZE=2", id="world-size-alone"),
        pytest.param(
            {"WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500"},
            "WORLD_SIZE=4, LOCAL_RANK=1, MASTER_PORT=29500",
            id="with-local-rank-and-port",
        ),
        pytest.param(
            {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "abc", "LOCAL_RANK": "0"},
            "WORLD_SIZE=2, LOCAL_RANK=0, TORCHELASTIC_RUN_ID=abc",
            id="torchrun-markers-without-rank",
        ),
        pytest.param(
            {**_slurm_batch(), "WORLD_SIZE": "2"}, "WORLD_SIZE=2", id="in-an-sbatch-shell"
        ),
    ],
)
def test_r5_l3_world_size_without_rank_is_an_error(env: dict[str, str], seen: str) -> None:
    """R5-L3: WORLD_SIZE > 1 without RANK is an error naming the variables seen and RANK.

    Before, it ran as a single process (world size 1) without a word.
    """
    with pytest.raises(LaunchEnvError) as err:
        detect(env)
    message = str(err.value)
    assert f"seen: {seen}" in message, message
    assert "RANK is not set" in message and "export RANK" in message, message
    with pytest.raises(LaunchEnvError):
        devlayer.launchers.launched(env)


@pytest.mark.parametrize(
    ("env", "launcher", "world"),
    [
        pytest.param({}, "none", 1, id="plain"),
        pytest.param({"WORLD_SIZE": "1"}, "none", 1, id="world-size-1-alone"),
        pytest.param({"WORLD_SIZE": "2", "DEVLAYER_LAUNCHER": "none"}, "none", 1, id="forced"),
        pytest.param(torchrun_env(1, 2), "torchrun", 2, id="torchrun"),
        pytest.param({**torchrun_env(1, 2), **ACCELERATE}, "accelerate", 2, id="accelerate"),
        pytest.param(
            {"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29511"}, "env", 2, id="hand-set"
        ),
        pytest.param(
            {**slurm_env(1, 2, nodelist="n1"), "WORLD_SIZE": "2"}, "slurm", 2, id="srun+size"
        ),
    ],
)
def test_r5_l3_launches_with_rank_or_one_process_still_work(
    env: dict[str, str], launcher: str, world: int
) -> None:
    """R5-L3: torchrun, accelerate, hand-set, srun and plain environments are unchanged."""
    info = detect(env)
    assert (info.launcher, info.world_size) == (launcher, world)


# --------------------------------------------------------------------------- issue 20 (MPICH)

# What Hydra gives rank 5 of `mpiexec -hosts a,b -n 8` (4 per node), plus the MASTER_ADDR a
# job script exports: no job id, no MASTER_PORT.
HYDRA_2_NODES = {
    "PMI_RANK": "5",
    "PMI_SIZE": "8",
    "PMI_FD": "6",
    "MPI_LOCALRANKID": "1",
    "MPI_LOCALNRANKS": "4",
    "HYDI_CONTROL_FD": "7",
    "MASTER_ADDR": "a",
}


def test_r5_l5_mpich_across_nodes_without_port_or_job_id_is_an_error() -> None:
    """R5-L5: a multi-node MPICH (Hydra) job with no job id and no MASTER_PORT is an error
    that says to export MASTER_PORT, never a port one node derives for itself."""
    with pytest.raises(LaunchEnvError) as err:
        detect(HYDRA_2_NODES)
    message = str(err.value)
    assert "2 nodes" in message and "export MASTER_PORT" in message, message


def test_r5_l5_mpich_across_nodes_never_derives_the_port_from_the_proxy(monkeypatch) -> None:
    """R5-L5: in this process's own environment, each node's hydra_pmi_proxy has its own pid;
    a multi-node job must not derive its port from it (each node would wait on its own)."""
    outcomes = []
    for proxy_pid, rank, local_rank in ((4100, "1", "1"), (9200, "5", "1")):
        monkeypatch.setattr(
            devlayer.launchers.mpich, "ancestor_named", lambda names, p=proxy_pid: p
        )
        for key in list(os.environ):
            monkeypatch.delenv(key)
        for key, value in {
            **HYDRA_2_NODES,
            "PMI_RANK": rank,
            "MPI_LOCALRANKID": local_rank,
        }.items():
            monkeypatch.setenv(key, value)
        try:
            outcomes.append(detect(os.environ).master_port)
        except LaunchEnvError as exc:
            outcomes.append(str(exc))
    assert len({type(o) for o in outcomes}) == 1, outcomes  # both nodes agree: port or error
    ports = {o for o in outcomes if isinstance(o, int)}
    derived = {devlayer.launchers.derived_port(4100), devlayer.launchers.derived_port(9200)}
    assert len(ports) <= 1 and not ports & derived, outcomes


@pytest.mark.parametrize(
    ("extra", "port"),
    [
        pytest.param({"MASTER_PORT": "29600"}, 29600, id="exported-port"),
        pytest.param({"I_MPI_JOB_ID": "777"}, PORT_IMPI_JOB, id="intel-mpi-job-id"),
        pytest.param({"PMI_JOBID": "4242.0"}, PORT_SLURM_4242, id="pmi-job-id"),
    ],
)
def test_r5_l5_mpich_across_nodes_with_a_port_or_job_id_works(
    extra: dict[str, str], port: int
) -> None:
    """R5-L5: with MASTER_PORT or a job id every node gets the same port."""
    assert detect({**HYDRA_2_NODES, **extra}).master_port == port


def test_r5_l1_hydra_proxy_pids_spread_over_every_derived_port(monkeypatch) -> None:
    """R5-L1: ports derived from hydra_pmi_proxy pids differ for pids less than 20000 apart
    (neighbouring pids included), as two single-node mpiexec jobs have."""
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in intelmpi_env(0, 2).items():
        if key != "I_MPI_JOB_ID":
            monkeypatch.setenv(key, value)
    ports = set()
    for proxy in range(30000, 50000, 7):
        monkeypatch.setattr(devlayer.launchers.mpich, "ancestor_named", lambda names, p=proxy: p)
        ports.add(detect(os.environ).master_port)
    assert len(ports) == len(range(30000, 50000, 7))
