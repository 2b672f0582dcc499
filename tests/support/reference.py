"""An independent reference for the packed runtime: transformers' own experts on our dequantized weights."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.model.packed_folder import iter_quantized


def dequantize_checkpoint(path: Path, source: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """An fp checkpoint in the source's key layout, expert weights replaced by their dequantized values:
    transformers loads it like the original and runs the experts with its own code."""
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
