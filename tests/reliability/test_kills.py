"""SIGKILL at every stage boundary, in the middle of quantization and in the middle of publishing,
on a local store, and where S3's writes differ on S3 (S3_POINTS): each rerun resumes from what was complete, the final run is
byte-identical to an uninterrupted one (its DuckDB's tables identical), no partial run is ever
listed, and `expertbits gc` then removes what the kills left and nothing else.

Each kill is `kill -9` of the `expertbits quantize` process group, the moment the store shows the
point was reached (polled every 50 ms): the process is then already in the next step, as a real
kill lands."""

from __future__ import annotations

import time

import pytest
from support.runner import (
    STAGES,
    done_stages,
    finish,
    kill,
    layer_shards_written,
    quantize_args,
    run_files,
    run_tables,
    start,
    until,
)

from expertbits.tasks.store import catalog, gc
from expertbits.tasks.store.publish import INCOMING
from expertbits.tasks.store.storage import TMP_MARK, Store
from expertbits.tasks.store.verify import verify_run

pytestmark = pytest.mark.integration


def _points(store: Store, cache) -> list[tuple[str, object]]:
    downloaded = lambda: any((cache / "index").glob("*.json"))  # noqa: E731
    points = [("after download", downloaded)]
    for stage in STAGES:
        if stage == "quantization":
            points.append(("mid-quantization (a layer shard written)", lambda: layer_shards_written(store)))
        points.append((f"after {stage}", lambda s=stage: s in done_stages(store)))
    old = set(store.list_dirs(INCOMING))  # left by earlier kills: the point is a new one appearing
    points.append(("mid-publish (a run under incoming/)", lambda: bool(set(store.list_dirs(INCOMING)) - old)))
    return points


# On S3 every stage is published by the same code as on a local disk (stage_io.publish_stage,
# `_stage.json` last), which the local run kills at every boundary; S3 is killed where its writes
# differ: amid a stage's per-layer objects, at one stage boundary, and amid publishing (copy_in).
S3_POINTS = ("mid-quantization", "after quantization", "mid-publish")


def _kill_everywhere(params: dict, store: Store, options: dict | None, tmp_path) -> dict:
    cache, log = tmp_path / "cache", tmp_path / "flow.log"
    args = quantize_args(params, store.root, options, cache_dir=str(cache))  # its own: the download is not a hit
    kills = []
    points = _points(store, cache)
    if not store.is_local:
        points = [(name, reached) for name, reached in points if name.startswith(S3_POINTS)]
    for name, reached in points:
        if name.startswith("mid-publish"):  # a fresh look at incoming/ once every stage is done
            name, reached = _points(store, cache)[-1]
        if reached():  # an earlier attempt got past this point before its kill landed
            continue
        proc = start(args, cache, log)
        if not until(reached, 300, proc=proc):
            finish(proc, log)  # it ended without reaching the point: it must have succeeded
            break
        kill(proc)
        complete = sorted(done_stages(store), key=STAGES.index)
        kills.append({"point": name, "complete": complete,
                      "mid_quantization": "quantization" not in complete and layer_shards_written(store)})
        # nothing half-written is ever a run
        assert catalog.list_runs(store).empty, f"a run is listed after the kill {name}"
    else:
        proc = start(args, cache, log)
        finish(proc, log)
    return {"kills": kills, "log": log}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_at_every_stage_boundary_then_rerun_gives_the_same_bytes(where, prefect_api, params, s3, tmp_path):
    fs, options = s3
    make = (lambda name: Store(str(tmp_path / name))) if where == "local" else (
        lambda name: Store(f"s3://{fs.bucket}/{name}", options))
    opts = options if where == "s3" else None

    # the uninterrupted run, to compare with
    reference = make("reference")
    proc = start(quantize_args(params, reference.root, opts, cache_dir=str(tmp_path / "ref-cache")), tmp_path / "ref-cache",
                 tmp_path / "ref.log")
    finish(proc, tmp_path / "ref.log")
    [ref_id] = catalog.list_runs(reference).run_id

    store = make("store")
    result = _kill_everywhere(params, store, opts, tmp_path)
    points = [k["point"] for k in result["kills"]]
    print(f"\n{where}: {len(points)} kills survived: " + "; ".join(
        f"{k['point']} (complete: {','.join(k['complete']) or 'none'})" for k in result["kills"]))
    # killed at (or, for a fast stage, just past) every boundary (on S3 those of S3_POINTS), and once with
    # part of the layer shards written
    assert len(points) >= (9 if where == "local" else 3), points
    assert any(k["mid_quantization"] for k in result["kills"]), result["kills"]
    assert points[-1].startswith("mid-publish"), points

    runs = catalog.list_runs(store)
    assert len(runs) == 1, runs
    [run_id] = runs.run_id
    assert verify_run(store, f"runs/{run_id}")["ok"]
    assert run_files(store, run_id) == run_files(reference, ref_id)  # byte-identical artifacts
    assert run_tables(store, run_id, tmp_path) == run_tables(reference, ref_id, tmp_path)

    # what the kills left behind (a run never made visible, unfinished writes) is an orphan; gc
    # removes only that, and the run is intact after it
    removed = gc.collect(store, 0, tmp_path / "cache", now=time.time() + 1)
    assert removed and all(o.where.startswith(f"{INCOMING}/runs-") or TMP_MARK in o.where
                           for o in removed if o.in_store), removed
    assert verify_run(store, f"runs/{run_id}")["ok"] and set(catalog.list_runs(store).run_id) == {run_id}
    assert store.list(INCOMING) == []
    print(f"{where}: gc removed {len(removed)} orphans: {[o.where for o in removed]}")
