"""Every example in a docstring runs (STYLE.md: Google-style docstrings with examples)."""

from __future__ import annotations

import doctest
import importlib

import pytest


def _modules() -> list[str]:
    """Every module of the installed package (no hand-kept list that a new module can miss)."""
    import pkgutil

    import devlayer.backends

    import devlayer

    names = ["devlayer"]
    names += [m.name for m in pkgutil.walk_packages(devlayer.__path__, "devlayer.")]
    names += [
        f"devlayer.backends.{m.name}" for m in pkgutil.iter_modules(devlayer.backends.__path__)
    ]
    return sorted(set(names) - {"devlayer.__main__"})


MODULES = _modules()


def test_module_discovery_finds_every_layer():
    for name in ("devlayer.train.checkpoint", "devlayer.cli.plot", "devlayer.backends.cuda"):
        assert name in MODULES


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, clean_env):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
