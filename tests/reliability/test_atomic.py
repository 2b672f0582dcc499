"""Atomic, verifiable runs: publishing never shows or keeps half a run and never removes a good copy
first; writes never truncate in place; a run's files are copies, not links into the cache; readers
verify what they load; the checkpoint cache trusts bytes, not markers; `expertbits gc` removes
orphans and only orphans."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from expertbits.tasks.errors import CheckpointError
from expertbits.tasks.records import StageOutput
from expertbits.tasks.stages.stage_io import publish_stage
from expertbits.tasks.store import gc, publish
from expertbits.tasks.store.storage import TMP_MARK, Store
from expertbits.tasks.store.verify import check_folder, verify_run


def _db(path: Path, store, outputs, tmp) -> None:
    # the run database is another module's job (tested in test_flow); here any bytes that vary per call
    path.write_bytes(os.urandom(64))


def _outputs(store: Store, tmp: Path, fill: bytes = b"Q", suffix: str = "") -> dict[str, StageOutput]:
    out = {}
    for stage, files in (("statistics", {"a.parquet": b"A" * 100}), ("quantization", {"model.safetensors": fill * 300,
                                                                                   "config.json": b"{}"})):
        local = tmp / stage
        local.mkdir(parents=True)
        for name, data in files.items():
            (local / name).write_bytes(data)
        out[stage] = publish_stage(store, stage, f"key-{stage}{suffix}", local, {"stage": stage})
    return out


def _stores(tmp_path, s3) -> list[Store]:
    fs, options = s3
    return [Store(str(tmp_path / "store")), Store(f"s3://{fs.bucket}/store", options)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_republishing_keeps_an_intact_run_and_replaces_a_damaged_one_without_removing_it_first(where, tmp_path, s3):
    store = _stores(tmp_path, s3)[where == "s3"]
    outputs = _outputs(store, tmp_path / "work")
    first = publish.publish(store, "r1", outputs, {"p": 1}, database=_db)
    assert verify_run(store, "runs/r1")["ok"] and store.list(publish.INCOMING) == []
    # the same run again: intact, so kept as it is (its DuckDB bytes were not rewritten)
    again = publish.publish(store, "r1", outputs, {"p": 1}, database=_db)
    assert again.files == first.files
    # damaged: a changed byte and a planted file; republished, it is whole again and nothing is left over
    store.write_bytes("runs/r1/quantization/model.safetensors", b"X" * 300)
    store.write_bytes("runs/r1/planted.txt", b"junk")
    assert not verify_run(store, "runs/r1")["ok"]
    during = []

    def watching(path, st, outs, tmp):  # midway through the republish, the damaged copy is still all there
        during.append(store.list("runs/r1"))
        _db(path, st, outs, tmp)

    third = publish.publish(store, "r1", outputs, {"p": 1}, database=watching)
    assert "quantization/model.safetensors" in during[0] and "manifest.json" in during[0]
    assert verify_run(store, "runs/r1")["ok"] and third.files["expertbits.duckdb"] != first.files["expertbits.duckdb"]
    assert store.read_bytes("runs/r1/quantization/model.safetensors") == b"Q" * 300
    assert store.list(publish.INCOMING) == [] and "planted.txt" not in store.list("runs/r1")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_publishers_of_one_run_leave_it_intact(where, tmp_path, s3):
    import threading

    store = _stores(tmp_path, s3)[where == "s3"]
    outputs = _outputs(store, tmp_path / "work")
    other = _outputs(store, tmp_path / "other", fill=b"R", suffix="-gpu")  # the same run id, other bytes (GPU sums)
    publish.publish(store, "r3", outputs, {}, database=_db)
    store.write_bytes("runs/r3/quantization/model.safetensors", b"damaged")  # so every publisher replaces it
    barrier, results, errors = threading.Barrier(4), [], []

    def publisher(outs):
        # each its own connection and listing cache, as separate processes have
        own = Store(store.root, dict(store.storage_options, skip_instance_cache=True) if not store.is_local else None)
        barrier.wait()
        try:
            results.append(publish.publish(own, "r3", outs, {}, database=_db))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=publisher, args=(o,)) for o in (outputs, other, outputs, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 4
    assert verify_run(store, "runs/r3")["ok"] and store.list_dirs(publish.INCOMING) == []
    final = json.loads(store.read_bytes("runs/r3/manifest.json"))
    assert final["files"]["expertbits.duckdb"] in {r.files["expertbits.duckdb"] for r in results}


def test_a_stage_output_changed_since_it_was_written_is_not_published(tmp_path):
    store = Store(str(tmp_path / "store"))
    outputs = _outputs(store, tmp_path / "work")
    store.write_bytes("objects/quantization/key-quantization/model.safetensors", b"E" * 300)  # edited in the store
    from expertbits.tasks.errors import StoreError

    with pytest.raises(StoreError, match=r"(?s)objects/quantization/key-quantization: \['model.safetensors'\].*rebuilt"):
        publish.publish(store, "r4", outputs, {}, database=_db)
    assert not store.exists("runs/r4") and store.list_dirs(publish.INCOMING) == []
    # the next run rebuilds it: no record, and the differing file is gone (a layer task rebuilds a missing shard)
    assert store.list("objects/quantization/key-quantization") == ["config.json"]
    assert store.exists("objects/statistics/key-statistics/_stage.json")
    from expertbits.tasks.stages.stage_io import _complete

    assert _complete(store, "objects/statistics/key-statistics")
    store.remove("objects/statistics/key-statistics/a.parquet")  # a listed file gone: not a cache hit any more
    assert not _complete(store, "objects/statistics/key-statistics")


def test_a_stage_rewritten_consistently_by_a_concurrent_run_is_published_with_its_record(tmp_path):
    store = Store(str(tmp_path / "store"))
    outputs = _outputs(store, tmp_path / "work")
    other = tmp_path / "other"  # the same key, other bytes (a league's timings), and its own record
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"R" * 300)
    (other / "config.json").write_bytes(b"{}")
    rewritten = publish_stage(store, "quantization", "key-quantization", other, {"stage": "again"})
    manifest = publish.publish(store, "r5", outputs, {}, database=_db)
    assert manifest.files["quantization/model.safetensors"] == rewritten.files["model.safetensors"]
    assert verify_run(store, "runs/r5")["ok"] and manifest.summary["quantization"] == {"stage": "again"}


def test_a_run_is_invisible_until_complete_and_its_files_are_copies(tmp_path):
    store = Store(str(tmp_path / "store"))
    outputs = _outputs(store, tmp_path / "work")
    seen = []

    def watching_db(path, st, outs, tmp):  # called midway through publishing: what does a reader see then?
        seen.append((store.list("runs"), sorted(store.list_dirs(publish.INCOMING))))
        _db(path, st, outs, tmp)

    publish.publish(store, "r2", outputs, {}, database=watching_db)
    assert seen[0][0] == [] and len(seen[0][1]) == 1  # written under incoming/, nothing under runs/ yet
    run_file = tmp_path / "store" / "runs" / "r2" / "quantization" / "model.safetensors"
    cached = tmp_path / "store" / "objects" / "quantization" / "key-quantization" / "model.safetensors"
    assert os.stat(run_file).st_ino != os.stat(cached).st_ino
    with open(run_file, "r+b") as f:  # a user edits the run's copy in place
        f.write(b"edited")
    assert cached.read_bytes() == b"Q" * 300  # the cache is unchanged


def test_local_writes_replace_whole_files_and_never_truncate_in_place(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.write_bytes("f.json", b"old")
    held = open(tmp_path / "f.json", "rb")  # a reader holding the old file sees it whole, not truncated
    store.write_bytes("f.json", b"new content")
    assert held.read() == b"old" and (tmp_path / "f.json").read_bytes() == b"new content"
    held.close()

    class Boom(Exception):
        pass

    def dies_midway(src, dst):  # the disk fills (or the process dies) halfway through the copy
        Path(dst).write_bytes(Path(src).read_bytes()[:3])
        raise Boom

    (tmp_path / "src.json").write_bytes(b"replacement")
    monkeypatch.setattr("expertbits.tasks.store.storage.shutil.copyfile", dies_midway)
    with pytest.raises(Boom):
        store.put_file(tmp_path / "src.json", "f.json")
    assert (tmp_path / "f.json").read_bytes() == b"new content"  # the old file, whole
    assert not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_readers_verify_a_run_before_loading_it(tmp_path):
    run = tmp_path / "runs" / "r" / "quantization"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"weights")
    (run / "config.json").write_text("{}")
    from expertbits.tasks.store.storage import sha256_file

    files = {f"quantization/{n}": sha256_file(run / n) for n in ("model.safetensors", "config.json")}
    (run.parent / "manifest.json").write_text(json.dumps({"files": files}))
    assert check_folder(run) == 2
    (run / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(CheckpointError, match=r"(?s)changed \[.model.safetensors.\].*republish"):
        check_folder(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing \['model.safetensors'\]"):
        check_folder(run)
    shutil.copytree(run, tmp_path / "elsewhere" / "quantization")  # a copy taken out of the run: no record to check
    assert check_folder(tmp_path / "elsewhere" / "quantization") == 0


def test_a_damaged_cache_entry_is_fetched_again_and_a_missing_shard_is_an_error(micro_pair, tmp_path):
    from expertbits.tasks.checkpoints import fetch
    from expertbits.tasks.checkpoints.reader import Checkpoint

    _, ft = micro_pair
    cache = tmp_path / "cache"
    got = fetch.download(str(ft), cache)
    weights = got.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))  # the marker (the entry's manifest) is still there
    again = fetch.ensure_local(str(ft), got.digest, cache)
    assert fetch.verify(again) and weights.read_bytes() == (ft / "model.safetensors").read_bytes()

    # a sharded checkpoint whose first shard (embeddings only) is gone: an error naming it, never fewer tensors
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(ft / "config.json", sharded)
    from safetensors.torch import load_file, save_file

    tensors = load_file(ft / "model.safetensors")
    embed = {k: v for k, v in tensors.items() if "embed" in k}
    rest = {k: v for k, v in tensors.items() if k not in embed}
    save_file(embed, sharded / "model-00001-of-00002.safetensors")
    save_file(rest, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in embed}, **{k: "model-00002-of-00002.safetensors" for k in rest}}}))
    Checkpoint.open(sharded).close()
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing shards: \['model-00001-of-00002.safetensors'\]"):
        Checkpoint.open(sharded)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": ["a", "b"]}}))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        Checkpoint.open(sharded)


def test_gc_removes_orphans_older_than_the_age_and_nothing_else(tmp_path, s3):
    from expertbits.flows.cli import main

    for store in _stores(tmp_path, s3):
        outputs = _outputs(store, tmp_path / f"work-{store.is_local}")
        publish.publish(store, "good", outputs, {}, database=_db)
        orphans = [f"{publish.INCOMING}/runs-dead-0123456789ab", "runs/partial", "objects/quantization/killed"]
        for prefix in orphans:
            store.write_bytes(f"{prefix}/model.safetensors", b"half")
        store.write_bytes(f"{publish.INCOMING}/runs-dead-0123456789ab/manifest.json", b"{}")  # written, never visible
        store.write_bytes("objects/statistics/key-statistics/.expertbits-tmp-dead-a.parquet", b"half")
        # not orphans: a user's folder that happens to be called incoming, another name under ours
        for keep in ("incoming/my-model/config.json", f"{publish.INCOMING}/notes/readme.txt"):
            store.write_bytes(keep, b"{}")
        kept = set(store.list(""))
        found = gc.collect(store, 3600, dry_run=True)
        assert found == []  # everything is young
        later = time.time() + 7200
        found = gc.collect(store, 3600, dry_run=True, now=later)
        assert sorted(o.where for o in found) == sorted(orphans + ["objects/statistics/key-statistics/"
                                                                     ".expertbits-tmp-dead-a.parquet"])
        assert set(store.list("")) == kept  # a dry run removes nothing
        gc.collect(store, 3600, now=later)
        left = set(store.list(""))
        assert not any(o in f for f in left for o in orphans) and not any(TMP_MARK in f for f in left)
        assert {"incoming/my-model/config.json", f"{publish.INCOMING}/notes/readme.txt"} <= left
        assert verify_run(store, "runs/good")["ok"]
        assert all(store.exists(f"{o.prefix}/_stage.json") for o in outputs.values())

    # local: a prefix with one recent file is young; and a file written after the scan is kept
    store = Store(str(tmp_path / "store"))
    old = time.time() - 7200
    for name in ("a.safetensors", "b.safetensors"):
        store.write_bytes(f"objects/quantization/slow/{name}", b"x")
    os.utime(store.uri("objects/quantization/slow/a.safetensors"), (old, old))
    assert gc.collect(store, 3600) == [] and store.exists("objects/quantization/slow/a.safetensors")
    os.utime(store.uri("objects/quantization/slow/b.safetensors"), (old, old))
    [orphan] = gc.store_orphans(store, 3600)
    store.write_bytes("objects/quantization/slow/c.safetensors", b"x")  # the stage resumes meanwhile
    gc._remove_old(store, orphan.where, time.time() - 3600)
    assert store.list("objects/quantization/slow") == ["c.safetensors"]

    cache = tmp_path / "cache"
    dead = cache / "checkpoints" / ".incoming-dead"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    os.utime(dead / "model.safetensors", (old, old))
    os.utime(dead, (old, old))
    young = cache / "checkpoints" / ".incoming-live"
    young.mkdir()
    assert main(["gc", "--store", str(tmp_path / "store"), "--cache-dir", str(cache), "--older-than", "1h"]) == 0
    assert not dead.exists() and young.exists()
    assert main(["gc", "--store", str(tmp_path / "store"), "--older-than", "soon"]) == 2
    assert main(["gc", "--store", str(tmp_path / "store"), "--older-than", "30s"]) == 2
