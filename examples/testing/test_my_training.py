"""How to test code that uses devlayer in a CI without GPUs (run: pytest examples/testing).

Three tools from devlayer.testing:
* simulate("cuda", 4): the cuda backend reports 4 devices (no kernels run) — test device
  selection and visibility logic;
* launcher_env("slurm", rank, world): this process looks like one srun task;
* run_ranks(fn, 2): run a function on 2 real CPU ranks (gloo) with a timeout.
"""

import os

import torch

import devlayer
from devlayer.testing import launcher_env, run_ranks, simulate


def my_device_choice() -> str:
    """The code under test: picks a device through devlayer."""
    with devlayer.init():
        return str(devlayer.device())


def test_picks_a_gpu_when_there_is_one():
    with simulate("cuda", 4):
        assert my_device_choice() == "cuda:0"


def test_reads_the_slurm_task():
    with launcher_env("slurm", rank=3, world_size=4, nodelist="gpu[01-02]"):
        from devlayer.launchers import detect

        info = detect(os.environ)
    assert (info.rank, info.local_rank, info.node_rank) == (3, 1, 1)


def mean_of_ranks() -> float:
    return devlayer.all_reduce(torch.tensor([float(devlayer.rank())]), op="mean").item()


def test_mean_over_two_real_ranks():
    assert run_ranks(mean_of_ranks, 2, timeout=60) == [0.5, 0.5]
