"""Read a Hugging Face checkpoint folder tensor by tensor, without instantiating the model.

Only safetensors are read (no pickle). Every file's header is checked up front, so a truncated
or corrupt file fails with its name before any work starts.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from ..errors import CheckpointError


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    """A checkpoint folder: config.json plus one or more safetensors files."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _files: ExitStack = field(default_factory=ExitStack, repr=False)
    _handles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{path}: no config.json", "point at a Hugging Face checkpoint folder (config.json + *.safetensors)"
            )
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({type(e).__name__}: {e})", "re-export the checkpoint") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file}: not a JSON object", "re-export the checkpoint")
        _refuse_remote_code(config_file, config)
        files = sorted(p.name for p in path.glob("*.safetensors"))
        # a partial copy (fetch.ensure_part) holds some shards and only the headers of the others
        # (decided from the listing already taken: a shard renamed into place meanwhile is read later)
        stubs = sorted({p.name.removesuffix(HEADER) for p in path.glob("*.safetensors" + HEADER)} - set(files))
        if not files and not stubs:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found pickle files {pickles})" if pickles else ""
            raise CheckpointError(
                f"{path}: no *.safetensors files{hint}",
                "expertbits reads safetensors only; convert with model.save_pretrained(dir) (safe_serialization is the default)",
            )
        tensors: dict[str, TensorInfo] = {}
        for name in files + stubs:
            found = _read_header(path / name) if name in files else _stub_header(path / (name + HEADER), name)
            for key, info in found.items():
                if key in tensors:
                    raise CheckpointError(f"{path}: tensor {key} appears in two files", "re-export the checkpoint")
                tensors[key] = info
        _check_index(path, tensors)
        return cls(path=path, config=config, tensors=tensors)

    def _handle(self, file: str):
        if not (self.path / file).is_file():
            raise CheckpointError(f"{self.path}: {file} was not fetched into this partial copy (only its header was)",
                                  "this is a bug in choosing the shards a layer needs; please report it")
        if file not in self._handles:
            self._handles[file] = self._files.enter_context(safe_open(self.path / file, framework="pt"))
        return self._handles[file]

    def read(self, key: str, index: int | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or one expert slice of a fused 3-D tensor; only those bytes are read."""
        info = self.tensors[key]
        handle = self._handle(info.file)
        if index is None and rows is None:
            return handle.get_tensor(key)
        sl = handle.get_slice(key)
        if index is not None and rows is not None:
            return sl[index, rows[0] : rows[1]]
        if index is not None:
            return sl[index]
        return sl[rows[0] : rows[1]]

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


HEADER = ".header.json"
INDEX = "model.safetensors.index.json"


def _check_index(path: Path, tensors: dict[str, "TensorInfo"]) -> None:
    """With an index, every tensor it names must be in the shard it names: a missing shard (even
    one holding only embeddings or norms) is an error here, never tensors silently left out."""
    index = path / INDEX
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("weight_map is not an object of tensor names to file names")
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})", "re-export the checkpoint") from e
    absent = sorted({f for k, f in weight_map.items() if k not in tensors})
    if absent:
        missing = [f for f in absent if not (path / f).is_file() and not (path / (f + HEADER)).is_file()]
        raise CheckpointError(f"{path}: {INDEX} lists tensors that no shard holds ("
                              + (f"missing shards: {missing[:3]}" if missing else f"expected in {absent[:3]}") + ")",
                              "copy the whole checkpoint folder (every shard the index names); if it came from the "
                              "expertbits cache, delete that cache entry and rerun")
    moved = sorted(k for k, f in weight_map.items() if tensors[k].file != f)
    unlisted = sorted(set(tensors) - set(weight_map))
    if moved or unlisted:
        raise CheckpointError(f"{path}: {INDEX} disagrees with the shards (tensors in another file: {moved[:3]}, "
                              f"not in the index: {unlisted[:3]})", "re-export the checkpoint")


def _stub_header(stub: Path, name: str) -> dict[str, TensorInfo]:
    header = json.loads(stub.read_text())
    return {k: TensorInfo(file=name, dtype=v["dtype"], shape=tuple(v["shape"])) for k, v in header.items()
            if k != "__metadata__"}


def _refuse_remote_code(config_file: Path, config: dict) -> None:
    """expertbits never runs code shipped with a checkpoint. An `auto_map` is harmless for a
    model_type transformers implements itself (DeepSeek-V3's hub config carries one); for any
    other it means the model exists only as the checkpoint's own code."""
    if "auto_map" not in config:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type, auto_map = config.get("model_type"), config["auto_map"]
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        names = sorted(map(str, auto_map)) if isinstance(auto_map, (dict, list)) else auto_map
        raise CheckpointError(f"{config_file}: model_type {model_type!r} exists only as remote code "
                              f"(auto_map: {str(names)[:200]}), which expertbits never runs",
                              "use a model whose architecture transformers implements (see 'Supported checkpoints')")


# safetensors' own limits and dtypes (bits per element: F4 and F6 pack several per byte)
MAX_HEADER = 100_000_000
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
              "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def check_safetensors(file: Path) -> dict:
    """Refuse a file whose header is not a well-formed safetensors header, with the reason: length
    beyond the limit or the file, bytes that are not UTF-8 JSON (or nest beyond reason), unknown
    dtypes, offsets out of range, overlapping, or disagreeing with dtype x shape. Reads the header
    only, and returns it."""
    with open(file, "rb") as f:
        return read_safetensors_header(f, file.stat().st_size, str(file))


def read_safetensors_header(f: BinaryIO, size: int, file: str) -> dict:
    """The checked header of the safetensors file open as `f` (at its start) of `size` bytes; `file`
    names it in errors. Local files and remote shards (two small reads) are checked alike."""
    fix = "the file is damaged or was not written by safetensors; download or export the checkpoint again"
    prefix = f.read(8)
    n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
    if not 2 <= n <= min(MAX_HEADER, size - 8):
        what = "corrupt or truncated" if n <= MAX_HEADER else "corrupt"
        raise CheckpointError(f"{file}: {what}: safetensors header length {n} for a file of {size} bytes (limit "
                              f"{MAX_HEADER})", fix)
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: the safetensors header is not UTF-8 ({e})", fix) from e
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: the safetensors header is not valid JSON ({type(e).__name__})", fix) from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: the safetensors header is not a JSON object", fix)
    data, spans = size - 8 - n, []
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and (not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{file}: __metadata__ must map strings to strings", fix)
            continue
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] not in DTYPE_BITS:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']!r}, which this expertbits does not "
                                  f"know (known: {sorted(DTYPE_BITS)})", "convert the checkpoint to bf16/fp16/fp32 first")
        ok = (isinstance(info, dict) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{file}: tensor {key!r} has a malformed entry (dtype, shape, data_offsets): "
                                  f"{str(info)[:200]}", fix)
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data:
            raise CheckpointError(f"{file}: corrupt or truncated: tensor {key!r} spans bytes [{begin}, {end}) of a "
                                  f"{data}-byte data section", fix)
        count = 1
        for d in info["shape"]:
            count *= d
        bits = count * DTYPE_BITS[info["dtype"]]
        if bits % 8 or end - begin != bits // 8:
            raise CheckpointError(f"{file}: tensor {key!r} is {info['dtype']} {info['shape']} ({bits / 8:g} bytes) but "
                                  f"its offsets span {end - begin}", fix)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{file}: tensors {a!r} and {b!r} overlap", fix)
    return header


def _read_header(file: Path) -> dict[str, TensorInfo]:
    size = file.stat().st_size
    check_safetensors(file)
    try:
        with safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            infos = {}
            for k in keys:
                sl = f.get_slice(k)
                infos[k] = TensorInfo(file=file.name, dtype=str(sl.get_dtype()), shape=tuple(sl.get_shape()))
    except Exception as e:
        raise CheckpointError(
            f"{file}: corrupt or truncated safetensors file ({size} bytes): {e}",
            "download or export the checkpoint again; check that the copy finished",
        ) from e
    return infos


def require_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(
            f"{what} has {bad} NaN/Inf values", "the checkpoint is damaged or diverged in training; use a healthy checkpoint"
        )
