"""The launchers package: a launcher is one record, ``cpus_per_rank``, and who reads them.

Issue 21, item 3: a new launcher is one module (a :class:`~devlayer.launchers.Launcher`
record) plus one line in a precedence list; ``train/`` takes the CPUs of a rank and the job
id from ``ProcessInfo`` instead of asking which launcher ran.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from types import SimpleNamespace

import pytest
import torch

import devlayer
import devlayer.launchers
from devlayer.errors import LaunchEnvError
from devlayer.launchers import PRECEDENCE, EnvReader, Launcher, ProcessInfo, detect
from devlayer.launchers.base import derived_port, resolve_master
from devlayer.testing import (
    LAUNCHER_PREFIXES,
    intelmpi_env,
    launcher_env,
    slurm_env,
    torchrun_env,
)

# --------------------------------------------------------------------------- a toy launcher
# What a launcher author writes: this module's body (one file) and one line in PRECEDENCE.


def _toy_detect(env: Mapping[str, str]) -> ProcessInfo | None:
    if "TOY_RANK" not in env:
        return None
    r = EnvReader(env, "toy", job_vars=("TOY_JOB",))
    r.int("rank", "TOY_RANK")
    world = r.int("world_size", "TOY_SIZE")
    r.int("local_rank", "TOY_LOCAL_RANK", default=0)
    r.int("local_world_size", "TOY_LOCAL_SIZE", default=1)
    r.int("num_nodes", "TOY_NODES", default=world)
    r.int("node_rank", "TOY_RANK")
    r.check_counts()
    addr, port = resolve_master(
        r,
        single_node=world == 1,
        world_size=world,
        fallback_port=lambda: (derived_port(int(env["TOY_JOB"])), "derived from TOY_JOB"),
        multi_node_addr=env.get("TOY_HEAD"),
        multi_node_addr_source="TOY_HEAD",
    )
    return r.info(master_addr=addr, master_port=port)


TOY = Launcher(
    "toy", detect=_toy_detect, aliases=("toyrun",), prefixes=("TOY_",), job_id_vars=("TOY_JOB",)
)
#: The toy's place: right after ``env``, so a hand-set RANK is compared with it.
_AFTER_ENV = [launcher.name for launcher in PRECEDENCE].index("env") + 1
TOY_ENV = {"TOY_RANK": "2", "TOY_SIZE": "4", "TOY_JOB": "4242", "TOY_HEAD": "node01"}


def test_a21_l1_a_new_launcher_is_one_record_in_the_precedence_list() -> None:
    """A21-L1: a launcher defined outside the package (a record and its detect function) is
    detected from a plain dict once it is in the precedence list passed to detect(), with its
    sources, job id and derived port; DEVLAYER_LAUNCHER and DEVLAYER_DISABLE_LAUNCHERS accept
    its name and alias; without it the same environment is one process."""
    mine = (*PRECEDENCE[:_AFTER_ENV], TOY, *PRECEDENCE[_AFTER_ENV:])  # the one line
    info = detect(TOY_ENV, launchers=mine)
    assert (info.launcher, info.rank, info.world_size, info.node_rank) == ("toy", 2, 4, 2)
    assert (info.master_addr, info.master_port) == ("node01", derived_port(4242))
    assert info.sources["rank"] == "TOY_RANK" and info.sources["master_addr"] == "TOY_HEAD"
    assert info.job_id == "TOY_JOB=4242"
    assert detect({**TOY_ENV, "DEVLAYER_LAUNCHER": "toyrun"}, launchers=mine).launcher == "toy"
    skipped = detect({**TOY_ENV, "DEVLAYER_DISABLE_LAUNCHERS": "toy"}, launchers=mine)
    assert skipped.launcher == "none"
    assert detect(TOY_ENV).launcher == "none"  # not in the default list
    with pytest.raises(LaunchEnvError, match=r"known: none, torchrun, .*, env, toy, azureml"):
        detect({"DEVLAYER_LAUNCHER": "sge"}, launchers=mine)


def test_a21_l1_a_new_launcher_is_checked_like_the_built_in_ones() -> None:
    """A21-L1: the toy's values pass the same validation (a rank out of range names its
    variable) and a hand-set RANK that disagrees with it is an error, not a silent choice."""
    mine = (*PRECEDENCE[:_AFTER_ENV], TOY, *PRECEDENCE[_AFTER_ENV:])
    with pytest.raises(LaunchEnvError, match="TOY_RANK=7 is out of range for TOY_SIZE=4"):
        detect({**TOY_ENV, "TOY_RANK": "7"}, launchers=mine)
    hand = {**TOY_ENV, "RANK": "1", "WORLD_SIZE": "4", "MASTER_PORT": "29511"}
    with pytest.raises(LaunchEnvError, match="RANK=1 but TOY_RANK=2 \\(toy\\)"):
        detect(hand, launchers=mine)


def test_a21_l1_every_built_in_launcher_is_a_record_with_its_own_name() -> None:
    """A21-L1: the default precedence list holds one record per launcher, with distinct
    names and aliases; LAUNCHERS (name -> detector) is derived from it in the same order."""
    names = [launcher.name for launcher in PRECEDENCE]
    aliases = [a for launcher in PRECEDENCE for a in launcher.aliases]
    assert len(set(names + aliases)) == len(names + aliases)
    assert list(devlayer.launchers.LAUNCHERS) == names
    assert all(devlayer.launchers.LAUNCHERS[x.name] is x.detect for x in PRECEDENCE)


def test_a21_l1_launcher_env_hides_the_prefixes_the_records_declare(clean_env) -> None:
    """A21-L1: devlayer.testing.launcher_env hides every variable prefix a record declares
    (LAUNCHER_PREFIXES is derived from PRECEDENCE), e.g. a stale PALS rank under torchrun."""
    assert set(LAUNCHER_PREFIXES) == {p for x in PRECEDENCE for p in x.prefixes}
    for launcher in PRECEDENCE:
        for prefix in launcher.prefixes:
            clean_env.setenv(prefix + "STALE_TEST_VALUE", "1")
    with launcher_env("torchrun", 1, 2):
        assert not [k for k in os.environ if k.endswith("STALE_TEST_VALUE")]
        assert detect(os.environ).launcher == "torchrun"


# --------------------------------------------------------------------------- cpus_per_rank


def test_a21_l2_cpus_per_rank_comes_from_slurm_cpus_per_task_under_srun() -> None:
    """A21-L2: under srun, ProcessInfo.cpus_per_rank is SLURM_CPUS_PER_TASK (named in
    sources), also when srun started MPI-style ranks (srun --mpi=pmi2); torchrun inside an
    srun task, an srun step without --cpus-per-task and the sbatch shell give None."""
    info = detect({**slurm_env(1, 2, nodelist="n1"), "SLURM_CPUS_PER_TASK": "8"})
    assert info.cpus_per_rank == 8 and info.sources["cpus_per_rank"] == "SLURM_CPUS_PER_TASK"
    pmi2 = {
        **slurm_env(1, 4, nodelist="n[1-2]"),
        "SLURM_CPUS_PER_TASK": "4",
        "PMI_RANK": "1",
        "PMI_SIZE": "4",
        "MASTER_ADDR": "n1",
    }
    assert (detect(pmi2).launcher, detect(pmi2).cpus_per_rank) == ("slurm", 4)
    inside = {**slurm_env(0, 1, nodelist="n1"), **torchrun_env(1, 2), "SLURM_CPUS_PER_TASK": "8"}
    assert (detect(inside).launcher, detect(inside).cpus_per_rank) == ("torchrun", None)
    assert detect(slurm_env(1, 2, nodelist="n1")).cpus_per_rank is None
    batch = {**slurm_env(0, 2, nodelist="n1", batch=True), "SLURM_CPUS_PER_TASK": "8"}
    assert detect(batch).cpus_per_rank is None
    assert detect({**intelmpi_env(1, 2), "SLURM_CPUS_PER_TASK": "8"}).cpus_per_rank is None


@pytest.mark.parametrize("value", ["0", "-2", "eight"])
def test_a21_l2_a_bad_slurm_cpus_per_task_is_an_error(value: str) -> None:
    """A21-L2: a SLURM_CPUS_PER_TASK that is no CPU count is an error naming it, not a
    silently ignored value."""
    with pytest.raises(LaunchEnvError) as err:
        detect({**slurm_env(1, 2, nodelist="n1"), "SLURM_CPUS_PER_TASK": value})
    message = str(err.value)
    assert "SLURM_CPUS_PER_TASK=" in message and value in message, message


def _fake_state(process: ProcessInfo) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=process.world_size,
        rank=process.rank,
        local_world_size=process.local_world_size,
        local_rank=process.local_rank,
        process=process,
        device=torch.device("cpu"),
    )


def test_a21_l2_prepare_loader_asks_cpus_per_rank_not_the_launcher(clean_env) -> None:
    """A21-L2: prepare_loader lets a rank use the CPUs it may use for itself when its
    launcher says it has CPUs of its own (cpus_per_rank set), whatever the launcher's name;
    without it two local ranks share those CPUs and the same request is warned about."""
    from devlayer.devices import usable_cpus

    cpus = usable_cpus()
    if cpus < 2:
        pytest.skip("needs 2 usable CPUs to tell a shared bound from an own one")
    data = torch.utils.data.TensorDataset(torch.arange(8.0))
    own = ProcessInfo(rank=0, world_size=2, local_world_size=2, launcher="toy", cpus_per_rank=cpus)
    clean_env.setattr(devlayer, "is_initialized", lambda: True)
    clean_env.setattr(devlayer, "state", lambda: _fake_state(own))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devlayer.prepare_loader(data, 4, num_workers=cpus).loader.num_workers == cpus
    shared = ProcessInfo(rank=0, world_size=2, local_world_size=2, launcher="slurm")
    clean_env.setattr(devlayer, "state", lambda: _fake_state(shared))
    with pytest.warns(UserWarning, match="shared by 2 local ranks"):
        devlayer.prepare_loader(data, 4, num_workers=cpus)


# --------------------------------------------------------------------------- the folder lock


def test_a21_l3_the_folder_lock_records_the_job_id_init_read(clean_env, tmp_path) -> None:
    """A21-L3: the lock file names the job by the ProcessInfo.job_id that init() read; the
    lock does not detect the launcher again (a later change of the environment, or a
    detect() that would fail, does not reach it), and before init() it names no job."""
    from devlayer.train.checkpoint import CheckpointStore

    clean_env.setenv("PBS_JOBID", "17.server")
    devlayer.init(backend="cpu")
    try:
        assert devlayer.state().process.job_id == "PBS_JOBID=17.server"
        clean_env.setenv("PBS_JOBID", "18.server")

        def refuse(*args: object, **kwargs: object) -> ProcessInfo:
            raise AssertionError("the lock detected the launcher again")

        clean_env.setattr(devlayer.launchers, "detect", refuse)
        with CheckpointStore(tmp_path).lock():
            recorded = json.loads((tmp_path / ".lock-step").read_text())
        assert recorded["job"] == "PBS_JOBID=17.server"
    finally:
        devlayer.shutdown()
    with CheckpointStore(tmp_path).lock():
        assert json.loads((tmp_path / ".lock-step").read_text())["job"] is None


def test_a21_l1_the_architecture_example_is_a_working_launcher() -> None:
    """A21-L1: the launcher module shown in docs/architecture.md ("A launcher in one file")
    runs as written: put in a precedence list, it is detected from a plain dict with its job
    id and derived port, and its bad values are named like the built-in launchers'."""
    from tests.helpers import ROOT

    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("## A launcher in one file") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("```\n", start)]
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    lsf = namespace["LSF"]
    assert isinstance(lsf, Launcher)
    env = {
        "JSM_NAMESPACE_RANK": "5",
        "JSM_NAMESPACE_SIZE": "8",
        "JSM_NAMESPACE_LOCAL_RANK": "1",
        "JSM_NAMESPACE_LOCAL_SIZE": "4",
        "LSB_JOBID": "777",
        "MASTER_ADDR": "batch1",
    }
    info = detect(env, launchers=(*PRECEDENCE[:-1], lsf, PRECEDENCE[-1]))
    assert (info.launcher, info.rank, info.node_rank, info.num_nodes) == ("lsf", 5, 1, 2)
    assert (info.master_addr, info.master_port, info.job_id) == (
        "batch1",
        derived_port(777),
        "LSB_JOBID=777",
    )
    with pytest.raises(LaunchEnvError, match="JSM_NAMESPACE_LOCAL_RANK=4 is out of range"):
        detect({**env, "JSM_NAMESPACE_LOCAL_RANK": "4"}, launchers=(lsf, *PRECEDENCE))
