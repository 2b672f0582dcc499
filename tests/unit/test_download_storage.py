"""Download into the content-addressed cache, and the storage seam, over file://, zoo://, hf:// and s3:// (moto)."""

import shutil

import pytest

from expertbits.tasks.checkpoints import fetch as dl
from expertbits.tasks.errors import CheckpointError, StoreError
from expertbits.tasks.store.storage import Store, sha256_file


def test_local_download_is_content_addressed_and_verified(micro_pair, tmp_path):
    ft = micro_pair[1]
    a = dl.download(str(ft), tmp_path / "cache")
    b = dl.download(f"file://{ft}", tmp_path / "cache")
    assert a.digest == b.digest and a.path == b.path == tmp_path / "cache" / "checkpoints" / a.digest
    assert sha256_file(a.path / "model.safetensors") == sha256_file(ft / "model.safetensors")
    assert dl.verify(a.path)
    (a.path / "model.safetensors").write_bytes(b"tampered")
    assert not dl.verify(a.path)
    assert not list((tmp_path / "cache" / "checkpoints").glob(".incoming-*"))


def test_zoo_uri_resolves_to_the_bundled_model(tmp_path):
    got = dl.download("zoo://micro-mixtral/finetuned", tmp_path)
    assert (got.path / "config.json").is_file() and (got.path / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="no zoo model"):
        dl.download("zoo://micro-mixtral/nope", tmp_path)


def test_ensure_local_refetches_a_cleared_cache(micro_pair, tmp_path):
    got = dl.download(str(micro_pair[0]), tmp_path)
    shutil.rmtree(got.path)
    assert dl.ensure_local(str(micro_pair[0]), got.digest, tmp_path) == got.path
    assert dl.verify(got.path)


def test_fingerprint_changes_when_a_file_changes(micro_pair, copy_ckpt):
    d = copy_ckpt(micro_pair[0])
    before = dl.fingerprint(str(d))
    (d / "config.json").write_text((d / "config.json").read_text() + " ")
    assert dl.fingerprint(str(d)) != before


def test_missing_folder_and_unknown_scheme_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        dl.download(str(tmp_path / "nope"), tmp_path / "cache")
    with pytest.raises(CheckpointError, match="unsupported checkpoint URI"):
        dl.download("ftp://host/x", tmp_path / "cache")


def test_hf_uri_from_a_local_hub_cache(micro_pair, tmp_path, monkeypatch):
    """hf://org/name@sha through huggingface_hub, offline, against a hub-layout cache on disk."""
    import huggingface_hub.constants as hfc

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--micro-moe"
    shutil.copytree(micro_pair[1], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    got = dl.download(f"hf://acme/micro-moe@{sha}", tmp_path / "cache")
    assert got.digest == dl.download(str(micro_pair[1]), tmp_path / "cache").digest
    assert dl.download("hf://acme/micro-moe", tmp_path / "cache").digest == got.digest  # offline: refs/main
    with pytest.raises(CheckpointError, match="expected hf://org/name"):
        dl.download("hf://just-a-name", tmp_path / "cache")


def test_s3_download_through_moto(micro_pair, s3, tmp_path):
    fs, options = s3
    fs.put(str(micro_pair[1]) + "/", f"{fs.bucket}/models/ft/", recursive=True)
    got = dl.download(f"s3://{fs.bucket}/models/ft", tmp_path / "cache", options)
    assert got.digest == dl.download(str(micro_pair[1]), tmp_path / "cache").digest
    with pytest.raises(CheckpointError, match="no checkpoint files"):
        dl.download(f"s3://{fs.bucket}/models/none", tmp_path / "cache", options)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_store_roundtrip_and_staging_cleanup(backend, tmp_path, request):
    if backend == "s3":
        fs, options = request.getfixturevalue("s3")
        store = Store(f"s3://{fs.bucket}/root", options)
    else:
        store = Store(str(tmp_path / "store"))
    store.check_reachable()
    store.write_bytes("a/b.txt", b"hello")
    store.copy("a/b.txt", "c/d.txt")
    assert store.read_bytes("c/d.txt") == b"hello" and store.list("a") == ["b.txt"]
    with pytest.raises(RuntimeError), store.staging("half"):
        store.write_bytes("half/x", b"1")
        raise RuntimeError("writer died")
    assert not store.exists("half/x")


def test_unreachable_store_is_a_clear_error(s3_endpoint):
    with pytest.raises(StoreError, match="unreachable") as e:
        Store("s3://no-such-bucket/x", {"endpoint_url": s3_endpoint}).check_reachable()
    assert "fix:" in str(e.value)
    with pytest.raises(StoreError, match="unreachable"):
        Store("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}},
                                "connect_timeout": 1}).check_reachable()
