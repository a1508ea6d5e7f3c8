"""devlayer plot: curves from a real Trainer metrics file, as one PNG of the asked size."""

from __future__ import annotations

import struct
import sys

import pytest

from devlayer.cli import main
from tests.helpers import toy_trainer


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory):
    """A metrics file written by a real (one-process) Trainer run with validation."""
    import torch
    from torch.utils.data import TensorDataset

    import devlayer

    folder = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = (x.sum(1) > 0).long()
    trainer = toy_trainer(
        torch.nn.Linear(3, 2),
        loss_fn=torch.nn.functional.cross_entropy,
        lr=0.5,
        batch_size=16,
        max_epochs=3,
        metrics_file=folder / "metrics.jsonl",
    )
    try:
        trainer.fit(TensorDataset(x, y), TensorDataset(x, y))
    finally:
        devlayer.shutdown()
    return folder / "metrics.jsonl"


def test_plot_writes_a_png_of_the_asked_size_with_the_expected_series(
    metrics_file, tmp_path, capsys
):
    out = tmp_path / "curves.png"
    assert main(["plot", str(metrics_file), "-o", str(out), "--size", "900x300"]) == 0
    assert _png_size(out) == (900, 300)
    said = capsys.readouterr().out
    assert "3 epoch(s)" in said
    for name in ("train_loss", "val_loss", "val_accuracy", "samples_per_sec"):
        assert name in said, said

    from devlayer.cli.plot import plot_metrics, read_metrics

    series = plot_metrics(read_metrics(metrics_file), tmp_path / "again.png")
    assert [e for e, _ in series["train_loss"]] == [1, 2, 3]
    assert series["train_loss"][-1][1] < series["train_loss"][0][1]  # it learned
    assert _png_size(tmp_path / "again.png") == (1500, 450)  # the default size


def test_plot_default_output_is_beside_the_metrics_file(metrics_file, tmp_path):
    copy = tmp_path / "m.jsonl"
    copy.write_text(metrics_file.read_text())
    assert main(["plot", str(copy)]) == 0
    assert (tmp_path / "m.png").is_file()


def test_a_resumed_run_appending_an_epoch_again_keeps_the_later_line(tmp_path):
    from devlayer.cli.plot import read_metrics

    f = tmp_path / "m.jsonl"
    f.write_text(
        '{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2, "train_loss": 9.0}\n'
        '{"epoch": 2, "train_loss": 1.5}\n\n'
    )
    assert read_metrics(f) == {1: {"epoch": 1.0, "train_loss": 2.0},
                               2: {"epoch": 2.0, "train_loss": 1.5}}  # fmt: skip


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "no epochs recorded"),
        ('{"epoch": 1}\nnot json\n', "m.jsonl:2: not JSON"),
        ("[1, 2]\n", "m.jsonl:1: expected a JSON object with an integer 'epoch'"),
    ],
)
def test_bad_metrics_files_are_named_with_the_line(tmp_path, capsys, content, expected):
    f = tmp_path / "m.jsonl"
    f.write_text(content)
    assert main(["plot", str(f)]) == 2
    assert expected in capsys.readouterr().err


def test_missing_file_and_bad_size_are_clear(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such metrics file" in capsys.readouterr().err
    f = tmp_path / "m.jsonl"
    f.write_text('{"epoch": 1, "train_loss": 1.0}\n')
    assert main(["plot", str(f), "--size", "big"]) == 2
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err


def test_without_matplotlib_the_message_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    f = tmp_path / "m.jsonl"
    f.write_text('{"epoch": 1, "train_loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plot", str(f)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'devlayer[plot]'" in err
    assert not (tmp_path / "m.png").exists()


def test_a_partial_epochs_position_is_not_drawn_as_a_metric(tmp_path):
    """max_steps inside an epoch writes partial/batches/batches_per_epoch: bookkeeping."""
    from devlayer.cli.plot import plot_metrics, read_metrics

    f = tmp_path / "m.jsonl"
    f.write_text(
        '{"epoch": 1, "train_loss": 2.0, "val_loss": 2.5, "samples_per_sec": 9.0}\n'
        '{"epoch": 2, "train_loss": 1.0, "val_loss": 1.5, "samples_per_sec": 9.0, '
        '"partial": true, "batches": 3, "batches_per_epoch": 7, "stopped_by": "max_steps"}\n'
    )
    series = plot_metrics(read_metrics(f), tmp_path / "m.png")
    assert sorted(series) == ["samples_per_sec", "train_loss", "val_loss"]


def test_e23_8_plot_marks_a_world_size_change(tmp_path, capsys):
    """E23-8: a metrics file with a ``world_size_change`` line (what a resume at another
    world size appends) plots its epochs as before, draws no curve from the event's fields,
    and marks the change (old and new size, step) on the figure; the event is not an epoch."""
    import json

    from devlayer.cli.plot import read_events, read_metrics

    f = tmp_path / "m.jsonl"
    lines = [
        {"epoch": 1, "train_loss": 1.0, "world_size": 2, "global_step": 13},
        {
            "event": "world_size_change",
            "global_step": 17,
            "epoch": 1,
            "old_world_size": 2,
            "new_world_size": 1,
            "rederived": {"grad_accum": [1, 2]},
        },
        {"epoch": 2, "train_loss": 0.5, "world_size": 1, "global_step": 26},
    ]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert sorted(read_metrics(f)) == [1, 2]
    assert [e["new_world_size"] for e in read_events(f)] == [1]
    out = tmp_path / "m.png"
    assert main(["plot", str(f), "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "2 epoch(s); series train_loss; marked world 2->1 @ step 17" in said, said
    assert _png_size(out) == (1500, 450)
