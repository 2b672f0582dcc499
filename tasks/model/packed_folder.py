"""Read an expertbits-quantized checkpoint back: its config and its packed matrices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from safetensors import safe_open

from expertbits.kernels.packing import QuantizedTensor

from ..errors import CheckpointError

# The format's identity in config.json. The model_type text and its old import path are part of
# every published folder: `expertbits.tasks.loader` is kept (deprecated) so the text stays true.
QUANT_METHOD = "expertbits"
# config.json's model_type: a marker plain transformers does not know, so it refuses the folder with
# this text in its error instead of skipping the unknown quant_method and building random experts;
# `import expertbits.tasks.loader` (now expertbits.tasks.model.load) teaches transformers to read it (base_model_type is the real one)
MODEL_TYPE = ("expertbits (per-expert packed MoE weights that only expertbits can run; pip install expertbits, then "
              "`import expertbits.tasks.loader` before from_pretrained, or run `expertbits generate --model <folder>`)")
FORMAT = "expertbits-int32-packed-groupwise"
# 1 stored fp16 offsets; 2 stores integer zero points; 3 may rotate a matrix's inputs ("rotation"
# and "signs", the name of its sign tensor) and may pack dense linear layers ("dense_modules").
# A folder with neither is written as 2, so older readers keep reading everything they can; one
# with either as 3, which they refuse instead of misreading it.
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
ROTATION = "hadamard"  # kernels/hadamard.py: x ↦ fwht(x ⊙ signs), blocks of the largest power of two dividing K
PACKED_SUFFIXES = ("qweight", "scales", "zeros")
# the files besides the weights that a quantized folder carries over from its source, by name prefix
SIDE_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "generation_config", "chat_template")


def quantization_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc or qc.get("quant_method") != "expertbits":
        raise CheckpointError(f"{path}: not an expertbits-quantized checkpoint", "run the quantization stage first")
    check_version(qc, path)
    return qc


def check_version(qc: dict, where: object) -> None:
    if qc.get("version") not in READ_VERSIONS:
        raise CheckpointError(f"{where}: written in expertbits format version {qc.get('version')}, this expertbits reads "
                              f"versions {', '.join(map(str, READ_VERSIONS))}",
                              "quantize the checkpoint again with this version, or upgrade expertbits")


def version_for(modules: dict, dense_modules: dict | None = None) -> int:
    """The version a folder with these `modules` (and `dense_modules`) entries is written as (see FORMAT_VERSION)."""
    return FORMAT_VERSION if dense_modules or any("rotation" in info for info in modules.values()) else 2


def signs_key(name: str, k: int) -> str:
    """Where the rotation signs of a K-input matrix named `name` are stored: one int8 [K] tensor per
    decoder layer and input width, shared by every expert matrix of that layer that reads it."""
    from ..checkpoints.adapters import block_of

    return f"{block_of(name) or name}.expertbits_signs_{k}"  # the head is in no decoder layer


SIGNS_KEY = r"\.expertbits_signs_\d+$"  # what transformers must not mistake for a model weight


def stored_keys(name: str, info: dict) -> tuple[str, ...]:
    """The tensors a quantized matrix is stored as: codes, scales, zero points, and a rotated one's signs."""
    keys = tuple(f"{name}.{s}" for s in PACKED_SUFFIXES)
    rotation = info.get("rotation")
    if rotation is None:
        return keys
    if rotation != ROTATION or not isinstance(info.get("signs"), str):
        raise CheckpointError(f"{name}: unknown input rotation {rotation!r} (this expertbits knows {ROTATION!r}, with "
                              "the name of its `signs` tensor)", "upgrade expertbits, or quantize the checkpoint again")
    return (*keys, info["signs"])


def packed_tensor(name: str, info: dict, group_size: int, get) -> QuantizedTensor:
    """The QuantizedTensor of module `name` from `get(tensor name)`, by its config entry."""
    parts = [get(key) for key in stored_keys(name, info)]
    return QuantizedTensor(*parts[:3], bits=info["bits"], group_size=group_size, shape=tuple(info["shape"]),
                           signs=parts[3] if len(parts) > 3 else None)


def iter_quantized(path: Path, device: str = "cpu", layer: int | None = None,
                   dense: bool = False) -> Iterator[tuple[str, dict, QuantizedTensor]]:
    """(module name, its config entry, packed tensor) for every quantized expert matrix (of one MoE
    layer, if given), or with `dense` every packed dense layer, in shard order; only the shards
    holding them are opened."""
    qc = quantization_config(path)
    index_file = path / "model.safetensors.index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{path}: no model.safetensors.index.json", "the quantized checkpoint is incomplete; quantize again")
    weight_map = json.loads(index_file.read_text())["weight_map"]
    entries = qc.get("dense_modules", {}) if dense else qc["modules"]
    by_shard: dict[str, list[str]] = {}
    for name, info in entries.items():
        if layer is not None and info["layer"] != layer:
            continue
        for key in stored_keys(name, info):  # codes, scales, zeros and a rotated matrix's signs
            if key not in weight_map:
                raise CheckpointError(f"{path}: quantization_config lists {name} but no shard holds {key}",
                                      "the quantized checkpoint is incomplete or was edited; quantize again")
        by_shard.setdefault(weight_map[f"{name}.qweight"], []).append(name)
    for shard in sorted(by_shard):
        with safe_open(path / shard, framework="pt", device=str(device)) as f:
            for name in by_shard[shard]:
                info = entries[name]
                yield name, info, packed_tensor(name, info, qc["group_size"], f.get_tensor)
