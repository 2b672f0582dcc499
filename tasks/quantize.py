"""Stage 4: group-wise round-to-nearest of every routed expert at its allocated bit-width.

The output is a Hugging Face-layout folder: config.json with a `quantization_config` that lists
every quantized matrix (its bits, shape and the source tensor it came from), the tokenizer, and
safetensors shards written decoder layer by decoder layer (memory is bounded by one layer's
tensors and one shard of about SHARD_BYTES):

  model-0000k-of-0000N.safetensors   in model order: embeddings first, then each decoder layer's
                                     tensors not quantized (byte-for-byte as stored) and, per expert
                                     matrix, `<name>.qweight` int32 [N, ⌈K/(32//b)⌉],
                                     `<name>.scales` fp16 [N, ⌈K/G⌉], `<name>.zeros` uint8 [N, ⌈K/G⌉]
  model.safetensors.index.json       weight_map, as transformers writes it

Packing and dequantization (w = (code − zero)·scale) are defined in `expertbits.kernels.packing`.
Routers, attention, embeddings, norms and shared experts stay as stored.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from safetensors.torch import save_file

from expertbits.kernels.packing import QuantizedTensor, effective_bits, quantize_rtn

from .adapters import ExpertMatrix, detect
from .checkpoint import Checkpoint, require_finite
from .errors import CheckpointError

QUANT_METHOD = "expertbits"
# config.json's model_type: a marker plain transformers does not know, so it refuses the folder with
# this text in its error instead of skipping the unknown quant_method and building random experts;
# `import expertbits.tasks.loader` teaches transformers to read it (base_model_type is the real one)
MODEL_TYPE = ("expertbits (per-expert packed MoE weights that only expertbits can run; pip install expertbits, then "
              "`import expertbits.tasks.loader` before from_pretrained, or run `expertbits generate --model <folder>`)")
FORMAT = "expertbits-int32-packed-groupwise"
FORMAT_VERSION = 2  # 1 stored fp16 offsets; 2 stores integer zero points
Progress = Callable[[float, str], None]
SHARD_BYTES = 2 << 30  # a shard closes once it holds this much (the last of a layer may overshoot by one matrix)


Quantizer = Callable[[ExpertMatrix, torch.Tensor, int], QuantizedTensor]  # (matrix, weight, bits) -> packed


def quantize_checkpoint(src: Path, alloc: pd.DataFrame, group_size: int, out: Path,
                        progress: Progress | None = None, quantizer: Quantizer | None = None,
                        symmetric: bool = False, shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the quantized checkpoint of `src` into `out` (which must not exist); return a summary.

    Tensors are written in model order, decoder layer by decoder layer, and a shard is closed once
    it holds `shard_bytes`: memory holds one layer's non-expert tensors and one shard at most.

    `quantizer` defaults to group-wise round-to-nearest (`symmetric`: no zero points); the league
    passes one that caches."""
    quantizer = quantizer or (lambda m, w, bits: quantize_rtn(w, bits, group_size, symmetric))
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    out.mkdir(parents=True)
    with Checkpoint.open(src) as ckpt:
        model = detect(ckpt)
        missing = sorted({(layer.layer, m.expert) for layer in model.layers for m in layer.matrices} - set(bits_of))
        if missing:
            raise CheckpointError(f"allocation has no bits for (layer, expert) {missing[:5]}",
                                  "the allocation was made for a different checkpoint; rerun the statistics stage")
        shards = _ShardWriter(out, shard_bytes)
        expert_keys = {m.key for m in model.matrices}
        rest = defaultdict(list)
        for k in ckpt.tensors:
            if k not in expert_keys:
                rest[block_of(k)].append(k)
        moe = {block_of(layer.router_key): layer for layer in model.layers}
        modules, stored_bits, numel, done = {}, 0.0, 0, 0
        for block in sorted(set(rest) | set(moe), key=_natural):
            for k in sorted(rest.get(block, ())):  # everything not quantized, byte-for-byte as stored
                shards.add(k, ckpt.read(k).contiguous())
            if block not in moe:
                continue
            layer = moe[block]
            for m in layer.matrices:
                w = ckpt.read(m.key, m.index, m.rows)
                require_finite(w, f"{src}: {m.name}")
                bits = bits_of[(m.layer, m.expert)]
                q = quantizer(m, w, bits)
                if symmetric and not q.symmetric:
                    raise CheckpointError(f"{m.name}: the quantizer returned zero points for a symmetric run",
                                          "this is a bug; please report it")
                for part, t in (("qweight", q.packed), ("scales", q.scales), ("zeros", q.zeros)):
                    shards.add(f"{m.name}.{part}", t)
                modules[m.name] = {"bits": bits, "layer": m.layer, "expert": m.expert, "role": m.role,
                                   "shape": list(q.shape), "source": {"key": m.key, "index": m.index,
                                                                      "rows": list(m.rows) if m.rows else None}}
                stored_bits += effective_bits(bits, group_size, q.shape[1]) * w.numel()
                numel += w.numel()
            done += 1
            if progress:
                progress(done / len(model.layers), f"quantized layer {layer.layer} ({len(layer.matrices)} matrices)")
        weight_map = shards.close()
        expert_bits = {str(layer.layer): [bits_of[(layer.layer, e)] for e in range(layer.num_experts)] for layer in model.layers}
        nominal = sum(sum(v) for v in expert_bits.values()) / sum(len(v) for v in expert_bits.values())
        qconfig = {
            "quant_method": QUANT_METHOD, "format": FORMAT, "version": FORMAT_VERSION,
            "group_size": group_size, "layout": model.layout,
            "dequantize": "w[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]",
            "symmetric": symmetric,  # every zero point at 2**(bits-1): exports without zero points
            # one width for all routed experts of each layer: what vLLM can serve (see export.py)
            "layer_uniform": all(len(set(v)) == 1 for v in expert_bits.values()),
            "packing": "codes along the input dim, 32 // bits per int32 word, least-significant bits first",
            "not_quantized": "routers, attention, embeddings, norms, shared experts, lm_head (kept as stored)",
            "avg_bits": round(nominal, 6), "effective_bits": round(stored_bits / numel, 6),
            "expert_bits": expert_bits, "modules": modules,
            "base_model_type": ckpt.config.get("model_type"),
            "experts_modules": {str(layer.layer): layer.experts_module for layer in model.layers},
        }
        # the marker model type makes a transformers without expertbits refuse the folder (see loader.py)
        config = dict(ckpt.config, model_type=MODEL_TYPE, quantization_config=qconfig)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_side_files(src, out)
    return {"matrices": len(modules), "avg_bits": qconfig["avg_bits"], "effective_bits": qconfig["effective_bits"],
            "group_size": group_size, "bytes": total, "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors"))}


def block_of(key: str) -> str:
    """The decoder layer a tensor belongs to (`model.layers.3`, `decoder.block.1`), or "" for the
    embeddings, final norm and head."""
    m = re.match(r"(.*?\.(?:layers|block)\.\d+)\.", key)
    return m.group(1) if m else ""


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _ShardWriter:
    """Accumulates tensors and writes `model-0000k-of-0000N.safetensors` shards of about `limit` bytes;
    names are final once N is known, at close."""

    def __init__(self, out: Path, limit: int):
        self.out, self.limit, self.pending, self.size, self.files = out, limit, {}, 0, []

    def add(self, key: str, t: torch.Tensor) -> None:
        self.pending[key] = t
        self.size += t.numel() * t.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f".shard-{len(self.files) + 1:05d}.safetensors"
        # one metadata key only: safetensors writes metadata in hash-map order, so two keys break
        # byte-reproducibility
        save_file(self.pending, self.out / name, metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.size = {}, 0

    def close(self) -> dict[str, str]:
        """Rename the shards to their final names; the weight map."""
        self.flush()
        weight_map = {}
        for i, (name, keys) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            (self.out / name).rename(self.out / final)
            weight_map.update(dict.fromkeys(keys, final))
        return weight_map


SIDE_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "generation_config", "chat_template")


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer and generation config beside the weights, so the folder needs nothing else.

    A source without generation_config.json gets the one transformers derives from its config,
    written here so that generation does not depend on the original checkpoint either."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name.startswith(SIDE_FILES):
            shutil.copyfile(p, out / p.name)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(src)).save_pretrained(out)
