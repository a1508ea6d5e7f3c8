"""torch's flight recorder beside devlayer's hang reports (issue 22, item 4).

Where the comm backend has one (nccl), ``init()`` turns it on with cheap settings before the
process group exists, pointing its dump files into the hang folder, unless the user set the
variables; the hang report names the dump's path. The process group itself cannot be made
here (no GPU, a CPU build of torch): the cuda runtime is simulated at the hardware seam and
the process-group step is replaced by a spy that keeps the environment it would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import devlayer
from devlayer import hangdump, lifecycle
from devlayer.hooks import FLIGHT_RECORDERS, FlightRecorder
from devlayer.testing import launcher_env, simulate

_FILE_VARS = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")
_SIZE_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")
_ALL = (*_FILE_VARS, *_SIZE_VARS, "TORCH_NCCL_DUMP_ON_TIMEOUT")


@pytest.fixture
def spy_pg(sim: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment the process group would see, kept by a spy in its place."""
    for name in _ALL:
        sim.delenv(name, raising=False)
    seen: dict[str, str] = {}

    def create(*args: Any, **kwargs: Any) -> tuple[bool, Any]:
        seen.update(os.environ)
        return False, None

    sim.setattr(lifecycle, "_create_process_group", create)
    return seen


def _init_rank1(backend: str, folder: Path, comm: str | None = None) -> None:
    devlayer.init(backend=backend, comm=comm, hang_dir=folder, timeout=30)


@pytest.mark.simulated
def test_h22_21_nccl_flight_recorder_is_on_in_the_hang_folder(spy_pg, tmp_path: Path) -> None:
    """H22-21: on simulated cuda with nccl, the process group sees torch's flight recorder
    turned on (buffer 2000, dump on timeout) with its dump files in the hang folder; the
    folder exists (0700) for torch to write into; the collective error's report names rank
    1's file; ``shutdown()`` removes the variables again."""
    folder = tmp_path / "hangs"
    with launcher_env("torchrun", 1, 2), simulate("cuda", 2, comm=("nccl", "gloo")):
        _init_rank1("cuda", folder)
        try:
            assert devlayer.state().comm == "nccl"
            assert spy_pg["TORCH_FR_DUMP_TEMP_FILE"] == str(folder / "flight_recorder_rank_")
            assert spy_pg["TORCH_FR_BUFFER_SIZE"] == "2000"
            assert spy_pg["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
            assert folder.is_dir() and (folder.stat().st_mode & 0o777) == 0o700
            text = hangdump.on_collective_error("all_reduce #1")
            assert f"torch's flight recorder (nccl): rank 1: {folder}/flight_recorder_rank_1" in (
                text
            )
        finally:
            devlayer.shutdown()
    assert not any(name in os.environ for name in _ALL)


@pytest.mark.simulated
def test_h22_21_the_users_own_flight_recorder_settings_win(spy_pg, tmp_path: Path) -> None:
    """H22-21: a user's TORCH_NCCL_DEBUG_INFO_TEMP_FILE and TORCH_NCCL_TRACE_BUFFER_SIZE
    (the older spellings torch still reads) are left as they are, no newer alias is added
    beside them, and the report names the user's file; with TORCH_NCCL_DUMP_ON_TIMEOUT=0
    the report names no file (torch writes none)."""
    spy_pg.clear()
    mine = str(tmp_path / "mine_")
    with launcher_env("torchrun", 1, 2), simulate("cuda", 2, comm=("nccl", "gloo")):
        os.environ.update(TORCH_NCCL_DEBUG_INFO_TEMP_FILE=mine, TORCH_NCCL_TRACE_BUFFER_SIZE="50")
        try:
            _init_rank1("cuda", tmp_path / "hangs")
            try:
                assert spy_pg["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == mine
                assert spy_pg["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50"
                assert "TORCH_FR_DUMP_TEMP_FILE" not in spy_pg
                assert "TORCH_FR_BUFFER_SIZE" not in spy_pg
                assert f"rank 1: {mine}1" in hangdump.on_collective_error("all_reduce #1")
            finally:
                devlayer.shutdown()
            os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] = "0"
            _init_rank1("cuda", tmp_path / "hangs")
            try:
                assert spy_pg["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "0"
                assert "flight recorder" not in hangdump.on_collective_error("all_reduce #1")
            finally:
                devlayer.shutdown()
        finally:
            for name in _ALL:
                os.environ.pop(name, None)


def test_h22_21_gloo_gets_no_flight_recorder_variable(spy_pg, tmp_path: Path) -> None:
    """H22-21: a comm backend without a flight recorder (gloo) gets no variable and its
    report names no flight recorder; so does nccl with hang reports off."""
    with launcher_env("torchrun", 1, 2):
        _init_rank1("cpu", tmp_path)
        try:
            assert not any(name.startswith("TORCH_FR_") for name in spy_pg)
            assert "flight recorder" not in hangdump.on_collective_error("all_reduce #1")
        finally:
            devlayer.shutdown()


@pytest.mark.simulated
def test_nccl_with_hang_reports_off_sets_nothing(spy_pg, sim, tmp_path: Path) -> None:
    sim.setenv("DEVLAYER_HANG_REPORTS", "0")
    with launcher_env("torchrun", 1, 2), simulate("cuda", 2, comm=("nccl", "gloo")):
        _init_rank1("cuda", tmp_path)
        try:
            assert "TORCH_FR_DUMP_TEMP_FILE" not in spy_pg
        finally:
            devlayer.shutdown()


def test_flight_recorder_settings_are_a_pure_function_of_the_environment() -> None:
    """The cheap settings are proposed only where no alias of a variable is set; the dump's
    path follows whichever alias is set, and is None when the recorder or its dump is off."""
    fr = FlightRecorder(
        settings=((("A_SIZE", "OLD_SIZE"), "2000"), (("A_DUMP",), "1")),
        file_vars=("A_FILE", "OLD_FILE"),
        file_name="x",
    )
    assert fr.settings_for("/h", {}) == {"A_SIZE": "2000", "A_DUMP": "1", "A_FILE": "/h/x"}
    assert fr.settings_for("/h", {"OLD_SIZE": "9", "OLD_FILE": "/u/"}) == {"A_DUMP": "1"}
    assert fr.dump_path({"OLD_FILE": "/u/p_"}, 3) == "/u/p_3"
    assert fr.dump_path({"A_FILE": "/h/x", "OLD_FILE": "/u/p_"}, 0) == "/h/x0"
    assert fr.dump_path({"A_FILE": "/h/x", "A_DUMP": "0"}, 0) is None
    assert fr.dump_path({"A_FILE": "/h/x", "OLD_SIZE": "0"}, 0) is None
    assert fr.dump_path({"A_FILE": "/h/x", "A_SIZE": "5", "OLD_SIZE": "0"}, 0) == "/h/x0"
    assert fr.dump_path({}, 0) is None


def test_the_cuda_backend_declares_the_nccl_recorder() -> None:
    import devlayer.backends.cuda  # noqa: F401  (registers on import)

    fr = FLIGHT_RECORDERS["nccl"]
    assert fr.file_vars == _FILE_VARS
    assert fr.settings_for("/h", {})["TORCH_FR_BUFFER_SIZE"] == "2000"
