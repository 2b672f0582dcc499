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
A run is written under `.expertbits-incoming/` and made visible whole (see `publish`). A reader that finds no
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
    manifest last, all first written under `INCOMING` and made visible only when complete.

    The run id is a function of the stage keys, so a run already published under `rid` that is
    intact (every file re-hashed against its manifest) is the same run: it is kept as it is and its
    manifest returned. A damaged or partial one is replaced, and removed only once the replacement
    is complete. The copies are re-hashed against the stage records before anything is visible: a
    stage output that changed since it was written is refused, and its `_stage.json` removed so the
    next run rebuilds it. On a local disk the complete folder is renamed into place (publishers of
    one run take turns, by a lock file); on S3 (no rename) its objects are copied in, the manifest
    last, a damaged run's manifest having been removed first so it is not listed meanwhile."""
    prefix = f"{root}/{rid}"
    kept, seen = _intact(store, prefix)  # seen: the damaged manifest, if any; a different one later is news
    if kept is not None:
        return kept
    incoming = f"{INCOMING}/{root}-{rid}-{uuid.uuid4().hex[:12]}"
    with store.staging(incoming), tempfile.TemporaryDirectory() as tmp:
        for stage, out in outputs.items():
            for rel in out.files:
                try:
                    store.copy(f"{out.prefix}/{rel}", f"{incoming}/{stage}/{rel}")
                except FileNotFoundError as e:
                    raise StoreError(f"{store.uri(out.prefix)}/{rel}: a file of the {stage} stage's output is gone",
                                     "rerun the flow: a stage whose files are missing is rebuilt") from e
        outputs = _check_copies(store, incoming, outputs)
        files = {f"{stage}/{rel}": sha for stage, out in outputs.items() for rel, sha in out.files.items()}
        db = Path(tmp) / "expertbits.duckdb"
        copies = {stage: out.model_copy(update={"prefix": f"{incoming}/{stage}"}) for stage, out in outputs.items()}
        database(db, store, copies, Path(tmp))  # from the checked copies: the tables are the files
        store.put_file(db, f"{incoming}/expertbits.duckdb")
        files["expertbits.duckdb"] = sha256_file(db)
        manifest = RunManifest(
            run_id=rid, uri=store.uri(prefix), files=dict(sorted(files.items())),
            stages={stage: out.key for stage, out in outputs.items()},
            summary={"parameters": parameters, **{stage: out.summary for stage, out in outputs.items()}},
        )
        store.write_bytes(f"{incoming}/manifest.json", manifest.model_dump_json(indent=2).encode())
        if store.is_local:
            with _lock(store, f"{LOCKS}/{root}-{rid}.lock"):
                return _swap_in(store, incoming, prefix, manifest)
        return _copy_in(store, incoming, prefix, manifest, seen)


# Runs and leagues being written: never listed, and not a name a user's folders take (gc removes
# only `<root>-<id>-<12 hex>[-replaced]` folders under it, once old).
INCOMING = ".expertbits-incoming"
LOCKS = ".expertbits-locks"  # local stores: one empty lock file per run id, held while a run is swapped in


def _read(store: Store, rel: str) -> bytes | None:
    for _ in range(5):
        try:
            return store.read_bytes(rel)
        except FileNotFoundError:
            return None
        except OSError:  # s3fs FileExpired: rewritten by another publisher while read; read the new one
            time.sleep(0.1)
    return store.read_bytes(rel)


def _check_copies(store: Store, incoming: str, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
    """Every copied file re-hashed against its stage's record. Where they differ, the stage's
    current `_stage.json` decides: if a concurrent run rewrote the stage and its record matches
    the copies, that record is used; otherwise the stage output is refused by name, and its
    `_stage.json` and the differing files are removed so that the next run rebuilds them."""
    checked = dict(outputs)
    bad: dict[str, list[str]] = {}
    for stage, out in outputs.items():
        copied = {rel: store.sha256(f"{incoming}/{stage}/{rel}") for rel in out.files}
        if copied == out.files:
            continue
        try:
            current = StageOutput.model_validate_json(store.read_bytes(f"{out.prefix}/_stage.json"))
        except (FileNotFoundError, ValueError):
            current = None
        if current is not None and current.key == out.key and current.files == copied:
            checked[stage] = current  # rewritten, consistently, by a concurrent run of the same key
            continue
        bad[stage] = sorted(rel for rel in out.files if copied[rel] != out.files[rel])
    if bad:
        for stage, rels in bad.items():
            _drop_if_still_edited(store, outputs[stage], rels)
        where = "; ".join(f"{outputs[s].prefix}: {rels[:3]}" for s, rels in bad.items())
        raise StoreError(f"stage outputs in {store.root} differ from their records ({where}): edited, damaged, or "
                         "rewritten with other bytes by a concurrent run", "rerun the flow: those stages are rebuilt "
                         "(their _stage.json and the differing files were removed), every other stage is cached")
    return checked


def _drop_if_still_edited(store: Store, out: StageOutput, rels: list[str]) -> None:
    """Remove the record and the differing files of a stage output that disagrees with its own
    record, so the next run rebuilds them (layer shards included): only if it still does a moment
    later, by the same bytes, with the record unchanged. A concurrent run rewriting the stage at
    this moment changes one of those, and then nothing is removed."""
    def state() -> tuple[StageOutput | None, dict[str, str]]:
        try:
            record = StageOutput.model_validate_json(store.read_bytes(f"{out.prefix}/_stage.json"))
        except (FileNotFoundError, ValueError):
            record = None
        hashes = {}
        for rel in rels:
            try:
                hashes[rel] = store.sha256(f"{out.prefix}/{rel}")
            except FileNotFoundError:
                hashes[rel] = ""
        return record, hashes

    first = state()
    time.sleep(1.0)
    if state() != first or first[0] not in (None, out):
        return
    for rel in ["_stage.json", *(r for r in rels if first[1][r] != out.files[r])]:
        store.remove(f"{out.prefix}/{rel}")


@contextlib.contextmanager
def _lock(store: Store, rel: str):
    """An exclusive lock file of a local store (flock: released if the holder is killed)."""
    import fcntl
    import os

    path = store.uri(rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # still the lock file (not removed and recreated while we waited)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _swap_in(store: Store, incoming: str, prefix: str, manifest: RunManifest) -> RunManifest:
    """Local: rename the complete run into place; a damaged copy there is moved aside first and
    removed only after. Runs under the run's lock, so no other publisher moves anything meanwhile."""
    kept, _ = _intact(store, prefix)
    if kept is not None:  # another publisher finished first
        store.remove(incoming)
        return kept
    aside = f"{incoming}-replaced"
    if store.exists(prefix):
        store.rename_dir(prefix, aside)
    store.rename_dir(incoming, prefix)  # one step: the run appears whole
    store.remove(aside)
    return manifest


def _copy_in(store: Store, incoming: str, prefix: str, manifest: RunManifest, seen: bytes | None,
             attempts: int = 5) -> RunManifest:
    """S3: the data files, then the DuckDB and the manifest; checked, and redone if a concurrent
    publisher's files crossed ours. `seen` is the damaged manifest found before: any other
    manifest there is another publisher's, kept only if the files there are the ones it lists."""
    ours = _read(store, f"{incoming}/manifest.json")

    def theirs() -> RunManifest | None:
        current = _read(store, f"{prefix}/manifest.json")
        if current is None or current in (seen, ours):
            return None
        return _consistent(store, prefix, incoming, manifest)

    for _ in range(attempts):
        if (kept := theirs()) is not None:
            store.remove(incoming)
            return kept
        if seen is not None and _read(store, f"{prefix}/manifest.json") == seen:
            store.remove(f"{prefix}/manifest.json")  # the damaged run stops being listed before it changes
        for rel in manifest.files:
            if rel != "expertbits.duckdb":
                store.copy(f"{incoming}/{rel}", f"{prefix}/{rel}")
        for rel in set(store.list(prefix)) - set(manifest.files) - {"manifest.json"}:
            store.remove(f"{prefix}/{rel}")  # left by a damaged or partial copy
        if (kept := theirs()) is not None:  # completed by another publisher while we copied
            store.remove(incoming)
            return kept
        store.copy(f"{incoming}/expertbits.duckdb", f"{prefix}/expertbits.duckdb")
        store.copy(f"{incoming}/manifest.json", f"{prefix}/manifest.json")
        if (kept := _consistent(store, prefix, incoming, manifest)) is not None:
            store.remove(incoming)
            return kept
        time.sleep(random.uniform(0.2, 1.0))  # crossed: look again, copy again
    raise StoreError(f"{store.uri(prefix)}: the published run does not match its manifest after {attempts} attempts",
                     "another process keeps rewriting this run; rerun the flow when it is done (every stage is cached)")


def _intact(store: Store, prefix: str) -> tuple[RunManifest | None, bytes | None]:
    """(manifest, its bytes) of the run at `prefix`: the manifest only if every file matches it.
    A read that fails for another reason than a missing file propagates (the task retries it):
    an intact run is never taken for a damaged one because the store hiccuped."""
    from .verify import verify_run

    for attempt in range(3):
        raw = _read(store, f"{prefix}/manifest.json")
        if raw is None:
            return None, None
        try:
            report = verify_run(store, prefix)
            manifest = RunManifest.model_validate_json(raw)
        except (StoreError, ValueError, FileNotFoundError):  # not a manifest, or a file gone meanwhile
            return None, raw
        except OSError:  # s3fs FileExpired: an object changed while read; look again
            if attempt == 2:
                raise
            time.sleep(0.2)
            continue
        if _read(store, f"{prefix}/manifest.json") != raw:  # republished while we read it: look again
            continue
        return (manifest if report["ok"] else None), raw
    return None, _read(store, f"{prefix}/manifest.json")


def _consistent(store: Store, prefix: str, incoming: str, ours: RunManifest) -> RunManifest | None:
    """S3, after copying in: the visible manifest, if the files there are the ones it lists. Cheap
    when its data files are ours (their ETags against our checked copies, the DuckDB re-hashed);
    a manifest listing other bytes (a concurrent run's other league timings) is verified in full."""
    from .verify import verify_run

    try:
        manifest = RunManifest.model_validate_json(store.read_bytes(f"{prefix}/manifest.json"))
        store.fs.invalidate_cache()
        visible = _details(store, prefix)
        if set(visible) - {"manifest.json"} != set(manifest.files):
            return None
        data = {k: v for k, v in manifest.files.items() if k != "expertbits.duckdb"}
        if data != {k: v for k, v in ours.files.items() if k != "expertbits.duckdb"}:
            return manifest if verify_run(store, prefix)["ok"] else None
        copies = _details(store, incoming)
        same = all(visible[rel].get("ETag") is not None and visible[rel].get("ETag") == copies.get(rel, {}).get("ETag")
                   for rel in data)
        ok = same and store.sha256(f"{prefix}/expertbits.duckdb") == manifest.files["expertbits.duckdb"]
    except (ValueError, KeyError, OSError):  # OSError: gone, or rewritten meanwhile
        return None
    return manifest if ok else None


def _details(store: Store, rel: str) -> dict[str, dict]:
    base = store._path(rel).rstrip("/")
    return {k[len(base) + 1:]: v for k, v in store.fs.find(base, detail=True).items()}
