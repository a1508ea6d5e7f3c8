"""A griffe extension for the docs site, applied to each docstring before griffe parses it.

devlayer's docstrings write ``Example:`` (Google style, as STYLE.md asks); griffe reads
doctest blocks only under ``Examples:`` and would render ``>>>`` lines as Markdown quotes,
so the header is renamed. Sphinx roles (``:class:`State```) become code spans."""

from __future__ import annotations

import re
from typing import Any

import griffe

HEADER = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)
ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|exc|obj):`~?([^`]+)`")


class ExampleSections(griffe.Extension):
    """``Example:`` sections read as ``Examples:``; Sphinx roles as code spans."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Rewrite each object's docstring before griffe parses it."""
        if obj.docstring is not None:
            text = HEADER.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = ROLE.sub(r"`\1`", text)
