"""The same collective checks under real launchers and launcher-shaped environments.

* ``torchrun --standalone`` in a subprocess (2 ranks).
* A SLURM ``srun``-shaped environment: two plain ``python`` processes with the variables
  srun sets, no MASTER_ADDR/MASTER_PORT (devlayer derives them from the job).
* OpenMPI- and Intel-MPI-shaped environments the same way.
"""

from __future__ import annotations

import subprocess

import pytest

from devlayer.testing import free_port, intelmpi_env, openmpi_env, slurm_env
from tests.helpers import PY, ROOT, free_slurm_job_id, rank_results, subprocess_env, torchrun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKER = str(ROOT / "tests" / "dist" / "worker_collectives.py")


def _run_ranks(envs: list[dict[str, str]], timeout: float = 120) -> list[dict[str, object]]:
    procs = [
        subprocess.Popen(
            [PY, WORKER, "30"],
            env=subprocess_env(**env),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"rank exited {p.returncode}:\n{out}\n{err}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return rank_results("".join(outs))


def test_torchrun_two_ranks_all_collectives():
    cmd = torchrun(WORKER, "30")
    proc = subprocess.run(
        cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = rank_results(proc.stdout)
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["launcher"] for r in results} == {"torchrun"}
    assert {r["comm"] for r in results} == {"gloo"}


def test_slurm_shaped_env_two_plain_processes_derives_master():
    job_id = free_slurm_job_id()  # devlayer derives MASTER_PORT from the job id and step
    envs = [slurm_env(r, 2, nodelist="localhost", job_id=job_id) for r in range(2)]
    results = _run_ranks(envs)
    assert [r["launcher"] for r in results] == ["slurm", "slurm"]
    assert [r["local_rank"] for r in results] == [0, 1]
    # init exported the torchrun-style names for libraries that read them
    assert [r["env_rank"] for r in results] == ["0", "1"]


def test_openmpi_shaped_env_two_plain_processes():
    port = free_port()
    envs = [{**openmpi_env(r, 2), "MASTER_PORT": str(port)} for r in range(2)]
    results = _run_ranks(envs)
    assert [r["launcher"] for r in results] == ["openmpi", "openmpi"]


def test_intelmpi_shaped_env_two_plain_processes():
    port = free_port()
    envs = [{**intelmpi_env(r, 2), "MASTER_PORT": str(port)} for r in range(2)]
    results = _run_ranks(envs)
    assert [r["launcher"] for r in results] == ["mpich", "mpich"]


def test_plain_python_is_one_process():
    proc = subprocess.run(
        [PY, WORKER], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    (result,) = rank_results(proc.stdout)
    assert result["world_size"] == 1 and result["launcher"] == "none" and result["comm"] is None
