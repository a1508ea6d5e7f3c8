"""devlayer.testing is what users' CI uses; run the shipped example test file as they would."""

from __future__ import annotations

import os

import pytest

import devlayer
from devlayer.testing import launcher_env
from tests.helpers import ROOT, run_py, subprocess_env


def test_launcher_env_hides_other_launchers_and_restores(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "5")
    with launcher_env("torchrun", 1, 2) as values:
        assert os.environ["RANK"] == "1" and "OMPI_COMM_WORLD_RANK" not in os.environ
        assert values["WORLD_SIZE"] == "2"
    assert os.environ["OMPI_COMM_WORLD_RANK"] == "5" and "RANK" not in os.environ
    with pytest.raises(devlayer.errors.InvalidArgumentError, match="'sge'"), launcher_env("sge"):
        pass


@pytest.mark.timeout(180)
def test_the_example_test_file_passes():
    proc = run_py(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "examples" / "testing")],
        env=subprocess_env(),
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 passed" in proc.stdout
