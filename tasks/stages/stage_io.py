"""What every Prefect stage shares: cache keys, retry rule, progress, and the store layout of outputs.

Each stage's cache key is the sha256 of its input digests, its configuration, the code it runs
(as syntax trees: comments and docstrings do not count; in the modules shared by many stages only
the definitions the stage reaches) and the versions of the libraries that change its bytes, never a run id, so a rerun with the same inputs is all cache hits and changing
only the budget recomputes only allocation onward. A key whose objects are missing from the store
(or whose checkpoint left the local cache) is treated as a miss, so a cache never points at
nothing. Stage outputs are written to `objects/<stage>/<key>/` and `_stage.json` last.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import json
import pkgutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from ..checkpoints import fetch
from ..errors import ExpertbitsError, ValidationFailed
from ..records import CheckpointRecord, StageOutput
from ..store import tables
from ..store.storage import Store, sha256_file

# Each stage's entry points: its task, its key function and, for the per-layer stages, its unit of
# work. The code a key covers is derived from them (`covered`): the definitions they reach, and
# from there every definition or module those import, transitively.
_S, _P, _L = "expertbits.tasks.stages.quantize_tasks", "expertbits.tasks.stages.per_layer", "expertbits.tasks.stages.league_tasks"
_LAYERS = ("layer_work", "sequential_work", "_layer_key")
STAGE_ENTRIES: dict[str, dict[str, tuple[str, ...]]] = {
    "download": {_S: ("fetch_checkpoint", "_download_key")},
    "statistics": {_S: ("extract_statistics", "statistics_key"), _P: (*_LAYERS, "_statistics")},
    "routing": {_S: ("route_experts", "routing_key")},
    "calibration": {_S: ("calibrate_experts", "calibration_key"), _P: (*_LAYERS, "_calibration", "_gptq_calibration")},
    "allocation": {_S: ("allocate_bits", "allocation_key")},
    "quantization": {_S: ("quantize_experts", "quantization_key"), _P: (*_LAYERS, "_quantization", "_gptq_quantization")},
    "validation": {_S: ("validate_kernels", "validation_key"), _P: (*_LAYERS, "_validation")},
    "evaluation": {_S: ("evaluate_model", "evaluation_key")},
    "lm-eval": {_S: ("evaluate_tasks", "lm_eval_key")},
    "league": {_L: ("run_league", "league_key"), _P: ("league_cells", "cells_key")},
}
# Imported libraries that never change a stage's bytes: orchestration, transport, configuration.
# Every other library the covered code imports (torch, transformers, triton, safetensors, duckdb,
# pandas, numpy, scipy, matplotlib, ...) is in the key with its version.
# Libraries that write a stage's bytes through another one: transformers' tokenizers cut the texts,
# matplotlib writes its PNGs with Pillow, pandas holds its columns in numpy, lm-eval reads its
# tasks' data through datasets.
IMPLIED = {"transformers": ("tokenizers",), "matplotlib": ("pillow",), "pandas": ("numpy",),
           "lm_eval": ("datasets",)}
NOT_IN_KEYS = {"prefect", "prefect_dask", "distributed", "dask", "fsspec", "s3fs", "huggingface_hub", "pydantic",
               "botocore", "aiobotocore", "httpx", "httpx2", "filelock"}


def normalized_source(source: str, entries: tuple[str, ...] | None = None) -> str:
    """The code of `source` without what cannot change behaviour (comments, docstrings, layout):
    its AST. With `entries`, only the top-level definitions they reach by name, transitively."""
    tree = ast.parse(source)
    for node in ast.walk(tree):  # docstrings
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    nodes = tree.body if entries is None else _reached(tree, entries)
    # unparsed, not dumped: the AST's dump format changes between Python versions, its source form rarely
    return "\n".join(ast.unparse(n) for n in nodes)


@lru_cache(maxsize=None)  # parsed once per process: most modules are reached by several stages (read only)
def _tree(module: str) -> ast.Module:
    return ast.parse(inspect.getsource(importlib.import_module(module)))


def _imported(module: str, nodes: list[ast.AST]) -> tuple[dict[str, tuple[str, str | None]], set[str]]:
    """The imports among `nodes` (walked: function-level imports count) of `module`: (bound name ->
    (the expertbits module it comes from, the name imported from it, or None for the module
    itself), top-level names of the other libraries). `import expertbits.a.b` and star imports
    bind no name the code uses as such: they are keyed by their dotted name or `*module`."""
    package = module if inspect.getsourcefile(importlib.import_module(module)).endswith("__init__.py") \
        else module.rpartition(".")[0]
    bound, libraries = {}, set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("expertbits."):
                    bound[alias.asname or alias.name] = (alias.name, None)
                else:
                    libraries.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("expertbits"):
                libraries.add(base.split(".")[0])
                continue
            for alias in node.names:  # `from package import module`, or a name from a module
                if alias.name == "*":
                    bound[f"*{base}"] = (base, None)
                    continue
                child = f"{base}.{alias.name}"
                is_module = _is_package(base) and importlib.util.find_spec(child) is not None
                bound[alias.asname or alias.name] = (child, None) if is_module else (base, alias.name)
    return bound, libraries - {"__future__"}


@lru_cache(maxsize=None)
def _top_imports(module: str) -> tuple[list[ast.stmt], dict[str, tuple[str, str | None]], set[str]]:
    """The module's top-level import statements, and what they bind (`_imported`); read only."""
    tops = [n for n in _tree(module).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return (tops, *_imported(module, tops))


@lru_cache(maxsize=None)
def _names(module: str) -> frozenset[str]:
    """Every name the module's code uses anywhere."""
    return frozenset(n.id for n in ast.walk(_tree(module)) if isinstance(n, ast.Name))


@lru_cache(maxsize=None)
def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _reached(tree: ast.Module, entries: tuple[str, ...]) -> list[ast.stmt]:
    """The top-level statements of a module that its `entries` reach by name, transitively, and
    every top-level statement that is not a definition (it may change what any definition means)."""
    defined: dict[str, list[ast.stmt]] = {}
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, []).append(node)
        elif (isinstance(node, (ast.Assign, ast.AnnAssign)) and
              all(isinstance(t, ast.Name) for t in getattr(node, "targets", [getattr(node, "target", None)]))):
            for t in getattr(node, "targets", [getattr(node, "target", None)]):
                defined.setdefault(t.id, []).append(node)
        else:
            keep.append(node)
    todo = list(entries) + [n.id for k in keep for n in ast.walk(k) if isinstance(n, ast.Name)]
    while todo:
        for node in defined.pop(todo.pop(), []):
            keep.append(node)
            todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in defined]
    return [n for n in tree.body if any(n is k for k in keep)]


@lru_cache
def covered(stage: str) -> tuple[tuple[tuple[str, tuple[str, ...] | None], ...], tuple[str, ...]]:
    """What a stage's key covers, derived from the import graph: ((module, the definitions reached
    in it, or None for all of it), ...) and the other libraries that code imports.

    From the stage's entry points, every name a reached definition uses is followed to where it
    is imported from: a name imported from a module reaches that definition there (and what it
    uses, transitively); a module imported as a whole (`from ..store import tables`, imports
    inside functions included) is covered whole. This module is covered whole (it computes keys)."""
    reached: dict[str, set[str] | None] = {__name__: None}
    todo: list[tuple[str, str | None]] = [(__name__, None)]
    todo += [(m, e) for m, entries in STAGE_ENTRIES[stage].items() for e in entries]
    libraries: set[str] = set()
    done: set[tuple[str, str | None]] = set()
    while todo:
        module, name = todo.pop()
        if (module, name) in done or not module.startswith("expertbits"):
            continue
        done.add((module, name))
        if name is None:
            reached[module] = None
            if _is_package(module):  # `package.sub.f` reaches submodules through attributes
                spec = importlib.util.find_spec(module)
                todo += [(f"{module}.{m.name}", None) for m in pkgutil.iter_modules(spec.submodule_search_locations)]
        elif reached.get(module, set()) is not None:
            reached.setdefault(module, set()).add(name)
        tree = _tree(module)
        tops, top_bound, top_libs = _top_imports(module)
        code = tree.body if name is None else [n for n in _reached(tree, (name,)) if n not in tops]
        inner_bound, inner_libs = _imported(module, code)  # imports inside the covered definitions
        used = {n.id for node in code for n in ast.walk(node) if isinstance(n, ast.Name)}
        everywhere = _names(module)
        follow = list(inner_bound.values())  # imported where the covered code runs: whatever they bind
        for bound_name, target in top_bound.items():
            # used by the covered code; this name itself (a re-export); imported for its side effects
            # (used nowhere, e.g. registering a model type); dotted or star imports
            if (name is None or bound_name in used or bound_name == name or bound_name not in everywhere
                    or "." in bound_name or bound_name.startswith("*")):
                follow.append(target)
        todo += sorted(set(follow), key=lambda t: (t[0], t[1] or ""))
        libraries |= (top_libs if name is None else set()) | inner_libs | _libraries_used(tops, used, name)
    return (tuple(sorted((m, None if d is None else tuple(sorted(d))) for m, d in reached.items())),
            tuple(sorted(libraries - NOT_IN_KEYS)))


def _libraries_used(tops: list[ast.stmt], used: set[str], name: str | None) -> set[str]:
    """The other libraries whose top-level imports bind a name the covered code uses."""
    out = set()
    for node in tops:
        names = [a.asname or a.name.split(".")[0] for a in node.names]
        root = (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else None
        if isinstance(node, ast.ImportFrom) and (node.level or root == "expertbits"):
            continue
        for alias, bound in zip(node.names, names):
            if name is None or bound in used:
                out.add(root or alias.name.split(".")[0])
    return out - {"__future__"}


@lru_cache(maxsize=None)  # modules covered whole are shared by most stages
def _normalized(module: str, definitions: tuple[str, ...] | None) -> str:
    return normalized_source(inspect.getsource(importlib.import_module(module)), definitions)


@lru_cache
def code_version(stage: str) -> str:
    h = hashlib.sha256()
    for module, definitions in covered(stage)[0]:
        h.update(_normalized(module, definitions).encode())
    return h.hexdigest()[:16]


@lru_cache
def library_versions(stage: str) -> tuple[tuple[str, str], ...]:
    from importlib.metadata import version

    if stage == "download":  # copies and hashes: no library changes its bytes
        return ()
    dists = _distributions()
    # the release, not the build label (2.13.0+cpu and +cu130 compute these stages alike), so
    # Dask workers of one release agree on the keys whatever their accelerator
    names = {d for lib in covered(stage)[1] if lib in dists for d in dists[lib]}
    names |= {d for n in names for d in IMPLIED.get(n.lower(), ())}
    return tuple(sorted((d, version(d).split("+")[0]) for d in names))


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    """{top-level import name: distributions}: a scan of every installed package, done once."""
    from importlib.metadata import packages_distributions

    return packages_distributions()


def kernel_device() -> str:
    """Where the Triton kernels run, part of the validation keys: a check in the interpreter
    (on sampled rows, sliced layers) is not a check on a GPU."""
    import torch

    from expertbits.kernels.dequant_matmul import interpreted

    return "triton-interpreter" if interpreted() else f"cuda:{torch.cuda.get_device_name()}"


def same_kernels(kernels: str) -> None:
    """Refuse to validate where the kernels run otherwise than the flow decided (and keyed): e.g. a
    worker without a GPU would sample rows in the interpreter under a key that says every row on a GPU."""
    here = kernel_device()
    if here != kernels:
        raise ExpertbitsError(f"the kernels run on {here} in this process, and the flow validates them on {kernels}",
                              "run the flow and its Dask workers on machines with the same accelerator (or none)")


def stage_key(stage: str, *parts: Any) -> str:
    blob = json.dumps([stage, code_version(stage), library_versions(stage), parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def transient(task, task_run, state) -> bool:
    """Retry I/O errors only; bad input and numerics fail at once."""
    try:
        state.result()
    except ExpertbitsError:
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:
        return False
    return False


def progress_reporter(stage: str):
    """A callback that moves a progress artifact on the flow run and logs at each quarter."""
    logger = get_run_logger()
    artifact = create_progress_artifact(progress=0.0, description=f"{stage} progress")
    logged = [0.0]

    def report(fraction: float, message: str) -> None:
        update_progress_artifact(artifact_id=artifact, progress=round(100 * fraction, 1))
        if fraction >= min(1.0, logged[0] + 0.25):
            logged[0] = fraction
            logger.info(message)

    return report


def cache_key(stage: str, key_of: Callable[..., str], in_store: bool = True) -> Callable:
    """The Prefect cache_key_fn of a stage whose key `key_of` computes from the task's own
    parameters, by name: the task body calls the same `key_of`, so the key Prefect looks up and
    the key the stage writes under cannot differ. `in_store`: the stage's outputs are objects of
    the store, and a key whose objects left it is a miss (`miss_unless`)."""
    names = tuple(inspect.signature(key_of).parameters)

    def key_fn(ctx, parameters) -> str:
        key = key_of(**{n: parameters[n] for n in names})
        if not in_store:
            return key
        return miss_unless(ctx, Store(parameters["store"], parameters["storage_options"]), stage, key)

    return key_fn


def miss_unless(ctx, store: Store, stage: str, key: str) -> str:
    """The key, unless Prefect holds a record for it whose objects left the store: then a one-off miss."""
    record = ctx.result_store is not None and ctx.result_store.exists(key)
    if record and not _complete(store, f"objects/{stage}/{key}"):
        return f"{key}-rebuild-{uuid.uuid4().hex}"
    return key


def _complete(store: Store, prefix: str) -> bool:
    """`_stage.json` is there and so is every file it lists (gc or a user may have removed some)."""
    try:
        out = StageOutput.model_validate_json(store.read_bytes(f"{prefix}/_stage.json"))
    except (FileNotFoundError, ValueError):
        return False
    return all(store.exists(f"{prefix}/{rel}") for rel in out.files)


def publish_stage(store: Store, stage: str, key: str, local: Path, summary: dict,
                  present: dict[str, str] | None = None) -> StageOutput:
    """Upload a local folder as the stage's objects, `_stage.json` last. `present` lists files
    (name -> sha256) that per-layer tasks already wrote under the prefix; they are kept.

    Nothing is removed first: another run may be reading a copy there. Each file is replaced
    whole (storage.py). A concurrent run of the same key mostly writes the same bytes; where it
    does not (league timings, GPU float sums), publishing re-hashes every file against the record
    and refuses the mismatch, removing `_stage.json` so the next run rebuilds the stage."""
    prefix = f"objects/{stage}/{key}"
    files = {p.relative_to(local).as_posix(): sha256_file(p) for p in sorted(local.rglob("*")) if p.is_file()}
    # A failure leaves no _stage.json, so readers ignore the prefix and `expertbits gc` removes it
    # (never removed here: a concurrent run may be completing the same key).
    for rel in files:
        store.put_file(local / rel, f"{prefix}/{rel}")
    files = dict(sorted({**files, **(present or {})}.items()))
    gone = [rel for rel in (present or {}) if not store.exists(f"{prefix}/{rel}")]
    if gone:  # removed since the per-layer tasks wrote them (gc, a user): never a record of missing files
        raise ValidationFailed(f"{store.uri(prefix)}: {gone[:3]} written by the per-layer tasks are gone",
                               "rerun the flow: the missing layers are rebuilt")
    out = StageOutput(stage=stage, key=key, prefix=prefix, files=files, summary=summary)
    store.write_bytes(f"{prefix}/_stage.json", out.model_dump_json(indent=2).encode())
    return out


@dataclass(frozen=True)
class StageWork:
    """What a stage task works with: the store, its key, a temporary folder for what it reads,
    and `out`, the folder whose files it publishes as the stage's objects."""

    store: Store
    stage: str
    key: str
    tmp: Path
    out: Path

    def read(self, output: StageOutput, only: list[str] | None = None) -> Path:
        """A local folder with an earlier stage's files (`local_copy`)."""
        return local_copy(self.store, output, self.tmp, only)

    def publish(self, summary: dict, present: dict[str, str] | None = None) -> StageOutput:
        """`out` as the stage's objects, `_stage.json` last (`publish_stage`)."""
        return publish_stage(self.store, self.stage, self.key, self.out, summary, present)


@contextmanager
def stage_work(stage: str, key: str, store: str, storage_options: dict) -> Iterator[StageWork]:
    """The skeleton of every stage task: open the store, work in a temporary folder that is
    removed however the task ends, publish `out` under `objects/<stage>/<key>/`.

        with stage_work("allocation", allocation_key(...), store, storage_options) as w:
            table = read_stats(w.read(stats) / "expert_stats.parquet")
            export_parquet(allocate(table, ...), w.out / "bit_allocation.parquet")
            return w.publish(summary)
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        yield StageWork(Store(store, storage_options), stage, key, Path(tmp), out)


def local_copy(store: Store, out: StageOutput, tmp: Path, only: list[str] | None = None) -> Path:
    """A local folder with the stage's files (or `only` those): the store folder itself when the
    store is local."""
    if store.is_local:
        folder = Path(store.uri(out.prefix))
        if not (folder / "_stage.json").is_file():
            from ..errors import ExpertbitsError

            raise ExpertbitsError(f"{folder}: the {out.stage} stage's output is not on this machine",
                                  "Dask workers on other machines need a store they share with the flow: use "
                                  "s3:// (or a shared filesystem mounted at the same path)")
        return folder
    for rel in out.files:
        if only is None or rel in only:
            store.get_file(f"{out.prefix}/{rel}", tmp / out.stage / rel)
    return tmp / out.stage


def ckpt_path(rec: CheckpointRecord, cache_dir: str | None, storage_options: dict) -> Path:
    return fetch.ensure_local(rec.uri, rec.digest, cache_dir, storage_options)


def layer_path(rec: CheckpointRecord, positions: list[int], cache_dir: str | None, storage_options: dict) -> Path:
    """The checkpoint as a worker needs it for the MoE layers at `positions`: this machine's whole
    cached copy if it has one, else a partial copy with only the shards those decoder layers'
    tensors live in (fetch.ensure_part)."""
    from ..checkpoints.adapters import block_of, detect
    from ..checkpoints.reader import Checkpoint

    def wanted(folder: Path) -> list[str]:
        with Checkpoint.open(folder) as c:
            layers = detect(c).layers
            blocks = {block_of(layers[i].router_key) for i in positions}
            return sorted({info.file for k, info in c.tensors.items() if block_of(k) in blocks})

    return fetch.ensure_part(rec.uri, rec.digest, rec.files, wanted, cache_dir, storage_options)


def read_calibration(st: Store, out: StageOutput | None, tmp: Path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    if out is None:
        return None, None
    folder = local_copy(st, out, tmp)
    return (tables.read_stats(folder / "expert_calibration.parquet"),
            tables.read_parquet(folder / "expert_qerror.parquet", "layer, expert, bits"))


def expert_bytes(ckpt: Path, roles: tuple[str, ...] = ("gate", "up", "down"), positions: list[int] | None = None) -> int:
    """Stored bytes of the expert matrices of these roles (in these MoE layers): what a stage's GB/s
    is counted in."""
    from ..checkpoints.adapters import detect, matrix_bytes
    from ..checkpoints.reader import Checkpoint

    with Checkpoint.open(ckpt) as c:
        layers = detect(c).layers
        chosen = [layers[i] for i in positions] if positions is not None else layers
        return sum(matrix_bytes(c, m) for layer in chosen for m in layer.matrices if m.role in roles)
