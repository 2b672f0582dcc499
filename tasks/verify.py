"""Check a published run against its manifest: every file re-hashed, nothing missing or added.

A run is `runs/<id>/` with `manifest.json` written last; the manifest lists every file of the run
with its sha256. `verify_run` reads every byte again (local or s3://) and reports what differs.
"""

from __future__ import annotations

import json

from .errors import StoreError
from .storage import Store


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

