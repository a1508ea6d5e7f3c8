"""Progress output in job logs (issue 12): plain lines, no carriage returns, when stderr is
not a terminal; the interval's parsing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import devlayer

SCRIPT = textwrap.dedent(
    """
    import torch, devlayer
    from torch.utils.data import TensorDataset

    x = torch.linspace(0, 1, 40).unsqueeze(1)
    net = torch.nn.Linear(1, 1)
    trainer = devlayer.Trainer(
        net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.functional.mse_loss,
        batch_size=8, max_epochs=2, num_workers=0, resume=None, log_every=1,
    )
    trainer.fit(TensorDataset(x, 2 * x), TensorDataset(x, 2 * x))
    """
)


def _run(tmp_path, env_interval: str | None) -> tuple[str, str]:
    import os

    env = dict(os.environ)
    env.pop("DEVLAYER_PROGRESS_INTERVAL", None)
    if env_interval is not None:
        env["DEVLAYER_PROGRESS_INTERVAL"] = env_interval
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    with out.open("w") as fo, err.open("w") as fe:  # files, as in a SLURM %x-%j.out
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=240,
        )
    assert proc.returncode == 0, err.read_text()
    # Bytes: reading as text would turn a carriage return into a newline.
    return out.read_bytes().decode(), err.read_bytes().decode()


@pytest.mark.timeout(300)
def test_job_log_gets_plain_progress_lines_not_carriage_returns(clean_env, tmp_path):
    out, err = _run(tmp_path, "0")  # 0: a line per micro-batch, so the test needs no clock
    assert "\r" not in err and "\r" not in out
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    # 40 samples / global batch 8 = 5 steps per epoch; log_every=1 shows the loss.
    assert [line.split(" | ")[:3] for line in lines] == [
        [f"epoch {e}/2", f"batch {b}/5", f"step {(e - 1) * 5 + b}"]
        for e in (1, 2)
        for b in range(1, 6)
    ]
    assert all(" | loss " in line and " | samples_s " in line for line in lines)
    summaries = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [s.split(" | ")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"]
    assert out.splitlines()[-1] == "stopped: max_epochs=2 reached at step 10, epoch 2"


@pytest.mark.timeout(300)
def test_default_interval_prints_no_per_batch_lines_in_a_short_run(clean_env, tmp_path):
    out, err = _run(tmp_path, None)  # 30 s: far longer than this run
    assert "\r" not in err
    assert not [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len([line for line in out.splitlines() if line.startswith("epoch ")]) == 2


def test_progress_interval_from_argument_env_or_default():
    from devlayer.train.trainer import resolve_progress_interval

    assert resolve_progress_interval(None, {}) == 30.0
    assert resolve_progress_interval(None, {"DEVLAYER_PROGRESS_INTERVAL": " 2.5 "}) == 2.5
    assert resolve_progress_interval(0, {"DEVLAYER_PROGRESS_INTERVAL": "9"}) == 0.0
    with pytest.raises(
        devlayer.errors.InvalidArgumentError, match="DEVLAYER_PROGRESS_INTERVAL='soon'"
    ):
        resolve_progress_interval(None, {"DEVLAYER_PROGRESS_INTERVAL": "soon"})
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(devlayer.errors.InvalidArgumentError, match="progress_interval="):
            resolve_progress_interval(bad, {})


def test_a21_n1_the_progress_interval_is_a_setting_read_once(clean_env):
    """A21-N1: DEVLAYER_PROGRESS_INTERVAL is a field of devlayer.config.Settings with its
    origin (was: train/progress.py read the variable itself); the Trainer's argument wins
    (with its own name as origin) and a bad variable beside an argument does not matter;
    init() refuses a bad one by name, as it refuses every malformed setting."""
    from devlayer.config import Settings
    from devlayer.train.trainer import resolve_progress_interval

    got = Settings.from_env({"DEVLAYER_PROGRESS_INTERVAL": "0"})
    assert got.progress_interval == 0.0
    assert got.origin("progress_interval") == "DEVLAYER_PROGRESS_INTERVAL"
    given = got.given("progress_interval", 5)
    assert (given.progress_interval, given.origin("progress_interval")) == (
        5.0,
        "progress_interval",
    )
    assert resolve_progress_interval(7, {"DEVLAYER_PROGRESS_INTERVAL": "soon"}) == 7.0
    clean_env.setenv("DEVLAYER_PROGRESS_INTERVAL", "-1")
    with pytest.raises(devlayer.errors.DevlayerError, match="DEVLAYER_PROGRESS_INTERVAL='-1'"):
        devlayer.init(backend="cpu")
    assert not devlayer.is_initialized()
