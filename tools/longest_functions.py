"""List the longest functions in the library (issue 15: none over ~60 lines without a reason).

Usage: ``python tools/longest_functions.py [N] [FOLDER ...]`` (default: 10, devlayer backends).
Functions are ranked by their lines of code: from ``def`` to the last line, leaving out the
docstring, comment lines and blank lines (a long argument reference or a well-explained step
is not a long function). The second column is every line, for comparison.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Tokens that are not code: a line holding only these is a comment or blank line.
_NOT_CODE = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def code_line_numbers(source: str) -> set[int]:
    """The numbers of the lines in ``source`` that hold code (a string spanning lines counts
    on each of them; a docstring is code here, :func:`measure` takes it out)."""
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in _NOT_CODE:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> range:
    first = node.body[0]
    if ast.get_docstring(node) is None or first.end_lineno is None:
        return range(0)
    return range(first.lineno, first.end_lineno + 1)


def measure(source: str, where: str) -> list[tuple[int, int, str]]:
    """``(code lines, lines, "where:line name")`` for each function in ``source``."""
    code = code_line_numbers(source)
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            doc = _docstring_lines(node)
            count = sum(1 for n in span if n in code and n not in doc)
            found.append((count, len(span), f"{where}:{node.lineno} {node.name}"))
    return found


def functions(folders: list[str], root: Path = ROOT) -> list[tuple[int, int, str]]:
    """``(code lines, lines, "path:line name")`` for each function in ``folders`` (relative
    to ``root``), the most code first."""
    found: list[tuple[int, int, str]] = []
    for folder in folders:
        base = root / folder
        for path in [base] if base.is_file() else sorted(base.rglob("*.py")):
            found += measure(path.read_text(), path.relative_to(root).as_posix())
    return sorted(found, key=lambda f: (-f[0], -f[1], f[2]))


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv and argv[0].isdigit() else 10
    folders = [a for a in argv if not a.isdigit()] or ["devlayer", "backends"]
    print(" code  lines  function")
    for code, lines, name in functions(folders)[:count]:
        print(f"{code:5d}  {lines:5d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
