"""Gather a run's stage outputs under one run prefix, with the manifest written last.

  runs/<run-id>/
    statistics/expert_stats.parquet, checkpoints.json
    calibration/expert_calibration.parquet, expert_qerror.parquet   (allocators that need them)
    allocation/bit_allocation.parquet
    quantization/...                 the quantized checkpoint (HF layout)
    validation/kernel_validation.parquet, fused_validation.parquet
    evaluation/evaluation.json
    expertbits.duckdb                every table above, queryable together (schema: tasks/schema.sql)
    manifest.json                    written last: parameters, stage keys, every file's sha256

The run id is derived from the stage keys, so the same inputs and configuration give the same
prefix and the same bytes (the DuckDB file's tables; DuckDB's file format is not byte-reproducible).
A run is written under `incoming/` and made visible whole (see `publish`). A reader that finds no
manifest.json must ignore the prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd

from .errors import StoreError
from .records import RunManifest, StageOutput
from .statistics import schema_sql
from .storage import Store, sha256_file


def run_id(checkpoint_uri: str, outputs: list[StageOutput], tag: str = "") -> str:
    """`<checkpoint slug>[-<tag>]-<hash of the stage keys>`: same inputs, same id."""
    slug = re.sub(r"[^a-z0-9]+", "-", checkpoint_uri.lower().rstrip("/").split("://")[-1].replace("@", "-"))[-40:].strip("-")
    digest = hashlib.sha256("".join(o.key for o in outputs).encode()).hexdigest()[:10]
    return "-".join(part for part in (slug, tag, digest) if part)


def build_database(path: Path, store: Store, outputs: dict[str, StageOutput], tmp: Path) -> None:
    """One DuckDB file with every table of the run, loaded from the stage outputs."""
    def local(stage: str, rel: str) -> str:
        return str(store.get_file(f"{outputs[stage].prefix}/{rel}", tmp / stage / rel))

    con = duckdb.connect(str(path), config={"autoinstall_known_extensions": False})
    try:
        con.execute(schema_sql())
        ckpts = pd.DataFrame(json.loads(Path(local("statistics", "checkpoints.json")).read_text()))
        con.execute("INSERT INTO checkpoints SELECT digest, uri, role, model_type, layout, moe_layers, experts FROM ckpts")
        for table, stage, rel in (("expert_stats", "statistics", "expert_stats.parquet"),
                                  ("bit_allocation", "allocation", "bit_allocation.parquet"),
                                  ("kernel_validation", "validation", "kernel_validation.parquet"),
                                  ("fused_validation", "validation", "fused_validation.parquet")):
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [local(stage, rel)])
        if "calibration" in outputs:
            for table in ("expert_calibration", "expert_qerror"):
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)",
                            [local("calibration", table + ".parquet")])
        qc = json.loads(Path(local("quantization", "config.json")).read_text())["quantization_config"]
        if "calibration_coverage" in qc:
            cov = qc["calibration_coverage"]
            coverage = pd.DataFrame([{"layer": int(layer), "expert": e, "calibration_tokens": tokens,
                                      "quantizer": cov["quantizer"][layer][e]}
                                     for layer, per in cov["tokens"].items() for e, tokens in enumerate(per)])
            con.execute("INSERT INTO calibration_coverage SELECT layer, expert, calibration_tokens, quantizer FROM coverage")
        metrics = json.loads(Path(local("evaluation", "evaluation.json")).read_text())
        rows = pd.DataFrame([{"metric": k, "value": float(v)} for k, v in sorted(metrics.items()) if isinstance(v, (int, float))])
        con.execute("INSERT INTO evaluation SELECT * FROM rows")
        con.execute("CHECKPOINT")
    finally:
        con.close()


Database = Callable[[Path, Store, dict[str, StageOutput], Path], None]


def publish(store: Store, rid: str, outputs: dict[str, StageOutput], parameters: dict,
            root: str = "runs", database: Database = build_database) -> RunManifest:
    """Publish the run `<root>/<rid>/`: every stage's files under `<stage>/`, the DuckDB, and the
    manifest last, all first written under `incoming/` and made visible only when complete.

    The run id is a function of the stage keys, so a run already published under `rid` that is
    intact (every file re-hashed against its manifest) is the same run: it is kept as it is and its
    manifest returned. A damaged or partial one is replaced, never removed before its replacement is
    complete. On a local disk the complete folder is renamed into place; on S3 (no rename) its
    objects are copied in with the manifest last, any old manifest having been removed first."""
    prefix = f"{root}/{rid}"
    if (kept := _intact(store, prefix)) is not None:
        return kept
    incoming = f"{INCOMING}/{root}-{rid}-{uuid.uuid4().hex[:12]}"
    with store.staging(incoming), tempfile.TemporaryDirectory() as tmp:
        files: dict[str, str] = {}
        for stage, out in outputs.items():
            for rel, sha in out.files.items():
                store.copy(f"{out.prefix}/{rel}", f"{incoming}/{stage}/{rel}")
                files[f"{stage}/{rel}"] = sha
        db = Path(tmp) / "expertbits.duckdb"
        database(db, store, outputs, Path(tmp))
        store.put_file(db, f"{incoming}/expertbits.duckdb")
        files["expertbits.duckdb"] = sha256_file(db)
        manifest = RunManifest(
            run_id=rid, uri=store.uri(prefix), files=dict(sorted(files.items())),
            stages={stage: out.key for stage, out in outputs.items()},
            summary={"parameters": parameters, **{stage: out.summary for stage, out in outputs.items()}},
        )
        store.write_bytes(f"{incoming}/manifest.json", manifest.model_dump_json(indent=2).encode())
        return _make_visible(store, incoming, prefix, manifest)


INCOMING = "incoming"  # runs and leagues being written; never listed; `expertbits gc` removes old ones


def _intact(store: Store, prefix: str) -> RunManifest | None:
    """The manifest of the run at `prefix` if it is there and every file matches it, else None."""
    from .verify import verify_run

    if not store.exists(f"{prefix}/manifest.json"):
        return None
    try:
        report = verify_run(store, prefix)
        manifest = RunManifest.model_validate_json(store.read_bytes(f"{prefix}/manifest.json"))
    except (StoreError, ValueError, FileNotFoundError):
        return None
    return manifest if report["ok"] else None


def _make_visible(store: Store, incoming: str, prefix: str, manifest: RunManifest, attempts: int = 5) -> RunManifest:
    if store.is_local:
        asides = []
        try:
            for n in range(attempts):
                try:
                    store.rename_dir(incoming, prefix)  # one step: the run appears whole
                    return manifest
                except OSError:  # `prefix` exists: a damaged copy, or a concurrent publisher's
                    if (kept := _intact(store, prefix)) is not None:
                        store.remove(incoming)
                        return kept
                    asides.append(f"{incoming}-replaced-{n}")
                    with contextlib.suppress(FileNotFoundError):
                        store.rename_dir(prefix, asides[-1])  # out of sight; removed once ours is in place
        finally:
            for aside in asides:
                store.remove(aside)
    else:
        for _ in range(attempts):
            # S3 has no rename. The data files first (whoever else publishes this run writes the
            # same bytes, but for the DuckDB file), then the manifest; then checked, and redone if a
            # concurrent publisher's DuckDB and manifest crossed ours.
            if store.exists(f"{prefix}/manifest.json") and _intact(store, prefix) is None:
                store.remove(f"{prefix}/manifest.json")  # a damaged run stops being listed before it changes
            for rel in manifest.files:
                store.copy(f"{incoming}/{rel}", f"{prefix}/{rel}")
            for rel in set(store.list(prefix)) - set(manifest.files) - {"manifest.json"}:
                store.remove(f"{prefix}/{rel}")  # left by a damaged or partial copy
            store.copy(f"{incoming}/manifest.json", f"{prefix}/manifest.json")
            if (kept := _intact(store, prefix)) is not None:
                store.remove(incoming)
                return kept
            time.sleep(random.uniform(0.2, 1.0))
    raise StoreError(f"{store.uri(prefix)}: the published run does not match its manifest after {attempts} attempts",
                     "another process keeps rewriting this run; rerun the flow when it is done (every stage is cached)")
