"""The examples run as documented: plain python, self-spawn, torchrun and an srun-shaped job.

Everything is kept tiny (a few hundred samples, a width-4 ResNet) so the file runs in about
a minute on two CPU cores.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from devlayer.testing import slurm_env
from tests.helpers import PY, ROOT, free_slurm_job_id, run_py, subprocess_env

pytestmark = pytest.mark.e2e

SIN_FIT = str(ROOT / "examples" / "sin_fit.py")
CIFAR = str(ROOT / "examples" / "cifar_resnet.py")
CUSTOM = str(ROOT / "examples" / "custom_loop.py")

SIN_ARGS = ["--epochs", "30", "--print-every", "0"]
CIFAR_ARGS = ["--width", "4", "--samples", "256", "--epochs", "1", "--batch-size", "32"]
CIFAR_ARGS += ["--num-workers", "0"]
# CPU ranks everywhere, also on a GPU machine (two ranks must not share one GPU there).
ENV = {"DEVLAYER_BACKEND": "cpu"}
FINAL = re.compile(r"^final train_loss (\S+) val_loss (\S+) world_size (\d+) ", re.M)
EPOCH = re.compile(r"^epoch 1/1 \| train_loss [\d.]+ .*\| val_accuracy ([\d.]+) .*samples/s", re.M)
SUMMARY = re.compile(r"^summary: .* throughput ([\d.]+) samples/s \| world_size (\d+)$", re.M)


def _torchrun(script: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script]
    return subprocess.run(
        [*cmd, *args],
        env=subprocess_env(**ENV),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _py(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return run_py(args, timeout=timeout, env=subprocess_env(**ENV))


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _final(stdout: str) -> tuple[float, int]:
    found = FINAL.findall(stdout)
    assert len(found) == 1, f"expected one final line from rank 0:\n{stdout}"
    train_loss, _val_loss, world = found[0]
    return float(train_loss), int(world)


@pytest.fixture(scope="module")
def one_rank_loss() -> float:
    """sin_fit's final loss on one process, for the world-size comparisons."""
    loss, world = _final(_ok(_py([SIN_FIT, *SIN_ARGS], timeout=60)))
    assert world == 1
    return loss


@pytest.mark.timeout(70)
def test_sin_fit_plain_python(one_rank_loss):
    assert one_rank_loss < 0.05


@pytest.mark.timeout(90)
def test_sin_fit_spawns_itself(one_rank_loss):
    loss, world = _final(_ok(_py([SIN_FIT, *SIN_ARGS, "--nprocs", "2"], timeout=80)))
    assert world == 2
    # The global batch is the same for any world size, so the optimizer takes the same
    # steps: the loss matches the 1-rank run up to float rounding in the all-reduce.
    assert loss == pytest.approx(one_rank_loss, rel=1e-3)


@pytest.mark.timeout(90)
def test_sin_fit_torchrun(one_rank_loss):
    loss, world = _final(_ok(_torchrun(SIN_FIT, *SIN_ARGS, "--nprocs", "2", timeout=80)))
    assert world == 2
    assert loss == pytest.approx(one_rank_loss, rel=1e-3)


@pytest.mark.timeout(90)
def test_sin_fit_srun_shaped_two_tasks(one_rank_loss):
    # Two plain processes with the variables srun gives its tasks and no MASTER_ADDR/PORT:
    # devlayer derives the port from the job id and step, so pick one whose port is free.
    job_id = free_slurm_job_id()
    procs = [
        subprocess.Popen(
            [PY, SIN_FIT, *SIN_ARGS],
            env=subprocess_env(**ENV, **slurm_env(r, 2, nodelist="localhost", job_id=job_id)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=80)
            assert p.returncode == 0, f"task exited {p.returncode}:\n{out}\n{err}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert "final" not in outs[1], "only rank 0 reports"
    loss, world = _final(outs[0])
    assert world == 2
    assert loss == pytest.approx(one_rank_loss, rel=1e-3)


@pytest.mark.timeout(60)
def test_cifar_resnet_one_process():
    out = _ok(_py([CIFAR, *CIFAR_ARGS], timeout=50))
    (accuracy,) = EPOCH.findall(out)
    assert 0.0 <= float(accuracy) <= 1.0
    ((throughput, world),) = SUMMARY.findall(out)
    assert float(throughput) > 0 and world == "1"


@pytest.mark.timeout(90)
def test_cifar_resnet_torchrun_two_ranks_bf16_with_reference():
    args = [*CIFAR_ARGS, "--precision", "bf16-mixed", "--reference-throughput", "100"]
    out = _ok(_torchrun(CIFAR, *args, timeout=80))
    assert "2 rank(s) on 1 node(s)" in out and "global batch 32 = 16 per rank" in out
    (accuracy,) = EPOCH.findall(out)
    assert 0.0 <= float(accuracy) <= 1.0
    ((throughput, world),) = SUMMARY.findall(out)
    assert float(throughput) > 0 and world == "2"
    (efficiency,) = re.findall(r"^scaling efficiency ([\d.]+)% ", out, re.M)
    assert float(efficiency) == pytest.approx(float(throughput) / 200 * 100, rel=0.01)


@pytest.mark.timeout(120)
def test_cifar_resnet_torchrun_two_ranks_fsdp_checkpoint_and_export(tmp_path):
    """docs/training.md's FSDP line (README's before the docs site) as a user runs it:
    sharded blocks, a sharded checkpoint, and an exported file that loads into the plain
    ResNet with weights_only=True."""
    import importlib.util

    import torch

    export = tmp_path / "model.pt"
    ckpt = tmp_path / "ckpt"
    args = [*CIFAR_ARGS, "--strategy", "fsdp", "--checkpoint-dir", str(ckpt)]
    out = _ok(_torchrun(CIFAR, *args, "--export", str(export), timeout=110))
    ((_, world),) = SUMMARY.findall(out)
    assert world == "2" and f"exported the trained weights to {export}" in out
    (step,) = [p for p in ckpt.iterdir() if p.name.startswith("step-")]
    assert sorted(p.name for p in (step / "shards").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    spec = importlib.util.spec_from_file_location("cifar_resnet", CIFAR)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.ResNet18(num_classes=10, width=4)
    model.load_state_dict(torch.load(export, weights_only=True))  # strict: every key


@pytest.mark.timeout(60)
def test_custom_loop_torchrun_two_ranks():
    out = _ok(_torchrun(CUSTOM, "--epochs", "2", timeout=50))
    assert re.findall(r"^epoch 2/2 val_loss ([\d.]+) world_size 2$", out, re.M)
    assert re.search(r"^done: val_loss [\d.]+ on 2 rank\(s\), device cpu$", out, re.M)
