"""The getting-started page's Trainer script runs as the page says (docs/getting-started.md)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import PY, ROOT, subprocess_env

pytestmark = pytest.mark.e2e

LAST = re.compile(r"^val_loss ([\d.]+) on 2 rank\(s\)$", re.M)


def _page_script() -> str:
    """The ``python`` block that follows "Save this as `train.py`" on the page."""
    text = (ROOT / "docs" / "getting-started.md").read_text()
    after = text[text.index("Save this as `train.py`") :]
    found = re.search(r"```python\n(.*?)```", after, flags=re.S)
    assert found, "docs/getting-started.md: the train.py block is missing"
    return found.group(1)


def _torchrun(cwd: object) -> str:
    proc = subprocess.run(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py"],
        env=subprocess_env(DEVLAYER_BACKEND="cpu"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.timeout(420)
def test_d26_5_the_getting_started_trainer_runs_and_resumes_as_the_page_says(tmp_path):
    """D26-5: docs/getting-started.md's ``train.py``, run as the page says under
    ``torchrun --nproc-per-node=2``, prints ``val_loss ... on 2 rank(s)`` with a converged
    loss (below 0.01; the page shows 0.0032) and writes ``ckpt/`` and ``metrics.jsonl``;
    the same line again resumes from ``ckpt/`` and stops at once with the same result."""
    (tmp_path / "train.py").write_text(_page_script())
    first = _torchrun(tmp_path)
    (loss,) = LAST.findall(first)
    assert float(loss) < 0.01, first
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 20
    assert any(p.name.startswith("step-") for p in (tmp_path / "ckpt").iterdir())
    again = _torchrun(tmp_path)
    assert "resumed from ckpt/step-" in again, again
    assert LAST.findall(again) == [loss]
