"""Hostile input: files and names expertbits did not write get a clear error naming the file and
the fix, and nothing enters the cache or the store."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from expertbits.tasks.checkpoints.fetch import download
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.errors import CheckpointError


def _checkpoint(folder, tensors_bytes: bytes | None = None, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "mixtral"}))
    if tensors_bytes is None:
        save_file({"a": torch.zeros(2, 3), "b": torch.ones(4)}, folder / "model.safetensors")
    else:
        (folder / "model.safetensors").write_bytes(tensors_bytes)
    return folder


def _raw(header, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
HOSTILE = {
    "huge header length": (_raw(GOOD, bytes(40), length=1 << 62), "header length"),
    "header longer than the file": (_raw(GOOD, bytes(40), length=10_000), "header length"),
    "non-UTF-8 header": (_raw(b'{"a": "\xff\xfe"}' + b" " * 8), "not UTF-8"),
    "deeply nested JSON": (_raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    "overlapping offsets": (_raw({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "overlap"),
    "offsets beyond the data": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8000]}}, bytes(8)),
                                "corrupt or truncated"),
    "negative offset": (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(8)), "spans bytes"),
    "dtype x shape disagrees with the bytes": (_raw({"a": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}},
                                                    bytes(16)), "offsets span 16"),
    "unknown dtype": (_raw({"a": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "does not know"),
    "malformed entry": (_raw({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8)), "malformed"),
    "header not an object": (_raw([1, 2, 3]), "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_is_refused_by_name_and_nothing_is_cached(case, tmp_path):
    data, reason = HOSTILE[case]
    src = _checkpoint(tmp_path / "src", data)
    with pytest.raises(CheckpointError, match=reason) as err:
        Checkpoint.open(src)
    assert "model.safetensors" in str(err.value) and err.value.fix  # the file, and what to do
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=reason) as err:
        download(str(src), cache)
    assert f"{src}/model.safetensors" in str(err.value)  # the user's file, not a staging copy
    assert [p.name for p in (cache / "checkpoints").iterdir()] == []  # no entry, no staging folder left


def test_a_well_formed_file_still_opens(tmp_path):
    src = _checkpoint(tmp_path / "src")
    with Checkpoint.open(src) as c:
        assert torch.equal(c.read("b"), torch.ones(4))
    assert download(str(src), tmp_path / "cache").path.is_dir()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.complex64, torch.float8_e8m0fnu,
                                   torch.bool, torch.int64], ids=str)
def test_every_dtype_safetensors_writes_is_accepted(dtype, tmp_path):
    from expertbits.tasks.checkpoints.reader import check_safetensors

    save_file({"t": torch.zeros(3, 2).to(dtype), "empty": torch.zeros(0, 5), "scalar": torch.tensor(1.0)},
              tmp_path / "x.safetensors")
    check_safetensors(tmp_path / "x.safetensors")
    (tmp_path / "n.safetensors").write_bytes(_raw({"__metadata__": None, "f4": {"dtype": "F4", "shape": [8],
                                                                              "data_offsets": [0, 4]}}, bytes(4)))
    check_safetensors(tmp_path / "n.safetensors")  # F4 packs two per byte; null metadata is allowed


def test_remote_code_is_refused_unless_transformers_implements_the_model(tmp_path):
    remote = _checkpoint(tmp_path / "remote", config={"model_type": "my_moe", "auto_map": {"AutoConfig": "x.MyConfig"}})
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'my_moe' exists only as remote code"):
        download(str(remote), tmp_path / "cache")
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == []
    # DeepSeek-V3's hub config carries an auto_map, but transformers implements the model itself
    native = _checkpoint(tmp_path / "native", config={"model_type": "deepseek_v3", "auto_map": {"AutoConfig": "x.Y"}})
    Checkpoint.open(native).close()
    for config in ({"model_type": ["x"], "auto_map": 3}, {"model_type": None, "auto_map": [1, "a"]}):
        odd = _checkpoint(tmp_path / "odd", config=config)
        with pytest.raises(CheckpointError, match="exists only as remote code"):
            Checkpoint.open(odd)


@pytest.mark.parametrize("uri", ["zoo://../../tasks", "zoo://mixtral-tiny/../../models/mixtral-tiny/wordnet",
                                 "zoo://Mixtral-tiny/wordnet", "zoo://mixtral-tiny/wordnet/extra", "zoo:///etc/passwd"])
def test_zoo_names_cannot_leave_the_zoo(uri, tmp_path):
    with pytest.raises(CheckpointError, match="not a bundled model name"):
        download(uri, tmp_path / "cache")


def test_zoo_text_names_cannot_leave_the_zoo():
    from expertbits.zoo import read_text, text_path

    for bad in ("../../README", "text/../../x", "/etc/passwd"):
        with pytest.raises(FileNotFoundError, match="not a bundled text name"):
            read_text(f"zoo://text/{bad}")
        with pytest.raises(FileNotFoundError, match="not a bundled text name"):
            text_path(bad)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"secret": torch.zeros(1)}, outside / "x.safetensors")
    src = _checkpoint(tmp_path / "src")
    (src / "model-00002.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        download(str(src), tmp_path / "cache")
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == []
    hub = tmp_path / "hub" / "models--org--moe"  # a hub cache snapshot: files link into the repo's blobs/
    _checkpoint(hub / "blobs" / "tmp")
    snapshot = hub / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(f"../../blobs/tmp/{name}")
    assert download(str(snapshot), tmp_path / "cache3").path.is_dir()
    inside = _checkpoint(tmp_path / "src2")  # a link within the folder is the folder's own file
    shutil.move(inside / "model.safetensors", inside / "real.bin")
    (inside / "model.safetensors").symlink_to(inside / "real.bin")
    assert download(str(inside), tmp_path / "cache2").path.is_dir()


@pytest.mark.parametrize("uri", ["s3://bucket/../other/ckpt", "s3://bucket/a/./b", "s3://bucket/ckpt/.."])
def test_s3_keys_with_dot_segments_are_refused(uri, tmp_path):
    with pytest.raises(CheckpointError, match=r"'\.\.' segment"):
        download(uri, tmp_path / "cache")


def test_league_summaries_under_a_path_with_quotes(tmp_path):
    """Paths reach DuckDB as bound parameters: a quote in a folder name neither breaks nor changes a query."""
    from expertbits.zoo import leagues

    results = __import__("pathlib").Path(leagues.__file__).parent / "results"
    hostile = tmp_path / "it's a \"store\"'); COPY (SELECT 1) TO 'pwned.csv"
    for summary in sorted(results.glob("*/league_summary.parquet")):
        (hostile / summary.parent.name).mkdir(parents=True)
        shutil.copyfile(summary, hostile / summary.parent.name / summary.name)
    assert leagues.overall(hostile, "gptq") == leagues.overall(results, "gptq")
    assert leagues.budget_table(hostile, 2.5) == leagues.budget_table(results, 2.5)
    assert not list(tmp_path.rglob("pwned.csv"))
