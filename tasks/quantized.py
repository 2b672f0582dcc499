"""Read an expertbits-quantized checkpoint back: its config and its packed matrices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from safetensors import safe_open

from expertbits.kernels.packing import QuantizedTensor

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


def iter_quantized(path: Path, device: str = "cpu", layer: int | None = None) -> Iterator[tuple[str, dict, QuantizedTensor]]:
    """(module name, its config entry, packed tensor) for every quantized matrix (of one MoE layer,
    if given), in shard order; only the shards holding them are opened."""
    qc = quantization_config(path)
    index_file = path / "model.safetensors.index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: no model.safetensors.index.json", "the quantized checkpoint is incomplete; quantize again")
    weight_map = json.loads(index_file.read_text())["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for name, info in qc["modules"].items():
        if layer is not None and info["layer"] != layer:
            continue
        key = f"{name}.qweight"
        if key not in weight_map:
            raise CheckpointError(f"{path}: quantization_config lists {name} but no shard holds {key}",
                                  "the quantized checkpoint is incomplete or was edited; quantize again")
        by_shard.setdefault(weight_map[key], []).append(name)
    for shard in sorted(by_shard):
        with safe_open(path / shard, framework="pt", device=str(device)) as f:
            for name in by_shard[shard]:
                info = qc["modules"][name]
                yield name, info, QuantizedTensor(
                    packed=f.get_tensor(f"{name}.qweight"), scales=f.get_tensor(f"{name}.scales"),
                    zeros=f.get_tensor(f"{name}.zeros"), bits=info["bits"], group_size=qc["group_size"],
                    shape=tuple(info["shape"]))
