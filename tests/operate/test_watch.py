"""The watcher's rules on their own: what counts as complete, the content digest, the claim, and
the refusals (an unreachable store, an event for a URI nobody watches)."""

import json
import shutil
import struct

import pytest

from expertbits.tasks.checkpoints.watch import scan, under
from expertbits.tasks.errors import StoreError


def test_a_checkpoint_is_announced_only_when_complete(micro_pair, tmp_path):
    _, ft = micro_pair
    root = tmp_path / "incoming"
    shutil.copytree(ft, root / "a")
    (found,) = scan(str(root))
    assert found.incomplete is None and len(found.digest) == 64 and found.uri == str(root / "a")

    shard = root / "a" / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # a copy still in progress
    (found,) = scan(str(root))
    assert found.digest is None and "still being written" in found.incomplete
    shard.write_bytes(data[:5])
    assert "shorter than a safetensors header" in scan(str(root))[0].incomplete
    (length,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[: 8 + length // 2])
    assert "shorter than its header says" in scan(str(root))[0].incomplete
    shard.write_bytes(data)
    (root / "a" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    assert "missing" in scan(str(root))[0].incomplete
    (root / "a" / "model.safetensors.index.json").unlink()
    shutil.copytree(ft, root / "b")
    assert len({f.digest for f in scan(str(root))}) == 1  # the same bytes, the same digest
    (root / "b" / "model.safetensors").touch()  # a new mtime is not new content
    assert len({f.digest for f in scan(str(root))}) == 1


def test_s3_prefixes_use_etags_and_same_bytes_keep_the_digest(micro_pair, s3):
    fs, options = s3
    _, ft = micro_pair
    fs.put(str(ft) + "/", f"{fs.bucket}/in/m/", recursive=True)
    (first,) = scan(f"s3://{fs.bucket}/in", options)
    fs.put(str(ft) + "/", f"{fs.bucket}/in/m/", recursive=True)
    (again,) = scan(f"s3://{fs.bucket}/in", options)
    assert first.uri == f"s3://{fs.bucket}/in/m" and first.digest == again.digest and first.incomplete is None
    fs.pipe(f"{fs.bucket}/in/m/config.json", b"{}")
    assert scan(f"s3://{fs.bucket}/in", options)[0].digest != first.digest


def test_an_unreachable_store_fails_the_scan():
    with pytest.raises(StoreError, match="cannot list watched prefix s3://nobody"):
        scan("s3://nobody-here/x", {"endpoint_url": "http://127.0.0.1:9", "connect_timeout": 1, "retries": 0})


def test_under_refuses_uris_outside_and_dot_dot():
    assert under("s3://b/in/m1", ["s3://b/in"]) and under("/data/in/m", ["/data/in/"])
    assert not under("s3://b/input/m1", ["s3://b/in"]) and not under("s3://b/in/../secret", ["s3://b/in"])
    assert under("hf://org/name@abc", ["hf://org/name"]) and not under("hf://org/other@abc", ["hf://org/name"])


@pytest.mark.integration
def test_watch_flow_claims_once_and_emits_nothing_when_a_store_fails(prefect_api, micro_pair, tmp_path):
    from expertbits.flows.params import WatchParams
    from expertbits.flows.watch import claim, requantize, watch_checkpoints

    _, ft = micro_pair
    shutil.copytree(ft, tmp_path / "in" / "m1")
    params = WatchParams(prefixes=[str(tmp_path / "in")], store=str(tmp_path / "store"))
    first = watch_checkpoints(params)
    assert [a["uri"] for a in first] == [str(tmp_path / "in" / "m1")] and first[0]["event_id"]
    assert watch_checkpoints(params) == []  # announced once, durably (a Prefect Variable)
    assert not claim(first[0]["uri"], first[0]["digest"], None, "other-watcher")

    shutil.copytree(ft, tmp_path / "in" / "m2")
    broken = params.model_copy(update={"prefixes": [str(tmp_path / "in"), "s3://nobody-here/x"],
                                       "storage_options": {"endpoint_url": "http://127.0.0.1:9", "retries": 0}})
    with pytest.raises(StoreError):
        watch_checkpoints(broken)
    assert [a["uri"] for a in watch_checkpoints(params)] == [str(tmp_path / "in" / "m2")]  # nothing was claimed

    assert requantize(str(tmp_path / "elsewhere"), "0" * 64, params, event_id="e1") is None
    assert not (tmp_path / "store").exists()


def test_sharded_uploads_bad_headers_and_watch_settings(micro_pair, tmp_path, monkeypatch):
    from pydantic import ValidationError

    from expertbits.flows.params import WatchParams

    _, ft = micro_pair
    root = tmp_path / "in"
    (root / "s").mkdir(parents=True)
    shutil.copyfile(ft / "config.json", root / "s" / "config.json")
    shutil.copyfile(ft / "model.safetensors", root / "s" / "model-00001-of-00002.safetensors")
    assert "no model.safetensors.index.json yet" in scan(str(root))[0].incomplete  # shard 1 of 2, index not yet there
    (root / "s" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    assert "1 of 2 shards" in scan(str(root))[0].incomplete
    shutil.copytree(ft, root / "bad")
    for header in (b"[]", b'{"a": {}}', b'{"a": {"data_offsets": null}}'):
        (root / "bad" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
        found = {f.uri: f for f in scan(str(root))}
        assert found[str(root / "bad")].incomplete and found[str(root / "bad")].digest is None

    monkeypatch.chdir(tmp_path)  # ./in must match the absolute URIs the watcher finds
    relative = WatchParams(prefixes=["./in"], store=str(tmp_path / "store"))
    assert relative.prefixes == [str(root)] and under(scan("./in")[0].uri, relative.prefixes)
    with pytest.raises(ValidationError, match="inside a watched prefix"):
        WatchParams(prefixes=[str(root)], store=str(root / "store"))


def test_a_watched_prefix_inside_the_store_is_refused(tmp_path):
    """Runs published in the store would be announced as new checkpoints (the watch names
    the store's own folders)."""
    from pydantic import ValidationError

    from expertbits.flows.params import WatchParams

    with pytest.raises(ValidationError, match="lie inside the store"):
        WatchParams(prefixes=[str(tmp_path / "store" / "runs")], store=str(tmp_path / "store"))
    with pytest.raises(ValidationError, match="lie inside the store"):
        WatchParams(prefixes=["s3://b/store/incoming"], store="s3://b/store")
    assert WatchParams(prefixes=["s3://b/incoming"], store="s3://b/store").prefixes == ["s3://b/incoming"]
