"""Stage 4: every routed expert packed at its allocated bit-width, by group-wise round-to-nearest
or by the codes another quantizer chose (GPTQ: tasks/quantization/gptq_sequential.py).

The output is a Hugging Face-layout folder: config.json with a `quantization_config` that lists
every quantized matrix (its bits, shape and the source tensor it came from), the tokenizer, and
safetensors shards written MoE layer by MoE layer (memory: one layer's packed weights and one
matrix in floating point), each shard whole or absent (written under a temporary name):

  model-00001-of-0000N.safetensors   embeddings, head, final norm, as stored; then one shard per dense
  …                                  decoder layer (as stored), then one per MoE decoder layer:
  model-0000k-of-0000N.safetensors   its other tensors (attention,
                                     norms, router, shared experts) as stored and, per expert
                                     matrix, `<name>.qweight` int32 [N, ⌈K/(32//b)⌉],
                                     `<name>.scales` fp16 [N, ⌈K/G⌉], `<name>.zeros` uint8 [N, ⌈K/G⌉]
  model.safetensors.index.json       weight_map, as transformers writes it

Packing and dequantization (w = (code − zero)·scale) are defined in `expertbits.kernels.packing`.
Routers, attention, embeddings, norms and shared experts stay as stored.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from safetensors.torch import save_file

from expertbits.kernels.packing import QuantizedTensor, effective_bits, quantize_rtn

from ..checkpoints.adapters import DTYPE_BYTES, ExpertMatrix, block_of, detect
from ..checkpoints.reader import Checkpoint, require_finite
from ..errors import CheckpointError
from ..model.packed_folder import FORMAT, MODEL_TYPE, QUANT_METHOD, ROTATION, SIDE_FILES, signs_key, version_for
from ..store.storage import TMP_MARK
from .dense import Dense
from .method import QuantizerConfig

Progress = Callable[[float, str], None]


Quantizer = Callable[[ExpertMatrix, torch.Tensor, int], QuantizedTensor]  # (matrix, weight, bits) -> packed


def quantize_checkpoint(src: Path, alloc: pd.DataFrame, group_size: int, out: Path,
                        progress: Progress | None = None, quantizer: Quantizer | None = None,
                        symmetric: bool = False, config: dict | None = None) -> dict:
    """Write the quantized checkpoint of `src` into `out` (which must not exist); return a summary.

    The rest shard, then `quantize_layer` for each MoE layer, then `finish`: the same parts a
    Dask run maps over its workers, here in one process. `quantizer` defaults to group-wise
    round-to-nearest (`symmetric`: no zero points); the league passes one that caches. `config`:
    the QuantizerConfig (as a dict) recorded in config.json."""
    out.mkdir(parents=True)
    with Checkpoint.open(src) as ckpt:
        layers = detect(ckpt).layers
        check_allocation(ckpt, alloc)
        parts = write_rest(ckpt, out)
        for i, layer in enumerate(layers):
            parts.append(quantize_layer(ckpt, i, alloc, group_size, symmetric, out, quantizer))
            if progress:
                progress((i + 1) / len(layers), f"quantized layer {layer.layer} ({len(layer.matrices)} matrices)")
    return finish(src, alloc, group_size, symmetric, parts, out, config)


def _plan(ckpt: Checkpoint) -> tuple[list[list[str]], list[list[str]]]:
    """(tensors of each shard not quantized, non-expert tensors of each MoE layer's decoder layer).

    Shards, in order: embeddings, head and final norm; each dense decoder layer (and any layer
    kept as stored), split where it holds more than REST_SHARD_BYTES; then one per MoE layer.
    Memory is bounded by one such shard. Memoised on the open checkpoint."""
    if "_quant_plan" in ckpt.__dict__:
        return ckpt.__dict__["_quant_plan"]
    model = detect(ckpt)
    experts = {m.key for m in model.matrices}
    blocks = [block_of(layer.router_key) for layer in model.layers]
    own: list[list[str]] = [[] for _ in blocks]
    rest: dict[str, list[str]] = {}
    for k in sorted(ckpt.tensors):
        if k in experts:
            continue
        b = block_of(k)
        if b and b in blocks:
            own[blocks.index(b)].append(k)
        else:
            rest.setdefault(b, []).append(k)
    shards = []
    for b in sorted(rest, key=_natural):
        current, size = [], 0
        for k in rest[b]:
            n = _stored_bytes(ckpt, k)
            if current and size + n > REST_SHARD_BYTES:
                shards.append(current)
                current, size = [], 0
            current.append(k)
            size += n
        shards.append(current)
    ckpt.__dict__["_quant_plan"] = (shards, own)
    return shards, own


REST_SHARD_BYTES = 2 << 30


def _stored_bytes(ckpt: Checkpoint, key: str) -> int:
    info = ckpt.tensors[key]
    return math.prod(info.shape) * DTYPE_BYTES.get(info.dtype, 4)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def check_allocation(ckpt: Checkpoint, alloc: pd.DataFrame) -> None:
    have = {(int(r.layer), int(r.expert)) for r in alloc.itertuples()}
    missing = sorted({(m.layer, m.expert) for m in detect(ckpt).matrices} - have)
    if missing:
        raise CheckpointError(f"allocation has no bits for (layer, expert) {missing[:5]}",
                              "the allocation was made for a different checkpoint; rerun the statistics stage")


def _save(tensors: dict, out: Path, name: str) -> str:
    """Write a shard under a temporary name, then rename: a shard that exists is whole."""
    tmp = out / f"{TMP_MARK}{uuid.uuid4().hex}-{name}"
    try:
        # one metadata key only: safetensors writes metadata in hash-map order, so two keys break
        # byte-reproducibility
        save_file(tensors, tmp, metadata={"format": "pt"})
        tmp.rename(out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name


def write_rest(ckpt: Checkpoint, out: Path, dense: dict[str, Dense] | None = None) -> list[dict]:
    """The shards of everything outside the MoE layers (embeddings, head, norms, dense decoder
    layers), byte-for-byte as stored, one block at a time; the linear layers in `dense` (module
    name -> (packed, the stored weight it replaces)) packed instead of their weight."""
    rest, own = _plan(ckpt)
    parts = []
    for i, keys in enumerate(rest):
        tensors, dense_modules = _with_dense(ckpt, keys, dense or {})
        name = _save(tensors, out, shard_name(i, len(rest) + len(own)))
        parts.append({"file": name, "bytes": (out / name).stat().st_size, "keys": sorted(tensors), "modules": {},
                      "dense_modules": dense_modules, "stored_bits": 0.0, "numel": 0})
    _all_written(dense or {}, parts)
    return parts


def _all_written(dense: dict[str, Dense], parts: list[dict]) -> None:
    """Every packed dense layer handed to the writer is in a shard it wrote, never silently left out."""
    left = sorted(set(dense) - {name for part in parts for name in part["dense_modules"]})
    if left:
        raise CheckpointError(f"packed dense layers {left[:3]} belong to no shard being written",
                              "this is a bug; please report it")


def _with_dense(ckpt: Checkpoint, keys: list[str], dense: dict[str, Dense]) -> tuple[dict, dict]:
    """A shard's tensors as stored, but for the weights of the dense layers in `dense`, written
    packed under their module names; and those modules' config entries."""
    replaced = {key: (name, q) for name, (q, key) in dense.items() if key in keys}
    tensors, modules = {}, {}
    for k in keys:
        if k not in replaced:
            tensors[k] = ckpt.read(k).contiguous()
            continue
        name, q = replaced[k]
        if tuple(ckpt.tensors[k].shape) != tuple(q.shape):
            raise CheckpointError(f"{ckpt.path}: {k} has shape {ckpt.tensors[k].shape}, its packed layer {tuple(q.shape)}",
                                  "this is a bug; please report it")
        modules[name] = {"bits": q.bits, "shape": list(q.shape), "source": {"key": k, "index": None, "rows": None},
                         **_put_packed(tensors, name, q)}
    return tensors, modules


def _put_packed(tensors: dict, name: str, q: QuantizedTensor) -> dict:
    """A packed matrix's codes, scales and zero points into a shard's `tensors`, and a rotated one's
    signs, once per decoder layer and input width; returns the rotation's config entries."""
    tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = q.packed, q.scales, q.zeros
    if q.signs is None:
        return {}
    key = signs_key(name, q.shape[1])  # codes of W R: readers rotate this matrix's inputs (format version 3)
    if key not in tensors:
        tensors[key] = q.signs.to(torch.int8).contiguous()
    elif not torch.equal(tensors[key], q.signs.to(torch.int8)):
        raise CheckpointError(f"{name}: rotation signs differ from those of its layer's other matrices",
                              "this is a bug; please report it")
    return {"rotation": ROTATION, "signs": key}


def quantize_layer(ckpt: Checkpoint, position: int, alloc: pd.DataFrame, group_size: int, symmetric: bool, out: Path,
                   quantizer: Quantizer | None = None, dense: dict[str, Dense] | None = None) -> dict:
    """Shard of the `position`-th MoE layer: its decoder layer's other tensors as stored (the dense
    layers in `dense` packed), and each expert matrix packed at its allocated width (one unit of
    work: a Dask task). Memory: one layer's packed weights and one matrix in floating point."""
    quantizer = quantizer or (lambda m, w, bits: quantize_rtn(w, bits, group_size, symmetric))
    model = detect(ckpt)
    layer = model.layers[position]
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples() if int(r.layer) == layer.layer}
    rest, own = _plan(ckpt)
    tensors, dense_modules = _with_dense(ckpt, own[position], dense or {})
    _all_written(dense or {}, [{"dense_modules": dense_modules}])
    modules, stored_bits, numel, counted = {}, 0.0, 0, set()
    for m in layer.matrices:
        w = ckpt.read(m.key, m.index, m.rows)
        require_finite(w, f"{ckpt.path}: {m.name}")
        bits = bits_of[(m.layer, m.expert)]
        q = quantizer(m, w, bits).to("cpu")  # a GPU's packed matrix is written from the host
        if symmetric and not q.symmetric:
            raise CheckpointError(f"{m.name}: the quantizer returned zero points for a symmetric run",
                                  "this is a bug; please report it")
        # a sign tensor counts once toward the experts' bits, also when a dense layer stored it first
        key = signs_key(m.name, q.shape[1]) if q.signs is not None else None
        new_signs = key is not None and key not in counted
        counted.add(key)
        modules[m.name] = {"bits": bits, "layer": m.layer, "expert": m.expert, "role": m.role,
                           "shape": list(q.shape), "source": {"key": m.key, "index": m.index,
                                                              "rows": list(m.rows) if m.rows else None},
                           **_put_packed(tensors, m.name, q)}
        stored_bits += effective_bits(bits, group_size, q.shape[1]) * w.numel() + (8 * q.shape[1] if new_signs else 0)
        numel += w.numel()
    name = _save(tensors, out, shard_name(len(rest) + position, len(rest) + len(own)))
    return {"file": name, "bytes": (out / name).stat().st_size, "keys": sorted(tensors), "modules": modules,
            "dense_modules": dense_modules, "stored_bits": stored_bits, "numel": numel}


def finish(src: Path, alloc: pd.DataFrame, group_size: int, symmetric: bool, parts: list[dict], out: Path,
           quantizer: dict | None = None, dense: dict | None = None) -> dict:
    """config.json (with the quantization config), the index and the side files, once every shard is
    written; returns the stage summary. Parts of a calibrated quantizer (GPTQ) carry their layer's
    calibration coverage, which goes into the config and the summary; `dense`: the DenseWidths (as
    a dict) of a run that packed dense layers too."""
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    with Checkpoint.open(src) as ckpt:
        model = detect(ckpt)
        config = dict(ckpt.config)
        # the model transformers builds: layers kept as stored beyond it (DeepSeek-V3's multi-token
        # prediction) are shipped, but counted apart
        beyond = [k for k in ckpt.tensors if block_of(k) in set(model.kept_as_stored)]
        parameters = sum(math.prod(info.shape) for k, info in ckpt.tensors.items() if k not in beyond)
        beyond_bytes = sum(_stored_bytes(ckpt, k) for k in beyond)
    modules = {k: v for part in parts for k, v in part["modules"].items()}
    dense_modules = {k: v for part in parts for k, v in part.get("dense_modules", {}).items()}
    weight_map = {k: part["file"] for part in parts for k in part["keys"]}
    stored_bits, numel = sum(p["stored_bits"] for p in parts), sum(p["numel"] for p in parts)
    expert_bits = {str(layer.layer): [bits_of[(layer.layer, e)] for e in range(layer.num_experts)] for layer in model.layers}
    nominal = sum(sum(v) for v in expert_bits.values()) / sum(len(v) for v in expert_bits.values())
    qconfig = {
        "quant_method": QUANT_METHOD, "format": FORMAT, "version": version_for(modules, dense_modules),
        "group_size": group_size, "layout": model.layout,
        "dequantize": "w[n, k] = (code[n, k] - zeros[n, k // group_size]) * scales[n, k // group_size]",
        "symmetric": symmetric,  # every zero point at 2**(bits-1): exports without zero points
        # one width for all routed experts of each layer: what vLLM can serve (see export.py)
        "layer_uniform": all(len(set(v)) == 1 for v in expert_bits.values()),
        "packing": "codes along the input dim, 32 // bits per int32 word, least-significant bits first",
        "not_quantized": "routers, attention, embeddings, norms, shared experts, lm_head (kept as stored)",
        "avg_bits": round(nominal, 6), "effective_bits": round(stored_bits / numel, 6),
        "expert_bits": expert_bits, "modules": modules,
        "base_model_type": config.get("model_type"),
        "experts_modules": {str(layer.layer): layer.experts_module for layer in model.layers},
        # decoder layers beyond num_hidden_layers (DeepSeek-V3's multi-token prediction), kept as stored
        "kept_as_stored": list(model.kept_as_stored),
        # how the codes were chosen (rtn, gptq; clipping search): tells validation which check applies
        "quantizer": QuantizerConfig.from_dict(quantizer or {"symmetric": symmetric}).as_dict(),
    }
    if dense_modules:  # the whole-model budget (quantization/dense.py); absent otherwise, so such folders are unchanged
        qconfig.update(dense_modules=dense_modules, dense=dense or {},
                       not_quantized="routers, embeddings, norms, and the linear layers not in dense_modules (kept as stored)")
    coverage = sorted((r for part in parts for r in part.get("coverage", ())), key=lambda r: (r["layer"], r["expert"]))
    summary_extra = {}
    if coverage:
        fallback = [f"{r['layer']}/{r['expert']}" for r in coverage if r["quantizer"].endswith("-fallback")]
        qconfig["calibration_coverage"] = {  # per MoE layer, per expert
            key: {str(layer.layer): [r[column] for r in coverage if r["layer"] == layer.layer] for layer in model.layers}
            for key, column in (("tokens", "calibration_tokens"), ("quantizer", "quantizer"))}
        qconfig["calibration_coverage"]["fallback"] = fallback
        least = sorted(coverage, key=lambda r: (r["calibration_tokens"], r["layer"], r["expert"]))[:5]
        summary_extra = {"fallback_experts": len(fallback), "least_covered": [
            {k: r[k] for k in ("layer", "expert", "calibration_tokens", "quantizer")} for r in least]}
    # the marker model type makes a transformers without expertbits refuse the folder (see model/load.py)
    config = dict(config, model_type=MODEL_TYPE, quantization_config=qconfig)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    total = sum(part["bytes"] for part in parts)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_side_files(src, out)
    return {"matrices": len(modules), "moe_layers": len(model.layers), "avg_bits": qconfig["avg_bits"], "effective_bits": qconfig["effective_bits"],
            "group_size": group_size, "bytes": total, "source_bytes": sum(p.stat().st_size for p in src.glob("*.safetensors")),
            "quantizer": QuantizerConfig.from_dict(qconfig["quantizer"]).label,
            **({"dense_matrices": len(dense_modules),
                "dense_bits": sorted({v["bits"] for v in dense_modules.values()})} if dense_modules else {}),
            # the whole model, not only its routed experts: what a user stores and loads
            **whole_model(total - beyond_bytes, parameters), "kept_as_stored_bytes": beyond_bytes, **summary_extra}


def whole_model(stored_bytes: int, parameters: int) -> dict:
    """The whole model's size: its shards' bytes against the same parameters in bf16, and the bits
    per parameter they amount to (scales, zero points, the non-expert weights as stored and the
    shards' headers included; layers beyond the model, kept as stored, left out of both)."""
    return {"model_parameters": parameters, "bf16_bytes": 2 * parameters,
            "fraction_of_bf16": round(stored_bytes / (2 * parameters), 6),
            "model_bits_per_parameter": round(8 * stored_bytes / parameters, 6)}


def copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer and generation config beside the weights, so the folder needs nothing else.

    A source without generation_config.json gets the one transformers derives from its config,
    written here so that generation does not depend on the original checkpoint either."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name.startswith(SIDE_FILES):
            shutil.copyfile(p, out / p.name)
    if not (out / "generation_config.json").exists():
        from transformers import AutoConfig, GenerationConfig

        GenerationConfig.from_model_config(AutoConfig.from_pretrained(src, trust_remote_code=False)).save_pretrained(out)
