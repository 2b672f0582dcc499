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
prefix and the same bytes. A reader that finds no manifest.json must ignore the prefix.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Callable

import duckdb
import pandas as pd

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
    """Copy every stage's files under `<root>/<rid>/<stage>/`, add the DuckDB, write the manifest last."""
    prefix = f"{root}/{rid}"
    with store.staging(prefix), tempfile.TemporaryDirectory() as tmp:
        store.remove(prefix)
        files: dict[str, str] = {}
        for stage, out in outputs.items():
            for rel, sha in out.files.items():
                store.copy(f"{out.prefix}/{rel}", f"{prefix}/{stage}/{rel}")
                files[f"{stage}/{rel}"] = sha
        db = Path(tmp) / "expertbits.duckdb"
        database(db, store, outputs, Path(tmp))
        store.put_file(db, f"{prefix}/expertbits.duckdb")
        files["expertbits.duckdb"] = sha256_file(db)
        manifest = RunManifest(
            run_id=rid, uri=store.uri(prefix), files=dict(sorted(files.items())),
            stages={stage: out.key for stage, out in outputs.items()},
            summary={"parameters": parameters, **{stage: out.summary for stage, out in outputs.items()}},
        )
        store.write_bytes(f"{prefix}/manifest.json", manifest.model_dump_json(indent=2).encode())
    return manifest
