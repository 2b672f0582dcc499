"""Making a published run visible whole, on a local disk or S3 (publish.py writes it first).

A run is written under `INCOMING` and then made visible at `<root>/<id>`:

  local disk   the complete folder renamed into place under the run's lock file (`swap_in`);
               a damaged copy there is moved aside and removed after
  S3           no rename: the objects copied in, the manifest last, and checked (`copy_in`);
               a damaged run's manifest is removed first so it is not listed meanwhile

Before either, `check_copies` re-hashes the copies against the stage records.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import time

from ..errors import StoreError
from ..records import RunManifest, StageOutput
from .storage import Store
from .verify import verify_run

# Runs and leagues being written: never listed, and not a name a user's folders take (gc removes
# only `<root>-<id>-<12 hex>[-replaced]` folders under it, once old).
INCOMING = ".expertbits-incoming"
LOCKS = ".expertbits-locks"  # local stores: one empty lock file per run id, held while a run is swapped in


def read_if_there(store: Store, rel: str) -> bytes | None:
    for _ in range(5):
        try:
            return store.read_bytes(rel)
        except FileNotFoundError:
            return None
        except OSError:  # s3fs FileExpired: rewritten by another publisher while read; read the new one
            time.sleep(0.1)
    return store.read_bytes(rel)


def check_copies(store: Store, incoming: str, outputs: dict[str, StageOutput]) -> dict[str, StageOutput]:
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
        dropped = [stage for stage, rels in bad.items() if _drop_if_still_edited(store, outputs[stage], rels)]
        where = "; ".join(f"{outputs[s].prefix}: {rels[:3]}" for s, rels in bad.items())
        why = (f"the record and the differing files of {dropped} were removed, so they are rebuilt" if dropped else
               "another run is rewriting them now; nothing was removed")
        raise StoreError(f"stage outputs in {store.root} differ from their records ({where}): edited, damaged, or "
                         "rewritten with other bytes by a concurrent run",
                         f"rerun the flow ({why}; every other stage is cached)")
    return checked


def _drop_if_still_edited(store: Store, out: StageOutput, rels: list[str]) -> bool:
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
        return False
    for rel in ["_stage.json", *(r for r in rels if first[1][r] != out.files[r])]:
        store.remove(f"{out.prefix}/{rel}")
    return True


@contextlib.contextmanager
def lock(store: Store, rel: str):
    """An exclusive lock file of a local store (flock: released if the holder is killed)."""
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


def swap_in(store: Store, incoming: str, prefix: str, manifest: RunManifest) -> RunManifest:
    """Local: rename the complete run into place; a damaged copy there is moved aside first and
    removed only after. Runs under the run's lock, so no other publisher moves anything meanwhile."""
    kept, _ = intact(store, prefix)
    if kept is not None:  # another publisher finished first
        store.remove(incoming)
        return kept
    aside = f"{incoming}-replaced"
    if store.exists(prefix):
        store.rename_dir(prefix, aside)
    store.rename_dir(incoming, prefix)  # one step: the run appears whole
    store.remove(aside)
    return manifest


def copy_in(store: Store, incoming: str, prefix: str, manifest: RunManifest, seen: bytes | None,
             attempts: int = 5) -> RunManifest:
    """S3: the data files, then the DuckDB and the manifest; checked, and redone if a concurrent
    publisher's files crossed ours. `seen` is the damaged manifest found before: any other
    manifest there is another publisher's, kept only if the files there are the ones it lists."""
    ours = read_if_there(store, f"{incoming}/manifest.json")

    def theirs() -> RunManifest | None:
        current = read_if_there(store, f"{prefix}/manifest.json")
        if current is None or current in (seen, ours):
            return None
        return _consistent(store, prefix, incoming, manifest)

    for _ in range(attempts):
        if (kept := theirs()) is not None:
            store.remove(incoming)
            return kept
        if seen is not None and read_if_there(store, f"{prefix}/manifest.json") == seen:
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


def intact(store: Store, prefix: str) -> tuple[RunManifest | None, bytes | None]:
    """(manifest, its bytes) of the run at `prefix`: the manifest only if every file matches it.
    A read that fails for another reason than a missing file propagates (the task retries it):
    an intact run is never taken for a damaged one because the store hiccuped."""
    for attempt in range(3):
        raw = read_if_there(store, f"{prefix}/manifest.json")
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
        if read_if_there(store, f"{prefix}/manifest.json") != raw:  # republished while we read it: look again
            continue
        return (manifest if report["ok"] else None), raw
    return None, read_if_there(store, f"{prefix}/manifest.json")


def _consistent(store: Store, prefix: str, incoming: str, ours: RunManifest) -> RunManifest | None:
    """S3, after copying in: the visible manifest, if the files there are the ones it lists. Cheap
    when its data files are ours (their ETags against our checked copies, the DuckDB re-hashed);
    a manifest listing other bytes (a concurrent run's other league timings) is verified in full."""
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
