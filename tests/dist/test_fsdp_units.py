"""Which submodules become FSDP units, on 2 real gloo ranks (issue 20).

The model of ``tests/dist/fsdp_worker.py``: ``Linear(8, 64)`` has 576 parameters,
``Linear(64, 64)`` 4160 and ``Linear(64, 1)`` 65 (indices 0, 2 and 4 of the Sequential).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import devlayer
from devlayer.testing import run_ranks
from tests.dist.fsdp_worker import make_model

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def _units(model: torch.nn.Module) -> list[str]:
    """Names of the FSDP units of ``model`` (``""`` is the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def unit_names() -> dict[str, Any]:
    """The units ``prepare_model`` and the Trainer create for each ``fsdp=`` option."""
    out = {
        name: _units(devlayer.prepare_model(make_model(), "fsdp", fsdp=options))
        for name, options in {
            "default": {},
            "min_params=576": {"min_params": 576},
            "min_params=577": {"min_params": 577},
            "modules": {"modules": [torch.nn.Linear]},
        }.items()
    }
    seen: list[str] = []

    class Record(devlayer.train.Callback):
        def on_fit_start(self, trainer: Any) -> None:
            seen.extend(_units(trainer.wrapped_model))

    model = make_model()
    trainer = devlayer.Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        torch.nn.functional.mse_loss,
        strategy="fsdp",
        fsdp={"modules": [torch.nn.Linear]},
        batch_size=8,
        max_epochs=1,
        callbacks=[Record()],
        progress=False,
        num_workers=0,
        resume=None,
    )
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    trainer.fit(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)))
    out["trainer modules"] = seen
    return out


def test_r5_r4_fsdp_units_by_size_and_by_class(clean_env):
    """R5-R4: ``shard_model`` makes a submodule of exactly ``min_params`` parameters its own
    unit (``>=``, not ``>``), one parameter short leaves it to the root, and
    ``fsdp={"modules": [...]}`` makes every instance of those classes a unit, through
    ``prepare_model`` and through the Trainer (ignored, the whole model would be one
    unit gathered at once). Every rank builds the same units."""
    r0, r1 = run_ranks(unit_names, 2, timeout=240)
    assert r0 == r1
    assert r0 == {
        "default": [""],  # 4801 parameters in all: below FSDP_MIN_PARAMS, the root only
        "min_params=576": ["", "0", "2"],
        "min_params=577": ["", "2"],
        "modules": ["", "0", "2", "4"],
        "trainer modules": ["", "0", "2", "4"],
    }
