"""devlayer under the real launchers: OpenMPI mpirun, MPICH mpiexec, SLURM sbatch/srun/salloc.

The programs come from the distribution (``tests/launchers/setup.sh`` installs them and
starts a one-node SLURM). Without them these tests skip with the reason; with ``CI=true`` a
missing launcher fails instead, so they cannot go silently missing in CI. Every rank runs on
gloo over loopback; every subprocess has a hard timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, missing_program, rank_results, subprocess_env, torchrun

pytestmark = [pytest.mark.launcher, pytest.mark.timeout(300)]

JOB = str(ROOT / "tests" / "launchers" / "job.py")
PY = sys.executable


def _documented_port(job: int, step: int) -> int:
    """The documented srun port rule, written out: 15000 + (job % 1250) * 16 + step % 16."""
    return 15000 + (job % 1250) * 16 + step % 16


def _missing(reason: str) -> None:
    missing_program(f"{reason} (sudo bash tests/launchers/setup.sh installs and starts them)")


def _need(*programs: str) -> None:
    absent = [p for p in programs if shutil.which(p) is None]
    if absent:
        _missing(f"needs {', '.join(absent)}")


@pytest.fixture(scope="module")
def slurm() -> None:
    _need("sbatch", "srun", "salloc", "scancel", "sinfo")
    try:
        state = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        _missing("sinfo did not answer within 20 s: no SLURM controller")
    if state.returncode != 0 or not re.search(r"idle|mixed|alloc", state.stdout):
        _missing(f"no idle SLURM node (sinfo: {state.stdout.strip() or state.stderr.strip()})")


def _env(**extra: str) -> dict[str, str]:
    # OpenMPI refuses root unless both are set (the same as --allow-run-as-root).
    return subprocess_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", **extra)


def _run(cmd: list[str], timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=kw.pop("cwd", None)
    )
    return proc


def _results(proc: subprocess.CompletedProcess[str], n: int) -> list[dict[str, Any]]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    found = rank_results(proc.stdout)
    assert len(found) == n, proc.stdout + proc.stderr
    return found


def _check_two_ranks(found: list[dict[str, Any]], launcher: str, rank_var: str) -> None:
    assert [r["rank"] for r in found] == [0, 1]
    assert [r["devlayer_rank"] for r in found] == [0, 1]
    assert [r["local_rank"] for r in found] == [0, 1]
    assert {r["world_size"] for r in found} == {2}
    assert {r["launcher"] for r in found} == {launcher}
    assert all(r["rank_source"].startswith(rank_var) for r in found), found
    assert {r["sum"] for r in found} == {3}  # all_reduce(rank + 1) over 2 ranks
    assert len({r["master_port"] for r in found}) == 1


# ----------------------------------------------------------------------------- MPI


def _openmpi() -> list[str]:
    _need("mpirun.openmpi")
    return ["mpirun.openmpi", "--oversubscribe", "-n", "2"]


def _mpich() -> list[str]:
    _need("mpiexec.hydra")
    return ["mpiexec.hydra", "-n", "2"]


def test_openmpi_mpirun_quickstart_ranks_and_sources():
    found = _results(_run([*_openmpi(), PY, JOB, "quick"]), 2)
    _check_two_ranks(found, "openmpi", "OMPI_COMM_WORLD_RANK")
    assert "OMPI" in found[0]["port_source"]  # derived from the job id OpenMPI exports
    example = _run([*_openmpi(), PY, str(ROOT / "examples" / "quickstart.py")])
    assert example.returncode == 0, example.stderr
    assert "2 rank(s) on cpu" in example.stdout


def test_mpich_mpiexec_quickstart_ranks_and_sources():
    found = _results(_run([*_mpich(), PY, JOB, "quick"]), 2)
    _check_two_ranks(found, "mpich", "PMI_RANK")
    assert "hydra_pmi_proxy" in found[0]["port_source"]
    example = _run([*_mpich(), PY, str(ROOT / "examples" / "quickstart.py")])
    assert example.returncode == 0, example.stderr
    assert "2 rank(s) on cpu" in example.stdout


@pytest.mark.parametrize("launcher", ["openmpi", "mpich"])
def test_mpi_two_rank_trainer_with_checkpoint_and_resume(launcher, tmp_path):
    start = _openmpi() if launcher == "openmpi" else _mpich()
    first = _results(_run([*start, PY, JOB, "train", str(tmp_path), "--epochs", "2"]), 2)
    assert {r["step"] for r in first} == {12}
    assert len({r["checksum"] for r in first}) == 1  # replicas identical
    again = _results(_run([*start, PY, JOB, "train", str(tmp_path), "--epochs", "3"]), 2)
    assert {r["step"] for r in again} == {18}
    assert all(r["resumed_from"] and r["resumed_from"].endswith("12") for r in again), again


def test_two_overlapping_mpich_jobs_get_different_ports():
    """Issue 13.3: Hydra sets no job id; two jobs on one node must not share port 29500."""
    cmd = [*_mpich(), PY, JOB, "hold", "4"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        outs.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    jobs = [_results(o, 2) for o in outs]
    ports = [{r["master_port"] for r in job} for job in jobs]
    assert all(len(p) == 1 for p in ports), ports
    assert ports[0] != ports[1], ports
    assert all({r["sum"] for r in job} == {3} for job in jobs)


def test_accelerate_launch_cpu_with_mpirun_agrees_with_devlayer(tmp_path):
    """Accelerate's multi-CPU path starts mpirun; devlayer and Accelerate see the same ranks."""
    _need("mpirun.openmpi")
    exe = Path(PY).with_name("accelerate")
    if not exe.exists():
        pytest.skip("accelerate is not installed (pip install -e .[dev])")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    # Accelerate calls whichever of mpirun/mpiexec it finds first; give it OpenMPI's.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "mpirun").symlink_to(shutil.which("mpirun.openmpi") or "mpirun.openmpi")
    env = _env(JOB_WITH_ACCELERATE="1")
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    cmd = [
        str(exe), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
        "--mpirun_hostfile", str(hostfile), "--mixed_precision", "no",
        "--dynamo_backend", "no", JOB, "quick",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    found = _results(proc, 2)
    assert [r["rank"] for r in found] == [0, 1]
    assert [r["accelerate_rank"] for r in found] == [0, 1]
    assert {r["accelerate_world"] for r in found} == {2}
    assert {r["launcher"] for r in found} == {"openmpi"}


# ----------------------------------------------------------------------------- SLURM


def _slurm_port(record: dict[str, Any]) -> int:
    return _documented_port(int(record["slurm_job_id"]), int(record["slurm_step_id"]))


def _sbatch(script: Path, *, wait: bool = True, timeout: float = 240) -> tuple[int, str]:
    """Submit ``script``; with ``wait`` block until it ends. Returns (job id, output path)."""
    out = script.with_suffix(".out")
    cmd = ["sbatch", "--parsable", "-o", str(out), "-D", str(script.parent)]
    if wait:
        cmd.append("--wait")
    proc = subprocess.run(
        [*cmd, str(script)], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    job = re.search(r"^(\d+)", proc.stdout.strip(), re.M)
    assert job, proc.stdout + proc.stderr
    if wait and proc.returncode != 0:
        raise AssertionError(f"job {job.group(1)} exit {proc.returncode}:\n{out.read_text()}")
    return int(job.group(1)), str(out)


def _job_script(path: Path, body: str, ntasks: int = 2) -> Path:
    path.write_text(f"#!/bin/bash\n#SBATCH -n {ntasks}\n#SBATCH -t 10\nset -u\n{body}\n")
    return path


def _wait_gone(job: int, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        show = subprocess.run(
            ["scontrol", "show", "job", str(job)], capture_output=True, text=True, timeout=20
        )
        state = re.search(r"JobState=(\S+)", show.stdout)
        if state is None or state.group(1) not in ("PENDING", "RUNNING", "COMPLETING"):
            return state.group(1) if state else "GONE"
        time.sleep(0.5)
    raise AssertionError(f"job {job} still running after {timeout} s")


def test_sbatch_batch_shell_is_one_process_then_srun_trains(slurm, tmp_path):
    script = _job_script(
        tmp_path / "job.sh",
        f"{PY} {JOB} quick\nsrun {PY} {JOB} train {tmp_path / 'ckpt'} --epochs 1",
    )
    _, out = _sbatch(script)
    found = rank_results(Path(out).read_text())
    shell = [r for r in found if r["launcher"] == "none"]
    ranks = [r for r in found if r["launcher"] == "slurm"]
    assert len(shell) == 1 and shell[0]["world_size"] == 1 and shell[0]["sum"] == 1, found
    assert [r["rank"] for r in ranks] == [0, 1], found
    assert {r["world_size"] for r in ranks} == {2}
    assert {r["step"] for r in ranks} == {6}
    assert len({r["checksum"] for r in ranks}) == 1
    assert {r["master_port"] for r in ranks} == {_slurm_port(ranks[0])}
    assert all("SLURM_JOB_ID" in r["port_source"] for r in ranks)


def _listening_within(port: int, seconds: float) -> bool:
    from tests.helpers import listening_addresses

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if listening_addresses(port):
            return True
        time.sleep(0.2)
    return False


def test_r5_l2_rank_of_a_second_sbatch_job_on_the_same_port_is_refused(slurm, tmp_path):
    """R5-L2 under real sbatch/srun: job B's rank 1 reaches job A's store (one MASTER_PORT)
    while A's rank 1 is still starting; B's rank 1 fails naming both jobs, A trains with its
    own two ranks. Before: B's rank 1 joined A's world and A's rank 1 was refused.
    """
    from devlayer.testing import free_port

    port = free_port()
    late_rank_1 = 'if [ "$SLURM_PROCID" = 1 ]; then sleep 25; fi; exec {py} {job} quick'
    only_rank_1 = 'if [ "$SLURM_PROCID" = 1 ]; then exec {py} {job} quick; fi'
    scripts = [
        _job_script(
            tmp_path / name,
            f"export MASTER_PORT={port}\nsrun bash -c '{body.format(py=PY, job=JOB)}'",
        )
        for name, body in (("a.sh", late_rank_1), ("b.sh", only_rank_1))
    ]
    job_a, out_a = _sbatch(scripts[0], wait=False)
    try:
        assert _listening_within(port, 150), f"job {job_a} never hosted its store on {port}"
        job_b, out_b = _sbatch(scripts[1], wait=False)
        _wait_gone(job_b, 150)
        assert _wait_gone(job_a, 150) == "COMPLETED", Path(out_a).read_text()
    finally:
        subprocess.run(["scancel", str(job_a)], capture_output=True, timeout=20)
    text_b = Path(out_b).read_text()
    assert "RendezvousError" in text_b, text_b
    assert f"slurm job SLURM_JOB_ID={job_b} step SLURM_STEP_ID=0" in text_b, text_b
    assert f"another job: slurm job SLURM_JOB_ID={job_a} step SLURM_STEP_ID=0" in text_b
    found = rank_results(Path(out_a).read_text())
    assert sorted(r["rank"] for r in found) == [0, 1], found
    assert {r["slurm_job_id"] for r in found} == {str(job_a)}
    assert {r["sum"] for r in found} == {3}
    assert not rank_results(text_b)


def test_srun_directly(slurm):
    found = _results(_run(["srun", "-n", "2", PY, JOB, "quick"]), 2)
    _check_two_ranks(found, "slurm", "SLURM_PROCID")
    assert {r["master_port"] for r in found} == {_slurm_port(found[0])}


def test_salloc_then_srun(slurm):
    found = _results(_run(["salloc", "-n", "2", "srun", PY, JOB, "quick"]), 2)
    _check_two_ranks(found, "slurm", "SLURM_PROCID")
    assert {r["master_port"] for r in found} == {_slurm_port(found[0])}


def test_spawn_under_srun_runs_in_place_not_a_second_job(slurm):
    """Issue 13.1: a self-spawning script started by srun -n 2 runs 2 processes, not 4."""
    found = _results(_run(["srun", "-n", "2", PY, JOB, "spawn"]), 2)
    task_pids = sorted(r["pid"] for r in found)
    for record in found:
        assert record["launched"] is True
        assert record["result_ranks"] == [0, 1]
        assert record["result_worlds"] == [2, 2]
        # the function ran in the srun tasks themselves: no child processes were started
        assert sorted(record["result_pids"]) == task_pids


def test_spawn_under_srun_with_other_task_count_refuses(slurm):
    proc = _run(["srun", "-n", "3", PY, JOB, "spawn"])
    assert proc.returncode != 0
    assert "devlayer.spawn(nprocs=2)" in proc.stderr and "slurm" in proc.stderr, proc.stderr
    assert "RESULT" not in proc.stdout


def test_spawn_under_torchrun_runs_in_place():
    proc = subprocess.run(
        torchrun(JOB, "spawn"), capture_output=True, text=True, timeout=180, env=_env()
    )
    found = _results(proc, 2)
    assert sorted(r["pid"] for r in found) == sorted(found[0]["result_pids"])
    assert [r["rank"] for r in found] == found[0]["result_ranks"] == [0, 1]


def test_slurm_preemption_stops_all_ranks_together_and_resubmit_resumes_bitwise(slurm, tmp_path):
    """scancel --signal=TERM mid-run: same stop step on every rank, checkpoint, resume."""
    reference = _results(
        _run(["srun", "-n", "2", PY, JOB, "train", str(tmp_path / "ref"), "--epochs", "4"]), 2
    )
    ckpt = tmp_path / "ckpt"
    script = _job_script(
        tmp_path / "preempt.sh",
        f"srun {PY} {JOB} train {ckpt} --epochs 4 --step-sleep 0.3",
    )
    job, out = _sbatch(script, wait=False)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        text = Path(out).read_text() if Path(out).exists() else ""
        if re.search(r"^STEP ([5-9]|1\d)$", text, re.M):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"job {job} never reached step 5:\n{text}")
    subprocess.run(["scancel", "--signal=TERM", str(job)], check=True, timeout=20)
    _wait_gone(job)
    stopped = rank_results(Path(out).read_text())
    assert len(stopped) == 2, Path(out).read_text()
    assert all("preempted" in r for r in stopped), stopped
    step = stopped[0]["step"]
    assert {r["step"] for r in stopped} == {step} and 5 <= step < 24
    assert any(p.name.endswith(str(step)) for p in ckpt.iterdir()), list(ckpt.iterdir())

    Path(out).unlink()
    _, out = _sbatch(script)  # resubmit the same script
    resumed = rank_results(Path(out).read_text())
    assert [r["rank"] for r in resumed] == [0, 1]
    assert all(r["resumed_from"] and r["resumed_from"].endswith(str(step)) for r in resumed)
    assert {r["step"] for r in resumed} == {24}
    assert {r["checksum"] for r in resumed} == {reference[0]["checksum"]}


# ----------------------------------------------------------------------------- docs


def _docstring_commands(path: Path) -> list[str]:
    """The launch lines of an example's docstring (indented lines that run the example)."""
    doc = path.read_text().split('"""')[1]
    return [
        line.split("#")[0].strip()
        for line in doc.splitlines()
        if line.startswith("    ") and path.name in line
    ]


@pytest.mark.parametrize(
    ("example", "extra", "pattern"),
    [
        ("quickstart.py", [], r"(\d+) rank\(s\) on cpu"),
        ("sin_fit.py", ["--epochs", "2"], r"final train_loss .* world_size (\d+)"),
    ],
)
def test_example_docstring_lines_start_the_ranks_they_promise(slurm, example, extra, pattern):
    """Issue 13.7: every launch line in an example's docstring starts the ranks it says."""
    import shlex

    commands = _docstring_commands(ROOT / "examples" / example)
    assert len(commands) >= 5, commands
    for command in commands:
        argv = shlex.split(command)
        want = 2 if any(a in ("2", "--nproc-per-node=2") for a in argv) else 1
        exe = {
            "python": [PY],
            "torchrun": [PY, "-m", "torch.distributed.run"],
            "accelerate": [str(Path(PY).with_name("accelerate"))],
            "mpirun": ["mpirun.openmpi", "--oversubscribe"],
            "mpiexec": ["mpiexec.hydra"],
        }.get(argv[0], [argv[0]])
        _need(exe[0])
        argv = [PY if a == "python" else a for a in argv[1:]]
        if "MASTER_PORT=29511" in argv:  # keep the documented form, on a port that is free
            from devlayer.testing import free_port

            argv[argv.index("MASTER_PORT=29511")] = f"MASTER_PORT={free_port()}"
        proc = _run([*exe, *argv, *extra], cwd=ROOT)
        assert proc.returncode == 0, f"{command}: {proc.stderr[-2000:]}"
        found = re.search(pattern, proc.stdout)
        assert found and int(found.group(1)) == want, f"{command}: {proc.stdout[-2000:]}"
