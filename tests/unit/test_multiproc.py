"""devlayer.launched(), spawn and launch refusing to start a second job under a launcher,
and the MPICH (Hydra) per-job port (the pure parts; the real programs run in tests/launchers)."""

from __future__ import annotations

import os

import pytest

import devlayer
from devlayer import launchers
from devlayer.launchers import mpich
from devlayer.testing import launcher_env, slurm_env


def test_launched_is_false_for_plain_python_and_the_sbatch_shell(clean_env):
    assert devlayer.launched() is False
    assert launchers.launched(slurm_env(0, 2, batch=True)) is False


@pytest.mark.parametrize("kind", ["torchrun", "slurm", "openmpi", "intelmpi"])
def test_launched_is_true_under_every_launcher(clean_env, kind):
    with launcher_env(kind, 1, 2):
        assert devlayer.launched() is True


def test_spawn_with_other_rank_count_than_the_launcher_refuses_before_starting(clean_env):
    with (
        launcher_env("slurm", 0, 3, nodelist="n1"),
        pytest.raises(devlayer.errors.InvalidArgumentError) as err,
    ):
        devlayer.spawn(os.getpid, nprocs=2)
    text = str(err.value)
    assert "nprocs=2" in text and "slurm" in text and "rank 0 of 3" in text
    assert not devlayer.is_initialized()


def test_devlayer_launch_refuses_as_one_of_several_ranks_on_a_node(clean_env, capsys):
    from devlayer.cli import main

    with launcher_env("slurm", 1, 2, nodelist="n1"):
        code = main(["launch", "--nproc", "2", "train.py"])
    assert code != 0
    err = capsys.readouterr().err
    assert "rank 1 of 2" in err and "slurm" in err and "one devlayer launch per node" in err


def test_proc_parent_parses_command_names_with_spaces_and_parentheses(tmp_path, monkeypatch):
    stat = "4242 (my (odd) name) S 17 4242 4242 0 -1 4194560 0 0 0 0\n"
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/4242/stat":
            p = tmp_path / "stat"
            p.write_text(stat)
            return real_open(p, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    assert mpich.proc_parent(4242) == ("my (odd) name", 17)
    assert mpich.proc_parent(999999999) is None


def test_mpich_port_from_the_hydra_proxy_only_for_the_real_environment(monkeypatch):
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    # A mapping that is not os.environ stays a pure function: the default port.
    assert launchers.detect(env).master_port == launchers.DEFAULT_PORT
    monkeypatch.setattr(mpich, "ancestor_named", lambda names: 4242)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mine = launchers.detect(os.environ)
    assert mine.master_port != launchers.DEFAULT_PORT
    assert "hydra_pmi_proxy pid 4242" in mine.sources["master_port"]
    monkeypatch.setattr(mpich, "ancestor_named", lambda names: 4243)
    assert launchers.detect(os.environ).master_port != mine.master_port  # another job
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert launchers.detect(os.environ).master_port == 29999  # an exported port wins
