"""Modules have one job and no import circles: the import graph of expertbits is acyclic, counting
imports inside functions too (a deferred import is still a circle), and kernels/ needs only torch
and triton."""

import ast

import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"flows": "expertbits.flows", "tasks": "expertbits.tasks", "kernels": "expertbits.kernels",
            "infra/zoo": "expertbits.zoo"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_kernels_need_only_torch_and_triton():
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                root = n.split(".")[0]
                assert root in {"torch", "triton", "os", "math", "dataclasses", "typing", "__future__", "logging", "functools",
                                "expertbits"} and not n.startswith(("expertbits.tasks", "expertbits.flows")), (path.name, n)


def _expertbits_imports(module: str) -> set[str]:
    """expertbits.tasks / expertbits.kernels modules `module` imports anywhere in its source
    (function-level imports included)."""
    import importlib
    import inspect

    package = module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(importlib.import_module(module)))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + ("." + base if base else "")
            names = [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
            found |= {n for n in names if n.startswith(("expertbits.tasks.", "expertbits.kernels."))}
    return found


@pytest.mark.parametrize("stage, seeds", [
    ("calibration", ("calibrate", "sequential")), ("quantization", ("quantize", "sequential")),
    ("league", ("league",)), ("validation", ("validate",)), ("evaluation", ("evaluate",))])
def test_a_stage_cache_key_covers_the_code_its_work_runs(stage, seeds):
    """Editing any module a stage's work reaches must change the stage's cache key."""
    from expertbits.tasks.stage_io import STAGE_CODE

    todo = [f"expertbits.tasks.{s}" for s in seeds]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(_expertbits_imports(m) - seen)
    missing = sorted(seen - set(STAGE_CODE[stage]) - {"expertbits.tasks.errors", "expertbits.tasks.records"})
    assert not missing, f"{stage}: its cache key ignores {missing}; add them to stage_io.STAGE_CODE"
