"""tools/longest_functions.py: functions ranked by lines of code, not by lines on the page."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.helpers import longest_functions_tool

_tool = longest_functions_tool


SOURCE = textwrap.dedent(
    '''
    def documented(a, b):
        """A long reference.

        Args:
            a: The first.
            b: The second.

        Returns:
            Their sum.
        """
        # Why it is written this way,
        # over two lines of comment.

        total = a + b
        return total


    def dense(items):
        out = []
        for item in items:
            out.append(
                item * 2
            )
        return out
    '''
)


def test_functions_are_ranked_by_code_lines(tmp_path: Path) -> None:
    """The ranking counts code only: docstrings, comments and blank lines are left out, so a
    dense function outranks a longer, well-documented one (Trainer._fit stayed out of the
    top ten while ranked by total lines)."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(SOURCE)
    found = _tool().functions(["pkg"], root=tmp_path)
    assert [(code, name) for code, _, name in found] == [
        (7, "pkg/m.py:19 dense"),
        (3, "pkg/m.py:2 documented"),
    ]
    assert [lines for _, lines, _ in found] == [7, 15]
