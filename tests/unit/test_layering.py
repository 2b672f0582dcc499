"""Modules have one job and no import circles: the import graph of expertbits is acyclic, counting
imports inside functions too (a deferred import is still a circle), the subpackages of tasks/
import only those below them (the order of expertbits.tasks' docstring), and kernels/ needs only
torch and triton."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"flows": "expertbits.flows", "tasks": "expertbits.tasks", "kernels": "expertbits.kernels",
            "infra/zoo": "expertbits.zoo"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            dotted = ".".join([package, *parts])
            out[dotted.removesuffix(".__init__")] = path
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


# bottom to top: a subpackage may import the root modules and those before it, never those after
LAYERS = ("store", "checkpoints", "model", "quantization", "allocation", "measure", "stages")
ROOT_MODULES = ("errors", "records", "meter", "placement")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[:2] != ["expertbits", "tasks"] or len(parts) < 3:
        return None
    return -1 if parts[2] in ROOT_MODULES else LAYERS.index(parts[2]) if parts[2] in LAYERS else None


def test_tasks_subpackages_import_only_those_below_them():
    modules = _modules()
    assert {m.split(".")[2] for m in modules if m.startswith("expertbits.tasks.")} == {*LAYERS, *ROOT_MODULES, "loader"}
    wrong = []
    for name, path in modules.items():
        own = _layer(name)
        if own is None:
            continue
        for target in _imports(name, path, set(modules)):
            theirs = _layer(target)
            if theirs is not None and theirs > own or target.startswith("expertbits.flows") or \
                    own == -1 and target.startswith("expertbits.") and theirs != -1:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(wrong)


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    import importlib

    for layer in LAYERS:
        doc = importlib.import_module(f"expertbits.tasks.{layer}").__doc__ or ""
        assert "May import:" in doc and len(doc.split()) > 20, layer


def test_kernels_need_only_torch_and_triton():
    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                root = n.split(".")[0]
                assert root in {"torch", "triton", "os", "math", "dataclasses", "typing", "__future__", "logging", "functools", "contextlib", "threading",
                                "expertbits"} and not n.startswith(("expertbits.tasks", "expertbits.flows")), (path.name, n)


def _expertbits_imports(module: str) -> set[str]:
    """expertbits.tasks / expertbits.kernels modules `module` imports anywhere in its source
    (function-level imports included), whole modules or names from them."""
    import importlib
    import importlib.util
    import inspect

    mod = importlib.import_module(module)
    package = module if inspect.getsourcefile(mod).endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(mod))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                child = f"{base}.{a.name}"
                found.add(child if importlib.util.find_spec(base).submodule_search_locations
                          and importlib.util.find_spec(child) else base)
    return {n for n in found if n.startswith(("expertbits.tasks.", "expertbits.kernels."))}


@pytest.mark.parametrize("stage, seeds", [
    ("calibration", ("allocation.calibrate", "quantization.gptq_sequential")),
    ("quantization", ("quantization.writer", "quantization.gptq_sequential")), ("league", ("measure.league",)),
    ("validation", ("measure.kernel_check", "measure.fused_check")), ("evaluation", ("measure.evaluate",))])
def test_a_stage_cache_key_covers_the_code_its_work_runs(stage, seeds):
    """Every module a stage's work reaches, walked here independently of stage_io's own walk, is
    in the stage's key (whole, or the definitions the stage reaches in it)."""
    from expertbits.tasks.stages.stage_io import covered

    todo = [f"expertbits.tasks.{s}" for s in seeds]
    seen: set[str] = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += sorted(_expertbits_imports(m) - seen)
    missing = sorted(seen - {m for m, _ in covered(stage)[0]})
    assert not missing, f"{stage}: its cache key ignores {missing}"
