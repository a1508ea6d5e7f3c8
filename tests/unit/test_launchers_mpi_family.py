"""Two MPI families' variables in one environment (a stale export, a nested launch) are
compared from their raw rank and size variables, even where the stale family's own
detection fails (issue 25: never ranks disagreeing quietly)."""

from __future__ import annotations

import pytest

from devlayer.errors import LaunchEnvError
from devlayer.launchers import detect

#: OpenMPI's own variables for rank 1 of 2 on one node (the family that matches first).
OMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_MCA_ess_base_jobid": "4242",
}

#: MPICH's (Hydra) variables left from a 4-node job of 8: its own detection fails (no
#: MASTER_ADDR or MASTER_PORT across nodes), so it was skipped before.
STALE_PMI = {"PMI_RANK": "3", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}


def test_a21_n3_a_stale_family_whose_detection_fails_is_still_compared() -> None:
    """A21-N3: OpenMPI's variables beside a stale MPICH set whose own detection fails (four
    nodes, no MASTER_ADDR): a LaunchEnvError naming both variables and values and the fix
    (was: MPICH skipped, rank 1 of 2 used silently)."""
    with pytest.raises(LaunchEnvError, match="conflicting launcher variables") as err:
        detect({**OMPI, **STALE_PMI})
    text = str(err.value)
    for part in ("OMPI_COMM_WORLD_RANK=1", "PMI_RANK=3", "DEVLAYER_LAUNCHER=openmpi"):
        assert part in text, text


def test_a21_n3_a_size_alone_or_agreeing_values_pass() -> None:
    """A21-N3: a family is compared when its rank variable is set, on what is set: a stale
    PMI_RANK alone that disagrees is refused, naming it; a PMI_SIZE without a rank variable
    of its own (PALS reads it too) is not a family; agreeing rank and size (a nested launch
    of the same job) and a non-integer leftover pass; a disabled family is not compared."""
    with pytest.raises(LaunchEnvError, match="PMI_RANK=0"):
        detect({**OMPI, "PMI_RANK": "0"})
    assert detect({**OMPI, "PMI_SIZE": "8"}).world_size == 2
    info = detect({**OMPI, "PMI_RANK": "1", "PMI_SIZE": "2", "MV2_COMM_WORLD_RANK": "x"})
    assert (info.launcher, info.rank, info.world_size) == ("openmpi", 1, 2)
    disabled = detect({**OMPI, **STALE_PMI, "DEVLAYER_DISABLE_LAUNCHERS": "mpich"})
    assert (disabled.launcher, disabled.rank) == ("openmpi", 1)
