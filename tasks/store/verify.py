"""Check a published run against its manifest: every file re-hashed, nothing missing or added.

A run is `runs/<id>/` with `manifest.json` written last; the manifest lists every file of the run
with its sha256. `verify_run` reads every byte again (local or s3://) and reports what differs.
`check_folder` is what a reader runs before it loads a folder of a run (or of a stage output).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, StoreError
from .storage import Store, sha256_file


def verify_run(store: Store, prefix: str = "") -> dict:
    """{'files': n, 'changed': [...], 'missing': [...], 'extra': [...], 'ok': bool} for the run at
    `prefix` of `store` ('' when the store root is the run folder itself)."""
    where = store.uri(prefix)
    if not store.is_local:
        store.fs.invalidate_cache()  # a listing cached before the run changed would hide files
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/manifest.json" if prefix else "manifest.json"))
        listed: dict[str, str] = manifest["files"]
        if not isinstance(listed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in listed.items()):
            raise TypeError("files is not a map of names to sha256")
    except FileNotFoundError as e:
        raise StoreError(f"{where}: no manifest.json, so this is not a (complete) run",
                         "name a run folder, runs/<id>; `expertbits runs` lists them") from e
    except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise StoreError(f"{where}/manifest.json is not a run manifest ({type(e).__name__}: {e})",
                         "the manifest was damaged; republish the run (rerun the flow: every stage is cached)") from e
    present = set(store.list(prefix)) - {"manifest.json"}
    changed, missing = [], []
    for rel, sha in sorted(listed.items()):
        if rel not in present:
            missing.append(rel)
        elif store.sha256(f"{prefix}/{rel}" if prefix else rel) != sha:
            changed.append(rel)
    extra = sorted(present - set(listed))
    return {"run": where, "files": len(listed), "changed": changed, "missing": missing, "extra": extra,
            "ok": not (changed or missing or extra)}



def check_folder(folder: str | Path) -> int:
    """Before a quantized folder is loaded: if it is a published run's `quantization/` folder (the
    run's manifest beside it) or a stage output (`_stage.json` in it), re-hash every file the
    record lists for it and raise CheckpointError naming what changed or is missing. Returns the
    number of files checked (0 for a folder no record covers, e.g. a copy taken out of the run)."""
    folder = Path(folder).resolve()
    for record, sub in ((folder.parent / "manifest.json", folder.name + "/"), (folder / "_stage.json", "")):
        if not record.is_file():
            continue
        try:
            listed = json.loads(record.read_text())["files"]
            mine = {k[len(sub):]: v for k, v in listed.items() if k.startswith(sub)}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{record} is damaged ({type(e).__name__}: {e}), so {folder} cannot be checked",
                                  "republish the run: rerun the flow (every stage is cached)") from e
        if not mine:
            continue
        missing = sorted(r for r in mine if not (folder / r).is_file())
        changed = sorted(r for r in mine if r not in missing and sha256_file(folder / r) != mine[r])
        if missing or changed:
            raise CheckpointError(
                f"{folder}: files differ from {record.name}: changed {changed[:5]}, missing {missing[:5]}",
                "the run was edited or damaged; republish it (rerun the flow: every stage is cached) and check it with "
                "`expertbits verify`")
        return len(mine)
    return 0
