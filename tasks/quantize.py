"""Stage 4: group-wise round-to-nearest of every routed expert at its allocated bit-width.

The output is a Hugging Face-layout folder: config.json with a `quantization_config` that lists
every quantized matrix (its bits, shape and the source tensor it came from), the tokenizer, and
safetensors shards written layer by layer (memory is bounded by one MoE layer):

  model-00001-of-0000N.safetensors   everything not quantized, byte-for-byte as stored
  model-0000k-of-0000N.safetensors   MoE layer k-2: per matrix `<name>.qweight` int32 [N, ⌈K/(32//b)⌉],
                                     `<name>.scales` fp16 [N, ⌈K/G⌉], `<name>.offsets` fp16 [N, ⌈K/G⌉]
  model.safetensors.index.json       weight_map, as transformers writes it

Packing and dequantization (w = code·scale + offset) are defined in `expertbits.kernels.packing`.
Routers, attention, embeddings, norms and shared experts stay as stored.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pandas as pd
from safetensors.torch import save_file

from expertbits.kernels.packing import effective_bits, quantize_rtn

from .adapters import detect
from .checkpoint import Checkpoint, require_finite
from .errors import CheckpointError

FORMAT = "expertbits-int32-packed-groupwise-asymmetric"
FORMAT_VERSION = 1
Progress = Callable[[float, str], None]


def quantize_checkpoint(src: Path, alloc: pd.DataFrame, group_size: int, out: Path,
                        progress: Progress | None = None) -> dict:
    """Write the quantized checkpoint of `src` into `out` (which must not exist); return a summary."""
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    out.mkdir(parents=True)
    # one key only: safetensors writes metadata in hash-map order, so two keys break byte-reproducibility
    meta = {"format": "pt"}
    with Checkpoint.open(src) as ckpt:
        model = detect(ckpt)
        missing = sorted({(layer.layer, m.expert) for layer in model.layers for m in layer.matrices} - set(bits_of))
        if missing:
            raise CheckpointError(f"allocation has no bits for (layer, expert) {missing[:5]}",
                                  "the allocation was made for a different checkpoint; rerun the statistics stage")
        n_shards = 1 + len(model.layers)
        shard = lambda i: f"model-{i:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
        weight_map: dict[str, str] = {}
        expert_keys = {m.key for m in model.matrices}
        rest = {k: ckpt.read(k).contiguous() for k in sorted(ckpt.tensors) if k not in expert_keys}
        save_file(rest, out / shard(1), metadata=meta)
        weight_map.update(dict.fromkeys(rest, shard(1)))
        del rest
        modules, stored_bits, numel = {}, 0.0, 0
        for i, layer in enumerate(model.layers):
            tensors = {}
            for m in layer.matrices:
                w = ckpt.read(m.key, m.index, m.rows)
                require_finite(w, f"{src}: {m.name}")
                bits = bits_of[(m.layer, m.expert)]
                q = quantize_rtn(w, bits, group_size)
                tensors[f"{m.name}.qweight"], tensors[f"{m.name}.scales"], tensors[f"{m.name}.offsets"] = q.packed, q.scales, q.offsets
                modules[m.name] = {"bits": bits, "layer": m.layer, "expert": m.expert, "role": m.role,
                                   "shape": list(q.shape), "source": {"key": m.key, "index": m.index,
                                                                      "rows": list(m.rows) if m.rows else None}}
                stored_bits += effective_bits(bits, group_size, q.shape[1]) * w.numel()
                numel += w.numel()
            save_file(tensors, out / shard(i + 2), metadata=meta)
            weight_map.update(dict.fromkeys(tensors, shard(i + 2)))
            if progress:
                progress((i + 1) / len(model.layers), f"quantized layer {layer.layer} ({len(layer.matrices)} matrices)")
        expert_bits = {str(layer.layer): [bits_of[(layer.layer, e)] for e in range(layer.num_experts)] for layer in model.layers}
        nominal = sum(sum(v) for v in expert_bits.values()) / sum(len(v) for v in expert_bits.values())
        qconfig = {
            "quant_method": "expertbits", "format": FORMAT, "version": FORMAT_VERSION,
            "group_size": group_size, "layout": model.layout,
            "dequantize": "w[n, k] = code[n, k] * scales[n, k // group_size] + offsets[n, k // group_size]",
            "packing": "codes along the input dim, 32 // bits per int32 word, least-significant bits first",
            "not_quantized": "routers, attention, embeddings, norms, shared experts, lm_head (kept as stored)",
            "avg_bits": round(nominal, 6), "effective_bits": round(stored_bits / numel, 6),
            "expert_bits": expert_bits, "modules": modules,
        }
        config = dict(ckpt.config, quantization_config=qconfig)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for p in sorted(src.iterdir()):
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
            shutil.copyfile(p, out / p.name)
    return {"matrices": len(modules), "avg_bits": qconfig["avg_bits"], "effective_bits": qconfig["effective_bits"],
            "group_size": group_size, "bytes": total, "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors"))}
