"""Every example in a docstring runs (STYLE.md: Google-style docstrings with examples)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "devlayer",
    "devlayer.errors",
    "devlayer.launchers",
    "devlayer.devices",
    "devlayer.registry",
    "devlayer.lifecycle",
    "devlayer.comm",
    "devlayer.multiproc",
    "devlayer.farm",
    "devlayer.cli.bench",
    "devlayer.testing",
    "devlayer.train.data",
    "devlayer.train.model",
    "devlayer.train.seed",
    "devlayer.train.trainer",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, clean_env):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
