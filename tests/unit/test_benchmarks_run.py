"""The benchmark runner's bookkeeping (no timing is asserted: the numbers here are made up)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import run


def _records() -> list[dict]:
    out = []
    for model, scale in (("mlp", 1000.0), ("cnn", 100.0)):
        for world, factor in ((1, 1.0), (2, 1.5)):
            for impl, speed in ((run.TRAIN_REF, 1.0), (run.TRAINER, 1.1)):
                for rep, noise in enumerate((0.9, 1.0, 1.1)):
                    out.append(
                        {
                            "type": "result",
                            "impl": impl,
                            "model": model,
                            "repeat": rep,
                            "world_size": world,
                            "samples_per_s": scale * factor * speed * noise,
                            "time_to_first_step_s": 0.01,
                        }
                    )
    return out


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_scaling_efficiency_is_speedup_over_ranks() -> None:
    rows = run.scaling_rows(_records(), nproc=2)
    by = {(r[0], r[1]): r for r in rows}
    assert by[("mlp", run.TRAIN_REF)][2:] == ["1000", "1500", "1.50x", "75%"]
    assert by[("cnn", run.TRAINER)][2:] == ["110", "165", "1.50x", "75%"]


def test_training_ratio_is_per_repeat_against_the_hand_loop() -> None:
    rows = {(r[0], r[1], r[2]): r for r in run.training_rows(_records())}
    assert rows[("mlp", "2", run.TRAINER)][4] == "1.100 [1.100, 1.100]x"
    assert rows[("mlp", "2", run.TRAIN_REF)][3] == "1500 [1350, 1650]"


def test_memory_rows_use_single_implementation_runs_only() -> None:
    records = [
        {"type": "memory", "impls": [run.TRAIN_REF], "peak_rss_mb_per_rank": [400.0, 410.0]},
        {"type": "memory", "impls": [run.TRAINER], "peak_rss_mb_per_rank": [405.0, 420.5]},
        {"type": "memory", "impls": [run.TRAIN_REF, run.TRAINER], "peak_rss_mb_per_rank": [9e9]},
    ]
    assert run.memory_rows(records) == [
        [run.TRAIN_REF, "400, 410", "410", "1.000x"],
        [run.TRAINER, "405, 420", "420", "1.026x"],
    ]


def test_summary_and_plots_from_a_results_folder(tmp_path: Path) -> None:
    _write(tmp_path / "training.jsonl", _records())
    _write(
        tmp_path / "collectives.jsonl",
        [
            {"type": "result", "section": "all_reduce", "impl": impl, "bytes": n, "us_per_call": n}
            for impl in ("raw", "devlayer")
            for n in (4, 1024)
        ],
    )
    env = run.environment()
    args = argparse.Namespace(quick=True, nproc=2)
    text = run.summary(tmp_path, env, args, wall=1.0)
    assert "## Scaling efficiency, world 1 -> 2" in text
    assert "python -m benchmarks.run --quick --nproc 2" in text
    if importlib.util.find_spec("matplotlib") is None:
        assert run.plots(tmp_path) == []
    else:
        made = run.plots(tmp_path)
        assert [p.name for p in made] == ["allreduce.png", "training.png"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made)


def test_bad_step_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run.main(["--only", "training,gpu", "--out", str(tmp_path)])
    assert info.value.code == 2
    assert "unknown step(s) ['gpu']" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
