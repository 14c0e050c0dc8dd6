"""The code's shape, checked from its syntax tree (ruff has no length rule; import-linter checks
imports only): no function over 60 lines and no module over 400 in the product packages, but a
module that says why in a `Length:` line of its docstring (the local cluster's kubelet); and
the API vocabulary defined in medforge_common alone."""

from __future__ import annotations

import ast
from enum import Enum
from pathlib import Path

import pytest

from medforge_common import api

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [
    "operator/medforge_operator",
    "common/medforge_common",
    "common/medforge_ml",
    "merger-image/medforge_merger",
    "trainer-image/medforge_trainer",
    "cli/medforge_cli",
    "localcluster/medforge_localcluster",
]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
# Only these may say why they are longer (a `Length:` line in the module docstring).
MAY_EXCEED = {"localcluster/medforge_localcluster/kubelet.py"}


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_there_are_modules_to_check() -> None:
    assert len(modules()) > 80


def test_no_function_is_over_60_lines() -> None:
    long = [
        f"{name(p)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for p in modules()
        if name(p) not in MAY_EXCEED
        for node in ast.walk(parsed(p))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_no_module_is_over_400_lines_without_a_reason() -> None:
    long = []
    for p in modules():
        lines = len(p.read_text().splitlines())
        if lines <= MAX_MODULE_LINES:
            continue
        doc = ast.get_docstring(parsed(p)) or ""
        if name(p) in MAY_EXCEED and "\nLength:" in f"\n{doc}":
            continue
        long.append(f"{name(p)} ({lines} lines)")
    assert not long, "split these modules:\n" + "\n".join(long)


# Kubernetes' own words (a Job's and a pod's conditions and phases) are not ours to define.
KUBERNETES_WORDS = {"Active", "Complete", "Failed", "Missing", "Pending", "Running", "Succeeded"}
VOCABULARY = {
    m.value
    for e in vars(api).values()
    if isinstance(e, type) and issubclass(e, Enum) and e.__module__ == api.__name__
    for m in e
    if isinstance(m.value, str)
} - KUBERNETES_WORDS


def test_only_medforge_common_defines_the_vocabulary() -> None:
    """No enum or constant elsewhere restates a phase, condition, reason or exit code."""
    found = []
    for p in modules():
        if "/medforge_common/" in str(p):
            continue
        for node in ast.walk(parsed(p)):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name | ast.Attribute) and "Enum" in ast.unparse(b)
                for b in node.bases
            ):
                values = {
                    s.value.value
                    for s in node.body
                    if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                }
                if values & VOCABULARY:
                    found.append(f"{name(p)}:{node.lineno} enum {node.name}")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
                if any(t.endswith("_EXIT") for t in targets):
                    found.append(f"{name(p)}:{node.lineno} {targets[0]}")
    assert not found, "use medforge_common.api instead:\n" + "\n".join(found)
