"""Read an expertbits-quantized checkpoint back: packed matrices, or a dequantized fp copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertbits.kernels.packing import QuantizedTensor

from .checkpoint import Checkpoint
from .errors import CheckpointError


def quantization_config(path: Path) -> dict:
    from .quantize import FORMAT_VERSION

    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "expertbits":
        raise CheckpointError(f"{path}: not an expertbits-quantized checkpoint", "run the quantization stage first")
    if qc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in expertbits format version {qc.get('version')}, this expertbits reads "
                              f"version {FORMAT_VERSION}", "quantize the checkpoint again with this version")
    return qc


def iter_quantized(path: Path) -> Iterator[tuple[str, dict, QuantizedTensor]]:
    """(module name, its config entry, packed tensor) for every quantized matrix, in shard order."""
    qc = quantization_config(path)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for name in qc["modules"]:
        by_shard.setdefault(weight_map[f"{name}.qweight"], []).append(name)
    for shard in sorted(by_shard):
        with safe_open(path / shard, framework="pt") as f:
            for name in by_shard[shard]:
                info = qc["modules"][name]
                yield name, info, QuantizedTensor(
                    packed=f.get_tensor(f"{name}.qweight"), scales=f.get_tensor(f"{name}.scales"),
                    zeros=f.get_tensor(f"{name}.zeros"), bits=info["bits"], group_size=qc["group_size"],
                    shape=tuple(info["shape"]))


def dequantize_checkpoint(path: Path, source: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """An fp checkpoint in the source's key layout, expert weights replaced by their dequantized values.

    transformers then loads it like the original, so evaluation needs no model-specific code.
    """
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    with Checkpoint.open(source) as src:
        for name, info, q in iter_quantized(path):
            key, index, rows = info["source"]["key"], info["source"]["index"], info["source"]["rows"]
            w = q.dequantize().to(dtype)
            if index is None and rows is None:
                tensors[key] = w
                continue
            if key not in tensors:
                tensors[key] = torch.empty(src.tensors[key].shape, dtype=dtype)
            target = tensors[key][index] if index is not None else tensors[key]
            if rows:
                target[rows[0]:rows[1]] = w
            else:
                target.copy_(w)
        for key in src.tensors:
            if key not in tensors:
                tensors[key] = src.read(key)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for p in source.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
            shutil.copyfile(p, out / p.name)
    return out
