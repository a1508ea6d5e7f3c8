"""The training-curves figure (docs/cli.md, README's before the docs site) comes from the
command printed above it."""

from __future__ import annotations

import json
import re
import shlex

from tests.helpers import ROOT


def _readme_command() -> list[str]:
    text = (ROOT / "docs" / "cli.md").read_text()
    found = re.search(
        r"This one comes from\s+`(torchrun [^`]+examples/cifar_resnet\.py[^`]+)`", text
    )
    assert found, "docs/cli.md: the command that draws docs/img/cifar-curves.png is missing"
    return shlex.split(found.group(1))


def test_r5_r9_the_readme_curves_match_their_command_and_converge():
    """R5-R9: docs/img/cifar-metrics.jsonl (drawn as docs/img/cifar-curves.png) holds one row
    per epoch of the README's command, at its learning rate (doubled over 2 ranks by
    ``--lr-scaling linear``), and the curve converges: no early stop, validation accuracy
    at least 0.95 at the end, training loss down tenfold. A changed command without a new
    figure, or the old diverging ``--lr 0.05`` run, fails."""
    argv = _readme_command()
    option = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    rows = [
        json.loads(line)
        for line in (ROOT / "docs/img/cifar-metrics.jsonl").read_text().splitlines()
    ]
    assert "--nproc-per-node=2" in argv and {r["world_size"] for r in rows} == {2}
    assert [r["epoch"] for r in rows] == list(range(1, int(option["--epochs"]) + 1))
    assert {r["lr"] for r in rows} == {2 * float(option["--lr"])}
    assert all("stopped_by" not in r or r["stopped_by"] == "max_epochs" for r in rows)
    assert rows[-1]["val_accuracy"] >= 0.95
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 10
