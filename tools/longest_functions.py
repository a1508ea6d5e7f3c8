"""List the longest functions in the library (issue 15: none over ~60 lines without a reason).

Usage: ``python tools/longest_functions.py [N] [FOLDER ...]`` (default: 10, devlayer backends).
A function's length counts its lines from ``def`` to its last line; the second column leaves
out its docstring (a long argument reference is not a long function).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def functions(folders: list[str]) -> list[tuple[int, int, str]]:
    """``(lines, lines without docstring, "path:line name")`` for each function in ``folders``."""
    found: list[tuple[int, int, str]] = []
    for folder in folders:
        base = ROOT / folder
        for path in [base] if base.is_file() else sorted(base.rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    end = node.end_lineno or node.lineno
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    doc = 0
                    first = node.body[0]
                    if ast.get_docstring(node) is not None and first.end_lineno is not None:
                        doc = first.end_lineno - first.lineno + 1
                    lines = end - node.lineno + 1
                    found.append((lines, lines - doc, f"{where} {node.name}"))
    return sorted(found, reverse=True)


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv and argv[0].isdigit() else 10
    folders = [a for a in argv if not a.isdigit()] or ["devlayer", "backends"]
    print("lines  no-doc  function")
    for lines, code, name in functions(folders)[:count]:
        print(f"{lines:5d}  {code:6d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
