"""The code stays readable: short classes and functions, and a `tta adapt --help` that fits a screen."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tta_cli"
MAX_CLASS_LINES = 200
MAX_FUNCTION_LINES = 80  # of body: a Typer command's option list is its signature, not its body
NOT_YET_SPLIT = {("train/loop.py", "train")}  # tta_cli/train is outside the layout change that added this test


def body_lines(node: ast.AST) -> int:
    """Lines from the first statement after the docstring to the end."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def is_triton_kernel(node: ast.AST) -> bool:
    return any("jit" in ast.unparse(decorator) for decorator in node.decorator_list)


def oversized() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                found.append(f"class {where}:{node.name}")
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_function and not is_triton_kernel(node) and (where, node.name) not in NOT_YET_SPLIT:
                if body_lines(node) > MAX_FUNCTION_LINES:
                    found.append(f"function {where}:{node.name}")
    return found


def test_no_class_over_200_lines_and_no_function_over_80():
    assert oversized() == []


def test_adapt_help_fits_in_60_lines():
    environment = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run([sys.executable, "-m", "tta_cli.cli", "adapt", "--help"], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) <= 60
