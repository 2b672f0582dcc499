"""Read a Hugging Face checkpoint folder tensor by tensor, without instantiating the model.

Only safetensors are read (no pickle). Every file's header is checked up front, so a truncated
or corrupt file fails with its name before any work starts.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CheckpointError


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
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file}: not valid JSON ({e})", "re-export the checkpoint") from e
        files = sorted(p.name for p in path.glob("*.safetensors"))
        # a partial copy (download.ensure_part) holds some shards and only the headers of the others
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


def _stub_header(stub: Path, name: str) -> dict[str, TensorInfo]:
    header = json.loads(stub.read_text())
    return {k: TensorInfo(file=name, dtype=v["dtype"], shape=tuple(v["shape"])) for k, v in header.items()
            if k != "__metadata__"}


def _read_header(file: Path) -> dict[str, TensorInfo]:
    size = file.stat().st_size
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
