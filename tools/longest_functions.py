"""List the longest functions in the library (issue 15: none over ~60 lines without a reason).

Usage: ``python tools/longest_functions.py [N] [FOLDER ...]`` (default: 10, devlayer backends).
Functions are ranked by their lines of code: from ``def`` to the last line, leaving out the
docstring, comment lines and blank lines (a long argument reference or a well-explained step
is not a long function). The second column is every line, for comparison.

tests/unit/test_rules.py holds the library to at most 60 code lines per function; a function
over it only by a signature that lists its options (:meth:`Size.only_signature_over`) is
exempt, and is marked ``(signature)`` here.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

#: The most code lines a library function may have (tests/unit/test_rules.py).
LIMIT = 60

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


class Size(NamedTuple):
    """One function's size.

    Attributes:
        code: Its lines of code, signature included (no docstring, comments, blank lines).
        lines: All its lines.
        where: ``"path:line name"``.
        signature: The code lines of its signature (``def`` to the line before the body).
        params: The entries the signature lists: parameters, and a bare ``*`` or ``/``.
    """

    code: int
    lines: int
    where: str
    signature: int
    params: int

    def only_signature_over(self, limit: int) -> bool:
        """Over ``limit`` only by a signature that lists options: the body alone fits, and
        every signature line past the ``def`` and closing lines holds an entry (no default
        expression over several lines)."""
        return self.code - self.signature <= limit and self.signature <= self.params + 2


def _entries(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The entries of the signature: each parameter, and a bare ``*`` or ``/`` marker."""
    a = node.args
    params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return params + bool(a.kwonlyargs and not a.vararg) + bool(a.posonlyargs)


def sizes(source: str, where: str) -> list[Size]:
    """The :class:`Size` of each function in ``source`` (``where`` names the file)."""
    code = code_line_numbers(source)
    found: list[Size] = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            doc = _docstring_lines(node)
            count = sum(1 for n in span if n in code and n not in doc)
            head = range(node.lineno, max(node.body[0].lineno, node.lineno + 1))
            signature = sum(1 for n in head if n in code)
            name = f"{where}:{node.lineno} {node.name}"
            found.append(Size(count, len(span), name, signature, _entries(node)))
    return found


def measure(source: str, where: str) -> list[tuple[int, int, str]]:
    """``(code lines, lines, "where:line name")`` for each function in ``source``."""
    return [(s.code, s.lines, s.where) for s in sizes(source, where)]


def all_sizes(folders: list[str], root: Path = ROOT) -> list[Size]:
    """The :class:`Size` of each function in ``folders`` (relative to ``root``), the most
    code first."""
    found: list[Size] = []
    for folder in folders:
        base = root / folder
        for path in [base] if base.is_file() else sorted(base.rglob("*.py")):
            found += sizes(path.read_text(), path.relative_to(root).as_posix())
    return sorted(found, key=lambda f: (-f.code, -f.lines, f.where))


def functions(folders: list[str], root: Path = ROOT) -> list[tuple[int, int, str]]:
    """``(code lines, lines, "path:line name")`` for each function in ``folders`` (relative
    to ``root``), the most code first."""
    return [(s.code, s.lines, s.where) for s in all_sizes(folders, root)]


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv and argv[0].isdigit() else 10
    folders = [a for a in argv if not a.isdigit()] or ["devlayer", "backends"]
    print(" code  lines  function")
    for size in all_sizes(folders)[:count]:
        mark = "  (signature)" if size.code > LIMIT and size.only_signature_over(LIMIT) else ""
        print(f"{size.code:5d}  {size.lines:5d}  {size.where}{mark}")


if __name__ == "__main__":
    main(sys.argv[1:])
