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
FORMAT_VERSION = 2  # 1 stored fp16 offsets; 2 stores integer zero points
# the files besides the weights that a quantized folder carries over from its source, by name prefix
SIDE_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "generation_config", "chat_template")


def quantization_config(path: Path) -> dict:
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
