"""Helpers shared by tests (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from devlayer.testing import LAUNCHER_PREFIXES, LAUNCHER_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# devlayer's own launcher variables plus ours (DEVLAYER_*, ACCELERATE_*) for clean children.
_LAUNCH_PREFIXES = (*LAUNCHER_PREFIXES, "DEVLAYER_", "ACCELERATE_")
_LAUNCH_NAMES = LAUNCHER_VARIABLES


def subprocess_env(**extra: str) -> dict[str, str]:
    """An environment for child Python processes: no launcher variables, repo importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_LAUNCH_PREFIXES) and k not in _LAUNCH_NAMES
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def run_py(
    args: list[str],
    *,
    timeout: float = 120,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with a timeout; output captured as text."""
    return subprocess.run(
        [PY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else subprocess_env(),
        cwd=cwd or ROOT,
    )


def rank_results(stdout: str, key: str = "rank") -> list[dict[str, Any]]:
    """The ``RESULT {json}`` records ranks printed, sorted by ``key``.

    Ranks share one stdout under torchrun, so lines may interleave: match the records.
    """
    found = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", stdout)]
    return sorted(found, key=lambda r: int(r[key]))


def listening_addresses(port: int) -> list[str]:
    """Hex addresses in /proc/net/tcp{,6} that listen on ``port`` (0100007F = 127.0.0.1)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as fh:
                for line in fh.read().splitlines()[1:]:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                        found.append(parts[1].split(":")[0])
    return found


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node=N ...`` as argv."""
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def free_slurm_job_id(step: int = 0) -> int:
    """A SLURM job id whose derived port (step ``step``) is free on loopback right now."""
    import socket

    from devlayer.launchers import derived_port

    for job in range(1250):  # every job slot of the rule once
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", derived_port(job, step)))
            except OSError:
                continue
            return job
    raise RuntimeError("no SLURM job id with a free derived port")


def missing_program(reason: str) -> None:
    """A test needs a program CI installs: skip here with ``reason``, fail under ``CI=true``.

    Tests of what users get must not go silently missing in CI (rule 8 of the guide).
    """
    import pytest

    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {reason}: this test must run in CI, not skip")
    pytest.skip(reason)


def longest_functions_tool() -> ModuleType:
    """tools/longest_functions.py (a script, not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "_longest_functions", ROOT / "tools" / "longest_functions.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_data(n: int = 16) -> Any:
    """``TensorDataset(x, 2 * x)`` with ``x = 0, 1, ..., n - 1`` as one float column."""
    import torch
    from torch.utils.data import TensorDataset

    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return TensorDataset(x, 2 * x)


def toy_trainer(
    model: Any = None,
    optimizer: Any = None,
    loss_fn: Any = "mse",
    *,
    lr: float = 0.01,
    init_seed: int | None = None,
    **options: Any,
) -> Any:
    """The tests' one Trainer factory: a toy regression unless told otherwise.

    Args:
        model: Default ``torch.nn.Linear(1, 1)`` (made after ``torch.manual_seed(init_seed)``
            when ``init_seed`` is given).
        optimizer: Default ``torch.optim.SGD(model.parameters(), lr=lr)``.
        loss_fn: Default ``torch.nn.functional.mse_loss``; ``None`` for a ``training_step``.
        lr: The default optimizer's learning rate.
        init_seed: Seeds torch before the default model is made.
        **options: ``Trainer`` options over ``batch_size=8, progress=False, num_workers=0``.
    """
    import torch

    import devlayer

    if init_seed is not None:
        torch.manual_seed(init_seed)
    model = model if model is not None else torch.nn.Linear(1, 1)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    if isinstance(loss_fn, str) and loss_fn == "mse":
        loss_fn = torch.nn.functional.mse_loss
    options = {"batch_size": 8, "progress": False, "num_workers": 0, **options}
    return devlayer.Trainer(model, optimizer, loss_fn, **options)
