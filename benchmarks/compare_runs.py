"""Compare two published runs (or any two folders of run artifacts) file by file.

    python benchmarks/compare_runs.py OLD_RUN_DIR NEW_RUN_DIR [--same OLD_TEXT NEW_TEXT]...

Each run folder is `<store>/runs/<run-id>/`. Every file is reported as one of

    identical      the same bytes
    same-content   the same up to run ids, stage/cache keys and digests (32 or 64 hex digits),
                   paths (--same) and timings (JSON keys ending in _ms or _seconds, which differ
                   between two runs of one commit); or, for parquet and DuckDB, the same tables
                   (DuckDB files are compared only by their tables: the format is not reproducible)
    DIFFERS        a real difference, with what differs (JSON keys, table columns and their max
                   absolute difference, safetensors tensors)
    ONLY-OLD / ONLY-NEW

The run ids (from each manifest.json, else the folder names), each run's store folder and the
`--same` pairs are replaced by placeholders before comparing, since a refactor that changes the
code a stage key covers changes every key and so the run id. The exit status is 1 if any file
DIFFERS or is in one run only, else 0. Needs duckdb, pandas and numpy (the project's own).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

# Stage keys are 32 hex digits, cache keys and sha256 digests 64: whole words of either length.
HEX_KEY = re.compile(rb"(?<![0-9a-f])(?:[0-9a-f]{64}|[0-9a-f]{32})(?![0-9a-f])")
# Measurements of the run itself (allocation_ms, kernel_seconds): not results, never reproducible.
TIMING = re.compile(r"(_ms|_seconds)$")


class Side:
    """One run folder and the strings that name it (replaced before comparing)."""

    def __init__(self, root: Path, extra: list[str]):
        self.root = root.resolve()
        manifest = self.root / "manifest.json"
        run_id = json.loads(manifest.read_text())["run_id"] if manifest.exists() else self.root.name
        # Longest first, so a path that contains the run id is replaced whole.
        named = {s: f"<same{i}>" for i, s in enumerate(extra)}
        named[str(self.root.parent.parent)] = "<store>"
        named[run_id] = "<run-id>"
        self.names = sorted(named.items(), key=lambda kv: -len(kv[0]))

    def normalize(self, data: bytes) -> bytes:
        for text, placeholder in self.names:
            data = data.replace(text.encode(), placeholder.encode())
        return HEX_KEY.sub(b"<key>", data)

    def normalize_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for col in frame.columns:
            if frame[col].dtype == object or pd.api.types.is_string_dtype(frame[col]):
                frame[col] = frame[col].map(lambda v: self.normalize(v.encode()).decode() if isinstance(v, str) else v)
        return frame


def flatten(value, path="") -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in flatten(sub, f"{path}.{key}" if path else key).items()}
    if isinstance(value, list):
        return {k: v for i, sub in enumerate(value) for k, v in flatten(sub, f"{path}[{i}]").items()}
    return {path: value}


def diff_json(a: bytes, b: bytes) -> tuple[str, str]:
    """(status, how) of two normalized JSON texts that differ: same-content if only timings do."""
    fa, fb = flatten(json.loads(a)), flatten(json.loads(b))
    changed = [k for k in sorted(fa.keys() | fb.keys()) if fa.get(k, "<absent>") != fb.get(k, "<absent>")]
    timings = [k for k in changed if TIMING.search(k)]
    real = [k for k in changed if k not in timings]
    if not real:
        return "same-content", f"up to run ids / keys / paths; timings differ: {', '.join(timings)}"
    shown = "; ".join(f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}"[:200] for k in real[:12])
    return "DIFFERS", f"{len(real)} keys: {shown}" + (" ..." if len(real) > 12 else "") + (
        f" (and timings: {', '.join(timings)})" if timings else "")


def diff_frames(a: pd.DataFrame, b: pd.DataFrame) -> str | None:
    """None if equal, else which columns differ and by how much."""
    if list(a.columns) != list(b.columns):
        return f"columns {list(a.columns)} -> {list(b.columns)}"
    if len(a) != len(b):
        return f"{len(a)} -> {len(b)} rows"
    notes = []
    for col in a.columns:
        x, y = a[col].reset_index(drop=True), b[col].reset_index(drop=True)
        if x.dtype != y.dtype:
            notes.append(f"{col}: dtype {x.dtype} -> {y.dtype}")
        if x.equals(y):
            continue
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            delta = np.abs(x.to_numpy(float) - y.to_numpy(float))
            notes.append(f"{col}: {int((delta > 0).sum())} rows, max abs diff {np.nanmax(delta):.3g}")
        else:
            notes.append(f"{col}: {int((x.astype(str) != y.astype(str)).sum())} rows differ")
    return "; ".join(notes) or None


def parquet_frame(path: Path) -> pd.DataFrame:
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:  # row order is part of what a run writes, so it is kept
        return con.execute("SELECT * FROM read_parquet(?)", [str(path)]).df()
    finally:
        con.close()


def duckdb_tables(path: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(path), read_only=True, config={"autoinstall_known_extensions": False})
    try:  # insertion order is not part of a table's content: sort every table by all its columns
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        return {n: con.execute(f'SELECT * FROM "{n}" ORDER BY ALL').df() for n in names}
    finally:
        con.close()


def safetensors_tensors(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header's metadata and every tensor as float64 (or raw bytes for integer codes)."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    kinds = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64,
             "U8": np.uint8, "I8": np.int8, "I16": np.int16, "BOOL": np.bool_}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        raw = body[info["data_offsets"][0]:info["data_offsets"][1]]
        if info["dtype"] == "BF16":  # numpy has no bfloat16: it is the high half of a float32
            tensors[name] = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            tensors[name] = np.frombuffer(raw, kinds[info["dtype"]]).astype(np.float64)
    return header.get("__metadata__", {}), tensors


def diff_safetensors(a: bytes, b: bytes) -> str:
    (ma, ta), (mb, tb) = safetensors_tensors(a), safetensors_tensors(b)
    notes = [f"metadata {ma} -> {mb}"] if ma != mb else []
    if ta.keys() != tb.keys():
        only_old, only_new = sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys())
        notes.append(f"tensors only old {only_old[:5]}, only new {only_new[:5]}")
    changed = [n for n in sorted(ta.keys() & tb.keys())
               if ta[n].shape != tb[n].shape or not np.array_equal(ta[n], tb[n])]
    worst = max((float(np.abs(ta[n] - tb[n]).max()) for n in changed if ta[n].shape == tb[n].shape), default=0.0)
    if changed:
        notes.append(f"{len(changed)} tensors differ (e.g. {', '.join(changed[:3])}), max abs diff {worst:.3g}")
    return "; ".join(notes) or "same tensors, header layout differs"


def compare_file(rel: str, old: Side, new: Side) -> tuple[str, str]:
    a, b = (old.root / rel).read_bytes(), (new.root / rel).read_bytes()
    if rel.endswith(".duckdb"):  # never byte-compared: DuckDB's file format is not reproducible
        ta, tb = duckdb_tables(old.root / rel), duckdb_tables(new.root / rel)
        if ta.keys() != tb.keys():
            return "DIFFERS", f"tables {sorted(ta)} -> {sorted(tb)}"
        notes = {n: diff_frames(old.normalize_frame(ta[n]), new.normalize_frame(tb[n])) for n in ta}
        notes = {n: note for n, note in notes.items() if note}
        if notes:
            return "DIFFERS", "; ".join(f"{n}: {note}" for n, note in notes.items())
        return "same-content", f"{len(ta)} tables equal" + (" (bytes equal)" if a == b else "")
    if a == b:
        return "identical", ""
    if old.normalize(a) == new.normalize(b):
        return "same-content", "up to run ids / keys / paths"
    if rel.endswith(".parquet"):
        frames = old.normalize_frame(parquet_frame(old.root / rel)), new.normalize_frame(parquet_frame(new.root / rel))
        note = diff_frames(*frames)
        return ("DIFFERS", note) if note else ("same-content", "tables equal, bytes differ")
    if rel.endswith(".json"):
        return diff_json(old.normalize(a), new.normalize(b))
    if rel.endswith(".safetensors"):
        return "DIFFERS", diff_safetensors(a, b)
    return "DIFFERS", f"{len(a)} -> {len(b)} bytes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--same", nargs=2, action="append", default=[], metavar=("OLD_TEXT", "NEW_TEXT"),
                        help="a string of the old run that stands for one of the new run (e.g. their work folders)")
    args = parser.parse_args(argv)
    old, new = Side(args.old, [a for a, _ in args.same]), Side(args.new, [b for _, b in args.same])

    def files(side: Side) -> set[str]:
        return {str(p.relative_to(side.root)) for p in side.root.rglob("*") if p.is_file()}

    fo, fn = files(old), files(new)
    real = 0
    for rel in sorted(fo | fn):
        if rel not in fn:
            status, note = "ONLY-OLD", ""
        elif rel not in fo:
            status, note = "ONLY-NEW", ""
        else:
            status, note = compare_file(rel, old, new)
        real += status not in ("identical", "same-content")
        print(f"{status:<13} {rel}" + (f"  [{note}]" if note else ""))
    print(f"{len(fo | fn)} files, {real} differ really")
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main())
