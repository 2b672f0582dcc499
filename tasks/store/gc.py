"""`expertbits gc`: remove what killed or failed work left behind in a store and the local cache,
and nothing else.

An orphan is one of these, and only once nothing in it was written for `older_than` seconds (so a
run still writing is never touched):

  store  .expertbits-incoming/<root>-<id>-<12 hex>[-replaced]
                                          a run or league written but never made visible
         runs/<id>/, leagues/<id>/        a prefix without manifest.json (a partial run)
         objects/<stage>/<key>/           a stage output without _stage.json (never completed)
         …/.expertbits-tmp-…              a local file write that never finished (storage.TMP_MARK)
  cache  checkpoints/.incoming-…          a download that never finished
         partial/<digest>/.….incoming-…   a shard fetch that never finished

Published runs, completed stage outputs and verified cache entries are never orphans, whatever
their age.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .storage import TMP_MARK, Store, modified
from .visibility import INCOMING

PUBLISHING = re.compile(r"(runs|leagues)-.+-[0-9a-f]{12}(-replaced)?")  # publish.py's folders under INCOMING


@dataclass(frozen=True)
class Orphan:
    where: str  # store-relative prefix or file, or a local cache path
    why: str
    age_s: float
    in_store: bool


def store_orphans(store: Store, older_than_s: float, now: float | None = None) -> list[Orphan]:
    now = time.time() if now is None else now
    if not store.is_local:
        store.fs.invalidate_cache()
    base = store._path("").rstrip("/")
    try:
        infos = store.fs.find(base, detail=True)
    except FileNotFoundError:
        return []
    newest: dict[str, float] = {}  # candidate prefix -> newest write under it
    markers: set[str] = set()  # prefixes holding their completion marker
    found: list[Orphan] = []
    for path, info in infos.items():
        rel = path[len(base) + 1:]
        parts = rel.split("/")
        t = (modified(info) or 0.0)
        if TMP_MARK in parts[-1] and now - t > older_than_s:
            found.append(Orphan(rel, "a file write that never finished", now - t, True))
        if parts[0] == INCOMING and len(parts) > 2 and PUBLISHING.fullmatch(parts[1]):
            prefix = "/".join(parts[:2])
        elif parts[0] in ("runs", "leagues") and len(parts) > 2:
            prefix = "/".join(parts[:2])
            markers |= {prefix} if parts[2:] == ["manifest.json"] else set()
        elif parts[0] == "objects" and len(parts) > 3:
            prefix = "/".join(parts[:3])
            markers |= {prefix} if parts[3:] == ["_stage.json"] else set()
        else:
            continue
        newest[prefix] = max(newest.get(prefix, 0.0), t)  # an unfinished write keeps its prefix young too
    why = {INCOMING: "never made visible (a killed or failed publish)", "runs": "a run prefix without manifest.json",
           "leagues": "a league prefix without manifest.json", "objects": "a stage output without _stage.json"}
    for prefix, t in sorted(newest.items()):
        if prefix not in markers and now - t > older_than_s:
            found.append(Orphan(prefix, why[prefix.split("/")[0]], now - t, True))
    return found


def cache_orphans(cache: Path, older_than_s: float, now: float | None = None) -> list[Orphan]:
    now = time.time() if now is None else now
    candidates = [*(cache / "checkpoints").glob(".incoming-*"), *(cache / "partial").glob("*/.*.incoming-*")]
    found = []
    for path in sorted(candidates):
        try:
            t = max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")] if path.is_dir()
                    else [path.stat().st_mtime])
        except FileNotFoundError:  # finished or removed meanwhile
            continue
        if now - t > older_than_s:
            found.append(Orphan(str(path), "a download that never finished", now - t, False))
    return found


def collect(store: Store, older_than_s: float, cache: Path | None = None, dry_run: bool = False,
            now: float | None = None) -> list[Orphan]:
    """Find the orphans of `store` (and of the local `cache` folder) older than `older_than_s`
    seconds (at `now`, default the current time) and, unless `dry_run`, remove them; returns what
    was (or would be) removed."""
    found = store_orphans(store, older_than_s, now) + (cache_orphans(cache, older_than_s, now) if cache else [])
    if not dry_run:
        cutoff = (time.time() if now is None else now) - older_than_s
        for o in found:
            if o.in_store:
                _remove_old(store, o.where, cutoff)
            elif os.path.isdir(o.where):
                shutil.rmtree(o.where, ignore_errors=True)
            else:
                Path(o.where).unlink(missing_ok=True)
    return found


def _remove_old(store: Store, rel: str, cutoff: float) -> None:
    """Remove the files under `rel` (or the file `rel`) last written before `cutoff`, looked at
    again now: a file written since the scan stays, and a prefix that gained its completion marker
    meanwhile is left whole."""
    if not store.is_local:
        store.fs.invalidate_cache()
    path = store._path(rel)
    try:
        infos = store.fs.find(path, detail=True) if store.fs.isdir(path) else {path: store.fs.info(path)}
    except FileNotFoundError:
        return
    marker = {"runs": "manifest.json", "leagues": "manifest.json", "objects": "_stage.json"}.get(rel.split("/")[0])
    if marker and f"{path.rstrip('/')}/{marker}" in infos:
        return
    for file, info in infos.items():
        if (modified(info) or 0.0) < cutoff:
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm_file(file)
    if store.is_local:  # folders left empty
        for folder in sorted((p for p in Path(path).rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            Path(path).rmdir()


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """'90s', '30m', '6h', '2d' (or plain seconds) as seconds."""
    text = text.strip().lower()
    try:
        age = float(text[:-1]) * UNITS[text[-1]] if text and text[-1] in UNITS else float(text)
    except ValueError:
        age = -1.0
    if not age >= 0:  # also NaN
        raise ValueError(f"{text!r} is not an age: write e.g. 90s, 30m, 6h or 2d")
    return age


def describe(o: Orphan) -> str:
    age = o.age_s / 3600
    return f"{posixpath.normpath(o.where)}  ({o.why}; last written {age:.1f} h ago)"
