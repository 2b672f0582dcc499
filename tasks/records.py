"""Small records passed between Prefect tasks: URIs and digests, never tensors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class CheckpointRecord(BaseModel):
    """A checkpoint fetched into the local cache."""

    uri: str
    digest: str  # sha256 of the sorted per-file sha256 manifest
    path: str  # local cache folder (may be refetched by digest if the cache was cleared)
    files: dict[str, str] = {}  # file name -> sha256: what a worker fetching only some shards verifies


class TextRecord(BaseModel):
    """A calibration or evaluation text, pinned once per flow (checkpoints/texts.py `pin`): every
    key and every stage of the run sees these bytes, whatever happens to the URI meanwhile."""

    uri: str
    digest: str  # sha256 of its UTF-8 bytes; the local cache holds them as texts/<digest>.txt


class StageOutput(BaseModel):
    """What a stage wrote: files under `objects/<stage>/<key>/` in the store, and a summary."""

    stage: str
    key: str  # the cache key: digests of the inputs + configuration + code version
    prefix: str  # store-relative folder
    files: dict[str, str]  # relative name -> sha256
    summary: dict[str, Any]


class RunManifest(BaseModel):
    run_id: str
    uri: str  # the run prefix in the store
    files: dict[str, str]
    stages: dict[str, str]  # stage -> cache key
    summary: dict[str, Any]


class ReferenceChoice(BaseModel):
    """Which checkpoint Λ compares the fine-tune with, and why (reference.py)."""

    uri: str | None  # None: no reference, Λ is the final router norm
    # "given", "declared in README.md" / "declared in config.json", "none-given" (--reference none)
    # or "none" (nothing declared, or the declared base cannot be used)
    source: str
    reason: str  # why, in a few words: "as given", "declared in README.md", or why there is none
    note: str  # what was chosen and why, with what to do about it, for the log and the manifest
    declared: str | None = None  # the checkpoint's own base_model value, as written
