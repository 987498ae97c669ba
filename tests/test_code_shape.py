"""The package stays in small pieces: no class over 400 lines, no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

import mig

MAX_CLASS = 400
MAX_FUNCTION = 80


def _too_long() -> list[str]:
    found = []
    package = Path(mig.__file__).parent
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION
            else:
                continue
            assert node.end_lineno is not None
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append(f"{path.relative_to(package)} {node.name}")
    return found


def test_no_class_over_400_lines_and_no_function_over_80() -> None:
    assert _too_long() == []
