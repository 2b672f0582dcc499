"""The catalog of a store: every published run, read from the runs themselves.

Runs never share a mutable database: each writes its own parquet, JSON and DuckDB under
`runs/<id>/`, manifest last. The catalog is a read over all of them, so concurrent runs cannot
corrupt it, and a prefix without `manifest.json` (a run still being written, or a killed one) is
never listed. The same reads work as plain DuckDB SQL over the store (`QUERIES`, documented in
README and tested), through fsspec for s3:// since DuckDB's httpfs is not available offline.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone

import duckdb
import pandas as pd

from .storage import Store, modified

# digest: the content digest of the checkpoint as the download stage computed it (sha256 of its files)
COLUMNS = ("run_id", "checkpoint", "digest", "avg_bits", "allocator", "granularity", "symmetric", "quantizer", "kl",
           "ppl_fp", "ppl_quant", "effective_bits", "created", "uri", "event_id", "pushed")

# DuckDB SQL over every published run of a store; $manifests and $allocations are the globs under
# the store root (parameters, so a quote in a path cannot break or change the query). `runs`
# keeps only prefixes with a manifest, so a half-written run is never joined in.
RUNS = """runs AS (
    SELECT run_id, split_part(filename, '/', -2) AS dir, summary.parameters.checkpoint AS checkpoint,
           summary.parameters.avg_bits AS avg_bits, summary.evaluation.kl AS kl,
           summary.quantization.effective_bits AS effective_bits
    FROM read_json($manifests, filename = true, union_by_name = true, maximum_object_size = 67108864))"""
QUERIES = {
    "every allocation of a checkpoint": f"""WITH {RUNS}
SELECT runs.run_id, a.layer, a.expert, a.bits, a.reason
FROM read_parquet($allocations, filename = true) AS a
JOIN runs ON split_part(a.filename, '/', -3) = runs.dir
WHERE runs.checkpoint = $checkpoint
ORDER BY runs.run_id, a.layer, a.expert""",
    "KL against bits across runs": f"""WITH {RUNS}
SELECT checkpoint, avg_bits, effective_bits, kl, run_id FROM runs ORDER BY checkpoint, avg_bits, kl""",
}


def query(store: Store, name: str, **params) -> pd.DataFrame:
    """Run one of the documented `QUERIES` over a store."""
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        if not store.is_local:
            store.fs.invalidate_cache()
            con.register_filesystem(store.fs)
        sql = QUERIES[name]
        globs = {"manifests": f"{store.root}/runs/*/manifest.json",
                 "allocations": f"{store.root}/runs/*/allocation/bit_allocation.parquet"}
        used = {k: v for k, v in {**globs, **params}.items() if f"${k}" in sql}
        return con.execute(sql, used).df()
    finally:
        con.close()


def list_runs(store: Store) -> pd.DataFrame:
    """One row per published run (newest first): what it quantized, how, how well, and when."""
    rows = []
    store.fs.invalidate_cache()  # s3fs caches listings per process; other processes publish runs
    for manifest_path in sorted(store.fs.glob(posixpath.join(store._path("runs"), "*", "manifest.json"))):
        manifest = json.loads(store.fs.cat_file(manifest_path))
        summary, rel = manifest["summary"], posixpath.dirname(manifest_path)
        p = summary.get("parameters", {})
        checkpoints = json.loads(store.fs.cat_file(posixpath.join(rel, "statistics", "checkpoints.json")))
        info = store.fs.info(manifest_path)
        created = modified(info)
        created = datetime.fromtimestamp(created, tz=timezone.utc) if created is not None else None
        rows.append({
            "run_id": manifest["run_id"], "checkpoint": p.get("checkpoint"),
            "digest": next((c["digest"] for c in checkpoints if c["role"] == "finetuned"), None),
            "avg_bits": p.get("avg_bits"), "allocator": p.get("allocator"), "granularity": p.get("granularity", "expert"),
            "symmetric": p.get("symmetric", False), "quantizer": summary.get("quantization", {}).get("quantizer", "rtn"),
            "kl": summary.get("evaluation", {}).get("kl"),
            "ppl_fp": summary.get("evaluation", {}).get("ppl_fp"), "ppl_quant": summary.get("evaluation", {}).get("ppl_quant"),
            "effective_bits": summary.get("quantization", {}).get("effective_bits"),
            "created": pd.Timestamp(created).tz_convert("UTC") if created is not None else None,
            "uri": manifest["uri"], "event_id": p.get("event_id"), "pushed": _last_push(store, manifest["run_id"]),
        })
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values(["created", "run_id"], ascending=[False, True], na_position="last").reset_index(drop=True)


def _last_push(store: Store, run_id: str) -> str | None:
    """`org/name@branch <commit>` of the run's latest push (push.py's records), or None."""
    names = sorted(r for r in store.list(f"pushes/{run_id}") if r.endswith(".json"))
    if not names:
        return None
    try:
        last = json.loads(store.read_bytes(f"pushes/{run_id}/{names[-1]}"))
        return f"{last['repo_id']}@{last['branch']} {last['commit'][:12]}"
    except (ValueError, KeyError, TypeError):  # a damaged record does not hide the other runs
        return f"? (unreadable record pushes/{run_id}/{names[-1]})"


def table(frame: pd.DataFrame) -> str:
    """The runs as a fixed-width text table for a terminal."""
    if frame.empty:
        return "no published runs"
    shown = frame.assign(
        digest=frame.digest.str[:12], kl=frame.kl.map(lambda v: f"{v:.5f}" if pd.notna(v) else "–"),
        created=frame.created.map(lambda t: t.strftime("%Y-%m-%d %H:%M") if pd.notna(t) else ""))
    cols = ["created", "run_id", "checkpoint", "digest", "avg_bits", "allocator", "granularity", "symmetric", "quantizer",
            "kl"] + (["pushed"] if frame.pushed.notna().any() else [])
    return shown[cols].to_string(index=False)
