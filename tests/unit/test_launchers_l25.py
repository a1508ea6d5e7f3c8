"""Launchers past one machine (issue 25): each engine's documented environment, run through
``detect`` as a plain dict, and the layouts devlayer must never assume.

Every ``..._from_documented_env`` case is the environment the engine's own docs or sources
say a process gets (docs/launchers.md names where each came from); none of these engines
runs in CI, so these dicts are what proves them. The cases quoted from issue 25 are kept
verbatim. Each case asserts the nine values and where every one of them came from.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devlayer.errors import LaunchEnvError
from devlayer.launchers import ProcessInfo, derived_port, detect, expand_nodelist
from devlayer.testing import launcher_env, slurm_env

FIELDS = (
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "node_rank",
    "num_nodes",
    "master_addr",
    "master_port",
)


def _layout(info: ProcessInfo) -> tuple[object, ...]:
    """The launcher and the eight layout values; every value must name its source."""
    missing = [f for f in FIELDS if f != "master_port" and f not in info.sources]
    if info.master_port is not None and "master_port" not in info.sources:
        missing.append("master_port")
    assert not missing, f"no source for {missing}: {dict(info.sources)}"
    return (info.launcher, *(getattr(info, f) for f in FIELDS))


def _error(env: dict[str, str]) -> str:
    with pytest.raises(LaunchEnvError) as err:
        detect(env)
    return str(err.value)


def _hostfile(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "hosts"
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


# --------------------------------------------------------------------------- L25-1: LSF jsrun

# jsrun on Summit: rank 5 of 8, 4 per node; LSB_MCPU_HOSTS names the launch node first.
JSRUN = {
    "JSM_NAMESPACE_RANK": "5",
    "JSM_NAMESPACE_SIZE": "8",
    "JSM_NAMESPACE_LOCAL_RANK": "1",
    "JSM_NAMESPACE_LOCAL_SIZE": "4",
    "LSB_JOBID": "77",
    "LSB_MCPU_HOSTS": "batch1 1 a01n01 42 a01n02 42",
    "LSB_HOSTS": "batch1 " + "a01n01 " * 42 + "a01n02 " * 42,
    "PMIX_RANK": "5",
    "OMPI_COMM_WORLD_RANK": "5",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}


def test_l25_1_lsf_jsrun_from_documented_env() -> None:
    """L25-1: a jsrun task (Spectrum MPI's OMPI variables too) is read as LSF: its layout,
    the first compute host after the launch node as the store, the port from LSB_JOBID."""
    info = detect(JSRUN)
    assert _layout(info) == ("lsf", 5, 8, 1, 4, 1, 2, "a01n01", derived_port(77))
    assert info.sources["rank"] == "JSM_NAMESPACE_RANK"
    assert info.sources["local_world_size"] == "JSM_NAMESPACE_LOCAL_SIZE"
    assert info.sources["master_addr"].startswith("first compute host of LSB_MCPU_HOSTS")
    assert info.sources["master_port"] == "derived from LSB_JOBID=77"
    assert info.job_id == "LSB_JOBID=77"
    stale = {**JSRUN, "OMPI_COMM_WORLD_RANK": "4", "MASTER_ADDR": "a01n01"}  # stale OMPI_*
    assert "JSM_NAMESPACE_RANK=5 (lsf) but OMPI_COMM_WORLD_RANK=4" in _error(stale)


def test_l25_1_lsf_hosts_from_lsb_hosts_or_the_host_file(tmp_path: Path) -> None:
    """L25-1: without LSB_MCPU_HOSTS the hosts come from LSB_HOSTS, else from the file
    LSB_DJOB_HOSTFILE names (one line per slot)."""
    env = {k: v for k, v in JSRUN.items() if k != "LSB_MCPU_HOSTS"}
    assert (
        detect(env).sources["master_addr"].endswith("of LSB_HOSTS (after the launch node batch1)")
    )
    env.pop("LSB_HOSTS")
    env["LSB_DJOB_HOSTFILE"] = _hostfile(tmp_path, "batch1", "a01n01", "a01n01", "a01n02")
    info = detect(env)
    assert (info.master_addr, info.num_nodes) == ("a01n01", 2)
    assert "LSB_DJOB_HOSTFILE" in info.sources["master_addr"]


def test_l25_1_lsf_issue_case_is_never_one_process() -> None:
    """L25-1: the issue's jsrun environment (no local size, no host list) was one process of
    world size 1; now it is an error naming the variables that would tell the layout."""
    message = _error(
        {
            "JSM_NAMESPACE_RANK": "1",
            "JSM_NAMESPACE_SIZE": "4",
            "JSM_NAMESPACE_LOCAL_RANK": "1",
            "LSB_JOBID": "77",
        }
    )
    assert "JSM_NAMESPACE_LOCAL_SIZE" in message and "LSB_MCPU_HOSTS" in message, message


def test_l25_1_lsf_one_host_and_mismatched_hosts() -> None:
    """L25-1: one host is one node (loopback); a host list that fits neither the node count
    nor the node count plus a launch node is an error naming MASTER_ADDR, not a guess."""
    one = {**JSRUN, "JSM_NAMESPACE_SIZE": "4", "JSM_NAMESPACE_RANK": "1", "PMIX_RANK": "1"}
    one.update(OMPI_COMM_WORLD_RANK="1", OMPI_COMM_WORLD_SIZE="4")  # Spectrum MPI's agree
    one.pop("JSM_NAMESPACE_LOCAL_SIZE")
    one.update(LSB_MCPU_HOSTS="a01n01 42", LSB_HOSTS="")
    info = detect(one)
    assert _layout(info) == ("lsf", 1, 4, 1, 4, 0, 1, "127.0.0.1", derived_port(77))
    wrong = {**JSRUN, "LSB_MCPU_HOSTS": "batch1 1 a 42 b 42 c 42 d 42"}
    assert "export MASTER_ADDR" in _error(wrong)
    assert detect({**wrong, "MASTER_ADDR": "a"}).master_addr == "a"


# --------------------------------------------------------------------------- L25-2: Flux

FLUX_2_NODES = {
    "FLUX_TASK_RANK": "3",
    "FLUX_TASK_LOCAL_ID": "1",
    "FLUX_JOB_SIZE": "4",
    "FLUX_JOB_NNODES": "2",
    "FLUX_JOB_ID": "f2xpcQE9K",
    "FLUX_URI": "local:///run/flux/local",
    "PMI_RANK": "3",
    "PMI_SIZE": "4",
    "PMI_FD": "5",
}


def test_l25_2_flux_from_documented_env() -> None:
    """L25-2: a Flux task on 2 nodes (with MASTER_ADDR exported) is Flux, not MPICH on one
    node: 2 per node from FLUX_JOB_SIZE / FLUX_JOB_NNODES, port from FLUX_JOB_ID."""
    info = detect({**FLUX_2_NODES, "MASTER_ADDR": "node0"})
    port = info.master_port
    assert _layout(info) == ("flux", 3, 4, 1, 2, 1, 2, "node0", port)
    assert info.sources["local_world_size"] == "FLUX_JOB_SIZE=4 / FLUX_JOB_NNODES=2"
    assert info.sources["master_port"] == "derived from FLUX_JOB_ID=f2xpcQE9K"
    rank0 = {"FLUX_TASK_RANK": "0", "FLUX_TASK_LOCAL_ID": "0", "PMI_RANK": "0", "MASTER_ADDR": "n"}
    assert detect({**FLUX_2_NODES, **rank0}).master_port == port  # every rank derives it alike
    stale = {**FLUX_2_NODES, "PMI_RANK": "0", "MASTER_ADDR": "n"}
    assert "FLUX_TASK_RANK=3 (flux) but PMI_RANK=0" in _error(stale)


def test_l25_2_flux_issue_case_across_nodes_is_never_loopback() -> None:
    """L25-2: the issue's Flux environment on 2 nodes was MPICH on one node with a loopback
    store; without MASTER_ADDR it is now an error that names MASTER_ADDR."""
    message = _error(FLUX_2_NODES)
    assert "FLUX_JOB_NNODES=2" in message and "export MASTER_ADDR" in message, message


def test_l25_2_flux_one_node_and_uneven_tasks() -> None:
    """L25-2: one node is loopback with all tasks local; tasks that do not divide evenly
    over the nodes are an error (Flux exports no per-node count), unless LOCAL_WORLD_SIZE
    is exported."""
    one = {**FLUX_2_NODES, "FLUX_JOB_NNODES": "1", "FLUX_TASK_LOCAL_ID": "3"}
    assert _layout(detect(one))[1:8] == (3, 4, 3, 4, 0, 1, "127.0.0.1")
    uneven = {**FLUX_2_NODES, "FLUX_JOB_SIZE": "5", "PMI_SIZE": "5", "MASTER_ADDR": "n0"}
    assert "do not divide evenly" in _error(uneven)
    assert detect({**uneven, "LOCAL_WORLD_SIZE": "3"}).local_world_size == 3


# --------------------------------------------------------------------------- L25-3: PBS + PALS

PALS_ISSUE = {
    "PALS_RANKID": "13",
    "PALS_LOCAL_RANKID": "1",
    "PALS_NODEID": "1",
    "PMI_SIZE": "24",
    "PMI_LOCAL_RANK": "1",
    "PBS_JOBID": "123.aurora-pbs",
}


def test_l25_3_pals_from_documented_env(tmp_path: Path) -> None:
    """L25-3: PALS under PBS: local size from PMI_LOCAL_SIZE, the store on the first host of
    PBS_NODEFILE (never loopback across nodes), the port from PBS_JOBID."""
    nodefile = _hostfile(tmp_path, "x1000c0s0b0n0", "x1000c0s0b1n0")
    env = {**PALS_ISSUE, "PMI_LOCAL_SIZE": "12", "PBS_NODEFILE": nodefile}
    info = detect(env)
    assert _layout(info) == ("pals", 13, 24, 1, 12, 1, 2, "x1000c0s0b0n0", 16968)
    assert info.sources["local_world_size"] == "PMI_LOCAL_SIZE"
    assert info.sources["master_addr"] == "first host of PBS_NODEFILE"
    assert info.sources["node_rank"] == "PALS_NODEID"


def test_l25_3_pals_issue_case_is_never_assumed_one_node(tmp_path: Path) -> None:
    """L25-3: the issue's PALS environment (no local size) was read as one node with a
    loopback store; now it is an error naming the local-size variables, unless
    PBS_NODEFILE lists one host."""
    message = _error(PALS_ISSUE)
    assert "PMI_LOCAL_SIZE" in message and "LOCAL_WORLD_SIZE" in message, message
    two = _hostfile(tmp_path, "a", "b")
    assert "PBS_NODEFILE lists 2 host(s)" in _error({**PALS_ISSUE, "PBS_NODEFILE": two})
    one = {**PALS_ISSUE, "PALS_NODEID": "0", "PBS_NODEFILE": _hostfile(tmp_path, "a", "a")}
    assert _layout(detect(one))[1:8] == (13, 24, 1, 24, 0, 1, "127.0.0.1")


def test_l25_3_pals_across_nodes_without_an_address_or_a_readable_nodefile() -> None:
    """L25-3: across nodes, no MASTER_ADDR and no PBS_NODEFILE is an error naming
    MASTER_ADDR; a PBS_NODEFILE that cannot be read is an error naming it."""
    env = {**PALS_ISSUE, "PMI_LOCAL_SIZE": "12"}
    assert "MASTER_ADDR is not set" in _error(env)
    assert "PBS_NODEFILE='/nonexistent/nodes' cannot be read" in _error(
        {**env, "PBS_NODEFILE": "/nonexistent/nodes"}
    )


# --------------------------------------------------------------------------- L25-4: Kubeflow v1

# The issue's PyTorchJob pod, plus what Kubernetes gives every pod.
PYTORCHJOB_POD = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "job-master-0",
    "MASTER_PORT": "23456",
    "PYTHONUNBUFFERED": "0",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
}


def test_l25_4_kubeflow_pytorchjob_from_documented_env() -> None:
    """L25-4: each PyTorchJob pod is a node: local rank 0 of 1, node RANK of WORLD_SIZE
    (was local rank 3 of 4 on one "assumed single node")."""
    info = detect(PYTORCHJOB_POD)
    assert _layout(info) == ("pytorchjob", 3, 4, 0, 1, 3, 4, "job-master-0", 23456)
    assert info.sources["local_world_size"] == "one process per pod (no LOCAL_RANK)"
    assert info.sources["node_rank"] == "RANK (each pod is a node)"
    assert detect({**PYTORCHJOB_POD, "PET_NPROC_PER_NODE": "1"}).local_world_size == 1
    assert detect({**PYTORCHJOB_POD, "PET_NPROC_PER_NODE": "auto"}).local_world_size == 1


def test_l25_4_kubeflow_pod_needing_several_processes_says_use_torchrun() -> None:
    """L25-4: a pod with PET_NPROC_PER_NODE > 1 started without torchrun is an error saying
    to use torchrun (RANK is the pod's index there), not a wrong process rank."""
    message = _error({**PYTORCHJOB_POD, "WORLD_SIZE": "8", "PET_NPROC_PER_NODE": "2"})
    assert "PET_NPROC_PER_NODE=2" in message and "torchrun" in message, message
    assert "PET_NODE_RANK=2" in _error({**PYTORCHJOB_POD, "PET_NODE_RANK": "2"})


def test_l25_4_torchrun_in_a_pod_and_loopback_jobs_are_not_pods() -> None:
    """L25-4: torchrun inside a pod (LOCAL_RANK set) stays torchrun; RANK/WORLD_SIZE meeting
    on loopback inside one pod stay a hand-set one-node job."""
    under = {**PYTORCHJOB_POD, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"}
    assert detect({**under, "TORCHELASTIC_RUN_ID": "j"}).launcher == "torchrun"
    local = {**PYTORCHJOB_POD, "MASTER_ADDR": "127.0.0.1"}
    assert _layout(detect(local))[:7] == ("env", 3, 4, 3, 4, 0, 1)


# --------------------------------------------------------------------------- L25-5: Trainer v2

TRAINJOB_NODE = {
    "PET_NNODES": "2",
    "PET_NPROC_PER_NODE": "1",
    "PET_NODE_RANK": "1",
    "PET_MASTER_ADDR": "job-node-0-0.job",
    "PET_MASTER_PORT": "29400",
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
}


def test_l25_5_kubeflow_trainer_from_documented_env() -> None:
    """L25-5: a Trainer v2 node of one process started without torchrun gets the PET_*
    values translated: rank = node rank, world = nodes, the PET master address and port."""
    info = detect(TRAINJOB_NODE)
    assert _layout(info) == ("trainjob", 1, 2, 0, 1, 1, 2, "job-node-0-0.job", 29400)
    assert info.sources["world_size"] == "PET_NNODES"
    assert info.sources["master_port"] == "PET_MASTER_PORT"


@pytest.mark.parametrize("nproc", ["4", "auto", ""])
def test_l25_5_kubeflow_trainer_several_processes_say_use_torchrun(nproc: str) -> None:
    """L25-5: a node meant to run several processes (or an unknown number) without torchrun
    is an error saying to use torchrun, never one process; under torchrun, torchrun wins."""
    message = _error({**TRAINJOB_NODE, "PET_NPROC_PER_NODE": nproc})
    assert "torchrun" in message and "PET_NPROC_PER_NODE" in message, message
    from devlayer.testing import torchrun_env

    under = {**TRAINJOB_NODE, "PET_NPROC_PER_NODE": nproc, **torchrun_env(5, 8, local_world_size=4)}
    assert detect(under).launcher == "torchrun"


# --------------------------------------------------------------------------- L25-6: DeepSpeed


def test_l25_6_deepspeed_launcher_from_documented_env() -> None:
    """L25-6: DeepSpeed's pdsh launcher's LOCAL_SIZE, CROSS_RANK, CROSS_SIZE give the local
    world, node rank and nodes (were the world size, 0 and 1, silently)."""
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_SIZE": "4",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "worker-0",
        "MASTER_PORT": "29500",
    }
    info = detect(env)
    assert _layout(info) == ("deepspeed", 5, 8, 1, 4, 1, 2, "worker-0", 29500)
    assert (info.sources["node_rank"], info.sources["num_nodes"]) == ("CROSS_RANK", "CROSS_SIZE")
    assert "CROSS_RANK=2 is out of range" in _error({**env, "CROSS_RANK": "2"})


# --------------------------------------------------------------------------- L25-7: AzureML


def test_l25_7_azureml_from_documented_env() -> None:
    """L25-7: AzureML's MPI job across nodes takes the store from AZ_BATCH_MASTER_NODE
    (host:port) instead of refusing "MASTER_ADDR is not set"; exported values still win."""
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "8",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        "AZ_BATCH_MASTER_NODE": "10.0.0.4:6105",
        "AZ_BATCHAI_MPI_MASTER_NODE": "10.0.0.4",
        "AZUREML_RUN_ID": "run_42",
    }
    info = detect(env)
    assert _layout(info) == ("azureml", 5, 8, 1, 4, 1, 2, "10.0.0.4", 6105)
    assert info.sources["master_addr"] == "host of AZ_BATCH_MASTER_NODE"
    assert info.sources["master_port"] == "port of AZ_BATCH_MASTER_NODE"
    mine = detect({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29600"})
    assert (mine.master_addr, mine.master_port) == ("head", 29600)
    assert "is not host:port" in _error({**env, "AZ_BATCH_MASTER_NODE": "10.0.0.4:x"})


# --------------------------------------------------------------------------- L25-8: partial sets


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        pytest.param({"RANK": "1"}, ["RANK=1 but WORLD_SIZE is not set"], id="rank-alone"),
        pytest.param(
            {"LOCAL_RANK": "1"}, ["LOCAL_RANK=1 set but RANK and WORLD_SIZE"], id="local-rank"
        ),
        pytest.param(
            {"GROUP_RANK": "0"}, ["GROUP_RANK=0 set but RANK and WORLD_SIZE"], id="group-rank"
        ),
        pytest.param(
            {"LOCAL_WORLD_SIZE": "4", "MASTER_PORT": "29500"},
            ["LOCAL_WORLD_SIZE=4 set", "seen: LOCAL_WORLD_SIZE=4, MASTER_PORT=29500"],
            id="local-world-size",
        ),
        pytest.param({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2 but RANK is not set"], id="size"),
    ],
)
def test_l25_8_partial_settings_are_errors_not_one_process(
    env: dict[str, str], fragments: list[str]
) -> None:
    """L25-8: RANK alone, LOCAL_RANK alone, GROUP_RANK alone (or a local size above 1
    without ranks) is an error naming the variables seen and what is missing; before, all
    but WORLD_SIZE ran as one process without a word."""
    message = _error(env)
    for fragment in fragments:
        assert fragment in message, message
    assert "DEVLAYER_LAUNCHER=none" in message, message


def test_l25_8_one_process_settings_and_the_sbatch_note_still_work() -> None:
    """L25-8: WORLD_SIZE=1 or MASTER_ADDR/MASTER_PORT alone stay one process, and the
    sbatch shell still runs as one process with its note."""
    assert detect({"WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}).launcher == "none"
    batch = detect(slurm_env(0, 8, nodelist="n[1-2]", batch=True))
    assert batch.launcher == "none" and "sbatch" in batch.notes[0]


# --------------------------------------------------------------------------- L25-9: SLURM layout

SRUN_BARE = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_NTASKS": "2",
}


def test_l25_9_slurm_tasks_per_node_make_two_nodes_not_loopback() -> None:
    """L25-9: SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1 is two nodes by its own numbers: the
    node count and node rank are derived (named in sources), the store is the node list's
    first host, and without a node list it is an error naming MASTER_ADDR, never loopback."""
    env = {**SRUN_BARE, "SLURM_NTASKS_PER_NODE": "1"}
    assert "MASTER_ADDR is not set" in _error(env)
    info = detect({**env, "SLURM_NODELIST": "alpha,beta"})
    assert _layout(info) == ("slurm", 1, 2, 0, 1, 1, 2, "alpha", derived_port(4242))
    assert info.sources["num_nodes"] == "SLURM_NTASKS=2 / SLURM_NTASKS_PER_NODE=1"
    assert info.sources["node_rank"] == "rank // local_world_size"


def test_l25_9_slurm_layout_is_cross_checked_never_defaulted() -> None:
    """L25-9: SLURM_NNODES that disagrees with the tasks per node, a tasks-per-node list that
    does not add up to the task count, or no node information at all is an error; node
    count and node rank come from the tasks-per-node list when SLURM sets no others, and
    no message says "for 1 node(s)" of a count it did not read."""
    assert "SLURM_NNODES=1 but" in _error(
        {**SRUN_BARE, "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1"}
    )
    assert "places 3 tasks" in _error({**SRUN_BARE, "SLURM_TASKS_PER_NODE": "2,1"})
    assert "cannot tell how many nodes" in _error(SRUN_BARE)
    listed = detect({**SRUN_BARE, "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODELIST": "a,b"})
    assert (listed.node_rank, listed.num_nodes, listed.master_addr) == (1, 2, "a")
    assert listed.sources["num_nodes"] == "SLURM_TASKS_PER_NODE='1(x2)'"
    two = {**SRUN_BARE, "SLURM_NNODES": "2", "SLURM_NODELIST": "a,b"}
    assert "SLURM_NTASKS_PER_NODE" in _error(two)  # per-node count unknown: not all local
    bad_node = {**SRUN_BARE, "SLURM_NODEID": "1", "SLURM_NODELIST": "a"}
    message = _error(bad_node)
    assert "SLURM_NODEID=1" in message and "SLURM_NODELIST=1" in message, message


# --------------------------------------------------------------------------- L25-10: host lists


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        pytest.param("alpha beta gamma", ["alpha", "beta", "gamma"], id="spaces"),
        pytest.param(
            "machine2-[02-3]vm1, machine4-[0003-5].vml2",
            [
                "machine2-02vm1",
                "machine2-03vm1",
                "machine4-0003.vml2",
                "machine4-0004.vml2",
                "machine4-0005.vml2",
            ],
            id="comma-and-space",
        ),
        pytest.param(" n[1-2] ,\tn7 ", ["n1", "n2", "n7"], id="padded"),
    ],
)
def test_l25_10_host_lists_split_on_spaces_and_are_stripped(
    nodelist: str, hosts: list[str]
) -> None:
    """L25-10: a node list separated by spaces, or commas with spaces, expands to stripped
    host names, and srun's store is its first host (was "alpha beta gamma")."""
    assert expand_nodelist(nodelist) == hosts
    env = slurm_env(2, 3, nodelist="alpha,beta,gamma")
    env.update(SLURM_STEP_NODELIST=nodelist, SLURM_NODELIST=nodelist, SLURM_JOB_NODELIST=nodelist)
    if len(hosts) == 3:
        assert detect(env).master_addr == hosts[0]


# --------------------------------------------------------------------------- L25-11: launcher_env


@pytest.mark.parametrize(
    "kind", ["lsf", "flux", "pals", "pytorchjob", "trainjob", "deepspeed", "azureml"]
)
def test_l25_11_launcher_env_makes_each_new_engine_detected(clean_env, kind: str) -> None:
    """L25-11: devlayer.testing.launcher_env(kind, 1, 2) makes this process look like rank 1
    of 2 of each new engine, detected as that engine."""
    with launcher_env(kind, 1, 2):
        info = detect(os.environ)
    assert (info.launcher, info.rank, info.world_size) == (kind, 1, 2)


def test_l25_5_devlayer_launch_takes_its_defaults_from_the_pet_variables() -> None:
    """L25-5: `devlayer launch` options not given on the command line come from Kubeflow's
    PET_* variables (a given option wins, the rest keep their defaults); a PET_NODE_RANK
    that is no number is an error naming it."""
    import argparse

    from devlayer.cli.launch import add_arguments, fill_defaults
    from devlayer.errors import DevlayerError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = fill_defaults(parser.parse_args(["--nnodes", "3", "train.py"]), TRAINJOB_NODE)
    assert (args.nnodes, args.nproc, args.node_rank) == ("3", "1", 1)
    assert (args.master_addr, args.master_port) == ("job-node-0-0.job", 29400)
    plain = fill_defaults(parser.parse_args(["train.py"]), {})
    assert (plain.nnodes, plain.nproc, plain.node_rank, plain.master_port) == ("1", "auto", 0, None)
    with pytest.raises(DevlayerError, match="PET_NODE_RANK='x'"):
        fill_defaults(parser.parse_args(["train.py"]), {**TRAINJOB_NODE, "PET_NODE_RANK": "x"})


# --------------------------------------------------------------------------- L25-12: MPI layout


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"PMI_RANK": "1", "PMI_SIZE": "2"}, id="pmi"),
        pytest.param({"PMIX_RANK": "0", "PMIX_SIZE": "2", "MASTER_PORT": "29600"}, id="pmix"),
        pytest.param(
            {
                **slurm_env(5, 8, nodelist="gpu-node[07-08]"),
                "PMI_RANK": "5",
                "PMI_SIZE": "8",
                "PMI_FD": "7",
                "DEVLAYER_DISABLE_LAUNCHERS": "slurm",
                "MASTER_ADDR": "gpu-node07",
            },
            id="srun-pmi2-slurm-disabled",
        ),
        pytest.param({"PMI_RANK": "1", "PMI_SIZE": "2", "DEVLAYER_LAUNCHER": "mpich"}, id="forced"),
    ],
)
def test_l25_12_mpi_ranks_without_local_ranks_are_never_assumed_one_node(
    env: dict[str, str],
) -> None:
    """L25-12: MPI-style ranks without local ranks (PMI_RANK/PMI_SIZE, PMIX_RANK/PMIX_SIZE)
    were all put on this node with a loopback store (rank 5 of an srun job on 2 nodes became
    local rank 5 of 8); now that is an error naming LOCAL_WORLD_SIZE."""
    message = _error(env)
    assert "names no local ranks" in message and "LOCAL_WORLD_SIZE" in message, message


def test_l25_12_mpi_ranks_with_an_exported_local_size_or_under_srun_work() -> None:
    """L25-12: an exported LOCAL_WORLD_SIZE gives the local ranks (blocks of it), srun-started
    ranks (srun --mpi=pmi2) keep SLURM's layout, and a single rank needs no local ranks."""
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "PMI_JOBID": "9.0"}
    info = detect({**env, "MASTER_ADDR": "a"})
    assert _layout(info)[:7] == ("mpich", 3, 4, 1, 2, 1, 2)
    assert info.sources["local_rank"] == "rank % local_world_size"
    srun = {**slurm_env(5, 8, nodelist="n[1-2]"), "PMI_RANK": "5", "PMI_SIZE": "8"}
    assert _layout(detect(srun))[:7] == ("slurm", 5, 8, 1, 4, 1, 2)
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "1"}).world_size == 1


@pytest.mark.parametrize("node_var", ["NODE_RANK", "GROUP_RANK"])
def test_l25_8_a_node_rank_without_a_local_world_size_is_an_error(node_var: str) -> None:
    """L25-8: a hand-set job naming its node (NODE_RANK or GROUP_RANK) without
    LOCAL_WORLD_SIZE is an error naming LOCAL_WORLD_SIZE: all ranks were taken to run on
    this node (node 0), or node 1 was "out of range for 1 node(s)" of a default."""
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0"}
    for node in ("0", "1"):
        message = _error({**env, "MASTER_PORT": "29500", node_var: node})
        assert f"{node_var}={node}" in message and "export LOCAL_WORLD_SIZE" in message
        assert "1 node(s)" not in message, message


def test_l25_5_one_pod_or_one_node_kubeflow_jobs_need_no_store_address() -> None:
    """L25-5: a PyTorchJob of one pod and a Trainer v2 job of one node are one process on
    loopback, the address's source named; two pods without MASTER_ADDR are an error."""
    pod = {k: v for k, v in PYTORCHJOB_POD.items() if not k.startswith("MASTER_")}
    one = detect({**pod, "RANK": "0", "WORLD_SIZE": "1"})
    assert _layout(one) == ("pytorchjob", 0, 1, 0, 1, 0, 1, "127.0.0.1", None)
    assert "export MASTER_ADDR and MASTER_PORT" in _error({**pod, "RANK": "0", "WORLD_SIZE": "2"})
    node = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1"}
    assert _layout(detect(node)) == ("trainjob", 0, 1, 0, 1, 0, 1, "127.0.0.1", None)
