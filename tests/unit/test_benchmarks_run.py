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


def _checkpoint_records() -> list[dict]:
    """benchmarks/async_checkpoint.py's records, figures made up."""
    runs = [
        ("none", None, 100.0),
        ("sync-ddp", 2.0, 60.0),
        ("async-ddp", 0.1, 90.0),
        ("sync-fsdp", 4.0, 50.0),
        ("async-fsdp", 0.2, 80.0),
    ]
    out: list[dict] = [
        {
            "mode": mode,
            "rank": rank,
            "params_m": 50.3,
            "saves": 0 if blocked is None else 3,
            "blocked_s_median": blocked,
            "samples_per_s": sps,
            "checkpoint_mb": 0.0 if blocked is None else 576.0,
            "peak_rss_mb": 2000.0,
        }
        for mode, blocked, sps in runs
        for rank in (0, 1)
    ]
    out += [
        {"type": "writer", "writer": w, "samples_per_s": s, "writes": n, "ratio": s / 100.0}
        for w, s, n in (("none", 100.0, 0), ("thread", 95.0, 4), ("process", 90.0, 3))
    ]
    return out


def test_checkpoints_step_runs_every_mode_and_quick_only_devlayers(tmp_path: Path) -> None:
    """The checkpoints step is part of the suite; --quick keeps its smoke run to devlayer's
    own modes (the peers' saves run in a full run only)."""
    assert "checkpoints" in run.STEPS
    jsonl = tmp_path / "checkpoints.jsonl"
    full = run.checkpoints_command(4, False, jsonl)
    assert full[1].endswith("async_checkpoint.py")
    assert full[2:] == ["--all", "--writers", "--nproc", "4", "--json", str(jsonl)]
    quick = run.checkpoints_command(2, True, jsonl)
    assert quick[-3:] == ["--quick", "--modes", "none,sync-ddp,async-ddp,sync-fsdp,async-fsdp"]


def test_summary_shows_checkpoint_stalls_and_writers(tmp_path: Path) -> None:
    _write(tmp_path / "checkpoints.jsonl", _checkpoint_records())
    args = argparse.Namespace(quick=False, nproc=2)
    text = run.summary(tmp_path, run.environment(), args, wall=1.0)
    assert "## Checkpoint stalls (50.3 M parameters, 2 ranks" in text
    assert "| async-fsdp | 0.200 | 0.05x | 80.0 | 0.80x | 576 |" in text
    assert "| async-ddp | 0.100 | 0.05x | 90.0 | 0.90x | 576 |" in text
    assert "| thread | 95.0 | 0.95x | 4 |" in text


def test_summary_without_the_checkpoints_step_has_no_checkpoint_tables(tmp_path: Path) -> None:
    text = run.summary(tmp_path, run.environment(), argparse.Namespace(quick=True, nproc=2), 1.0)
    assert "Checkpoint stalls" not in text and "Background writer" not in text


def test_a_skipped_checkpoint_mode_shows_its_error_on_one_table_line() -> None:
    """A mode whose torchrun failed (Fabric without lightning) is one table row naming the
    error, not torchrun's multi-line footer that breaks the markdown table."""
    from benchmarks.async_checkpoint import skip_reason, table_rows

    stderr = (
        "Traceback (most recent call last):\n"
        '  File "benchmarks/async_checkpoint.py", line 1, in <module>\n'
        "ModuleNotFoundError: No module named 'lightning'\n"
        "E1207 failed\n[0]:\n  time      : 2026-12-07_18:41:40\n  host      : localhost\n"
        "============================================================\n"
    )
    reason = skip_reason(stderr)
    assert reason == "ModuleNotFoundError: No module named 'lightning'"
    assert skip_reason("\n just this \n\n") == "just this"
    rows = table_rows([{"mode": "fabric", "rank": 0, "skipped": stderr}])
    assert rows[0][:2] == ["fabric", "skipped"] and "\n" not in "".join(rows[0])
    assert rows[0][2].startswith("ModuleNotFoundError")
