"""Gather a run's stage outputs under one run prefix, with the manifest written last.

  runs/<run-id>/
    statistics/expert_stats.parquet, checkpoints.json
    calibration/expert_calibration.parquet, expert_qerror.parquet   (allocators that need them)
    allocation/bit_allocation.parquet
    quantization/...                 the quantized checkpoint (HF layout)
    validation/kernel_validation.parquet, fused_validation.parquet
    evaluation/evaluation.json
    expertbits.duckdb                every table above, queryable together (schema: tasks/store/schema.sql)
    manifest.json                    written last: parameters, stage keys, every file's sha256

The run id is derived from the stage keys, so the same inputs and configuration give the same
prefix and the same bytes (the DuckDB file's tables; DuckDB's file format is not byte-reproducible).
A run is written under `.expertbits-incoming/` and made visible whole (see `publish`). A reader that finds no
manifest.json must ignore the prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd

from ..errors import StoreError
from ..records import RunManifest, StageOutput
from .storage import Store, sha256_file
from .tables import schema_sql
from .visibility import INCOMING, LOCKS, check_copies, copy_in, intact, lock, swap_in


def run_id(checkpoint_uri: str, outputs: list[StageOutput], tag: str = "") -> str:
    """`<checkpoint slug>[-<tag>]-<hash of the stage keys>`: same inputs, same id."""
    slug = re.sub(r"[^a-z0-9]+", "-", checkpoint_uri.lower().rstrip("/").split("://")[-1].replace("@", "-"))[-40:].strip("-")
    digest = hashlib.sha256("".join(o.key for o in outputs).encode()).hexdigest()[:10]
    return "-".join(part for part in (slug, tag, digest) if part)


def _as_published_by(kept: RunManifest, parameters: dict, notes: dict | None) -> RunManifest:
    return kept.model_copy(update={"summary": {**kept.summary, "parameters": parameters, **(notes or {})}})


def build_database(path: Path, store: Store, outputs: dict[str, StageOutput], tmp: Path) -> None:
    """One DuckDB file with every table of a run or a league, loaded from its stage outputs.

    Each `<table>.parquet` of a stage becomes the table of that name (the schema's columns by name;
    a table the schema lacks is created as the file is; a run's quantized folder holds no table).
    Beside them, from the JSON files, which a stage that wrote them must have:
    `checkpoints` (statistics/checkpoints.json), `calibration_coverage` (a GPTQ folder's
    config.json) and `evaluation` (evaluation.json, one row per numeric metric)."""
    con = duckdb.connect(str(path), config={"autoinstall_known_extensions": False})

    def local(stage: str, rel: str) -> Path:
        return store.get_file(f"{outputs[stage].prefix}/{rel}", tmp / stage / rel)

    def insert(table: str, rows: pd.DataFrame, columns: str) -> None:
        con.register("rows", rows)
        con.execute(f"INSERT INTO {table} SELECT {columns} FROM rows")
        con.unregister("rows")

    try:
        con.execute(schema_sql())
        schema = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for stage, out in outputs.items():
            if stage == "quantization":
                continue  # the quantized folder: its side files are the source checkpoint's, not tables
            for rel in (r for r in out.files if r.endswith(".parquet") and "/" not in r):
                table = rel.removesuffix(".parquet")
                if stage.startswith("calibration-") and table == "expert_calibration":
                    continue  # a league's later calibrations: routing does not depend on the quantizer, one copy is enough
                # paths are parameters, never SQL text (a quote in a store path must not break or inject)
                quoted = '"' + table.replace('"', '""') + '"'
                con.execute(f"INSERT INTO {quoted} BY NAME SELECT * FROM read_parquet(?)" if table in schema
                            else f"CREATE TABLE {quoted} AS SELECT * FROM read_parquet(?)", [str(local(stage, rel))])
        if "statistics" in outputs:
            insert("checkpoints", pd.DataFrame(json.loads(local("statistics", "checkpoints.json").read_text())),
                   "digest, uri, role, model_type, layout, moe_layers, experts")
        if "quantization" in outputs:
            qc = json.loads(local("quantization", "config.json").read_text())["quantization_config"]
            if cov := qc.get("calibration_coverage"):
                insert("calibration_coverage", pd.DataFrame(
                    [{"layer": int(layer), "expert": e, "calibration_tokens": tokens, "quantizer": cov["quantizer"][layer][e]}
                     for layer, per in cov["tokens"].items() for e, tokens in enumerate(per)]),
                       "layer, expert, calibration_tokens, quantizer")
        if "evaluation" in outputs:
            metrics = json.loads(local("evaluation", "evaluation.json").read_text())
            insert("evaluation", pd.DataFrame([{"metric": k, "value": float(v)} for k, v in sorted(metrics.items())
                                               if isinstance(v, (int, float))]), "metric, value")
        con.execute("CHECKPOINT")
    finally:
        con.close()


Database = Callable[[Path, Store, dict[str, StageOutput], Path], None]


def publish(store: Store, rid: str, outputs: dict[str, StageOutput], parameters: dict,
            root: str = "runs", database: Database = build_database, notes: dict | None = None,
            extra: dict[str, bytes] | None = None) -> RunManifest:
    """Publish the run `<root>/<rid>/`: every stage's files under `<stage>/`, the DuckDB, and the
    manifest last, all first written under `INCOMING` and made visible only when complete.

    The run id is a function of the stage keys, so a run already published under `rid` that is
    intact (every file re-hashed against its manifest) is the same run: it is kept as it is and its
    manifest returned. A damaged or partial one is replaced, and removed only once the replacement
    is complete. The copies are re-hashed against the stage records before anything is visible: a
    stage output that changed since it was written is refused, and its `_stage.json` removed so the
    next run rebuilds it. On a local disk the complete folder is renamed into place (publishers of
    one run take turns, by a lock file); on S3 (no rename) its objects are copied in, the manifest
    last, a damaged run's manifest having been removed first so it is not listed meanwhile.

    `notes` go into the manifest's summary beside the parameters (how the flow resolved them). A
    kept run is returned with this publisher's parameters and notes in its summary (what this run
    asked for and found), its files (manifest.json included) as they were first published.

    `extra`: files the run holds beside its stages' (the quantized folder's model card), by
    relative path; listed in the manifest like the others."""
    prefix = f"{root}/{rid}"
    kept, seen = intact(store, prefix)  # seen: the damaged manifest, if any; a different one later is news
    if kept is not None:
        return _as_published_by(kept, parameters, notes)
    incoming = f"{INCOMING}/{root}-{rid}-{uuid.uuid4().hex[:12]}"
    with store.staging(incoming), tempfile.TemporaryDirectory() as tmp:
        for stage, out in outputs.items():
            for rel in out.files:
                try:
                    store.copy(f"{out.prefix}/{rel}", f"{incoming}/{stage}/{rel}")
                except FileNotFoundError as e:
                    raise StoreError(f"{store.uri(out.prefix)}/{rel}: a file of the {stage} stage's output is gone",
                                     "rerun the flow: a stage whose files are missing is rebuilt") from e
        outputs = check_copies(store, incoming, outputs)
        files = {f"{stage}/{rel}": sha for stage, out in outputs.items() for rel, sha in out.files.items()}
        for rel, data in (extra or {}).items():
            if rel in files:
                raise StoreError(f"{store.uri(prefix)}/{rel}: a stage's output already has this file",
                                 "report this: the run's extra files must not replace a stage's")
            store.write_bytes(f"{incoming}/{rel}", data)
            files[rel] = hashlib.sha256(data).hexdigest()
        db = Path(tmp) / "expertbits.duckdb"
        copies = {stage: out.model_copy(update={"prefix": f"{incoming}/{stage}"}) for stage, out in outputs.items()}
        database(db, store, copies, Path(tmp))  # from the checked copies: the tables are the files
        store.put_file(db, f"{incoming}/expertbits.duckdb")
        files["expertbits.duckdb"] = sha256_file(db)
        manifest = RunManifest(
            run_id=rid, uri=store.uri(prefix), files=dict(sorted(files.items())),
            stages={stage: out.key for stage, out in outputs.items()},
            summary={"parameters": parameters, **(notes or {}), **{stage: out.summary for stage, out in outputs.items()}},
        )
        store.write_bytes(f"{incoming}/manifest.json", manifest.model_dump_json(indent=2).encode())
        if store.is_local:
            with lock(store, f"{LOCKS}/{root}-{rid}.lock"):
                return swap_in(store, incoming, prefix, manifest)
        return copy_in(store, incoming, prefix, manifest, seen)
