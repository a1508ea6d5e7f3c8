"""List the longest functions in the library (issue 15: none over ~60 lines without a reason).

Usage: ``python tools/longest_functions.py [N] [FOLDER ...]`` (default: 10, devlayer backends).
A function's length counts its lines from ``def`` to its last line, docstring included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def functions(folders: list[str]) -> list[tuple[int, str]]:
    """``(lines, "path:line name")`` for every function and method in ``folders`` (or files)."""
    found: list[tuple[int, str]] = []
    for folder in folders:
        base = ROOT / folder
        for path in [base] if base.is_file() else sorted(base.rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    end = node.end_lineno or node.lineno
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append((end - node.lineno + 1, f"{where} {node.name}"))
    return sorted(found, reverse=True)


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv and argv[0].isdigit() else 10
    folders = [a for a in argv if not a.isdigit()] or ["devlayer", "backends"]
    for lines, name in functions(folders)[:count]:
        print(f"{lines:5d}  {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
