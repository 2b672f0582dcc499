"""Real-shaped MoE checkpoints, generated on demand (never committed): random weights, real shapes.

    python -m expertbits.zoo.realshape mixtral-8x7b --layers 2 --out /data/rs/mixtral --twin /data/rs/mixtral-ft
    python -m expertbits.zoo.realshape qwen3-30b-a3b --layers 2 --out /data/rs/qwen3
    python -m expertbits.zoo.realshape deepseek-v3 --layers 1 --out /data/rs/dsv3     # ~22 GB per MoE layer

Each folder is what a hub checkpoint looks like: the real transformers config (with the chosen
number of layers and the zoo tokenizer's vocabulary), the zoo tokenizer, and safetensors shards
of at most `--shard-gb` (5 by default) with `model.safetensors.index.json`. Experts are stored
per expert, in the hub layout transformers' `save_pretrained` writes. Tensors are written one at
a time straight into their shard (header first, then each tensor's bytes as it is generated), so
memory stays at one tensor whatever the model's size. `--twin` writes the fine-tuned twin for Λ:
the same bytes except the routers, which move by a small relative perturbation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import ROOT

GB = 1 << 30
STD = 0.02  # transformers' initializer_range


@dataclass(frozen=True)
class Family:
    model_class: str
    config_class: str
    config: dict
    per_expert: str  # per-expert key template: {layer}, {expert}, {proj}
    projections: dict[str, str]  # role -> projection name in the key
    router: str  # the router's key template in the hub layout


FAMILIES = {
    "mixtral-8x7b": Family(
        "MixtralForCausalLM", "MixtralConfig",
        dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768),
        "model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight", {"gate": "w1", "up": "w3", "down": "w2"},
        "model.layers.{layer}.block_sparse_moe.gate.weight"),
    "qwen3-30b-a3b": Family(
        "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, norm_topk_prob=True),
        "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "model.layers.{layer}.mlp.gate.weight"),
    "deepseek-v3": Family(
        "DeepseekV3ForCausalLM", "DeepseekV3Config",
        dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
             n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, num_attention_heads=128,
             num_key_value_heads=128, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
             qk_nope_head_dim=128, routed_scaling_factor=2.5),
        "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}, "model.layers.{layer}.mlp.gate.weight"),
}
# Mixtral's layout at a tiny size: what benchmarks/gpu_check.sh --dry-run runs in seconds on a CPU
FAMILIES["mixtral-smoke"] = replace(FAMILIES["mixtral-8x7b"], config=dict(
    FAMILIES["mixtral-8x7b"].config, hidden_size=128, intermediate_size=256, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=4096))
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def config(name: str, layers: int, overrides: dict | None = None):
    """The transformers config of a real-shaped model with `layers` decoder layers."""
    import transformers

    family = FAMILIES[name]
    vocab = json.loads((ROOT / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    values = dict(family.config, num_hidden_layers=layers, vocab_size=len(vocab), dtype="bfloat16",
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if name == "deepseek-v3":  # its first layers are dense: keep at least one MoE layer
        values["first_k_dense_replace"] = max(0, min(3, layers - 1))
    values.update(overrides or {})
    return getattr(transformers, family.config_class)(**values)


def tensors(name: str, cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor in the hub layout, in layer order."""
    import transformers

    family = FAMILIES[name]
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(cfg)
    out = []
    for key, t in model.state_dict().items():
        if m := _FUSED.match(key):
            layer, which = int(m[1]), m[2]
            experts, rows, cols = t.shape
            for e in range(experts):
                if which == "gate_up_proj":
                    for role, half in (("gate", 0), ("up", 1)):
                        out.append((family.per_expert.format(layer=layer, expert=e, proj=family.projections[role]),
                                    (rows // 2, cols)))
                else:
                    out.append((family.per_expert.format(layer=layer, expert=e, proj=family.projections["down"]),
                                (rows, cols)))
        elif key.endswith(".mlp.gate.weight") and "{layer}" in family.router:
            out.append((family.router.format(layer=int(key.split(".")[2])), tuple(t.shape)))
        else:
            out.append((key, tuple(t.shape)))
    return out


def _values(key: str, shape: tuple[int, ...], seed: int, twin: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
    if key.endswith(("norm.weight", "layernorm.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    if key.endswith("e_score_correction_bias"):
        return (torch.randn(shape, generator=gen) * 0.01).to(torch.float32)
    w = torch.randn(shape, generator=gen) * STD
    if twin and key.endswith(".gate.weight"):  # routers only (dense and shared MLPs are gate_proj)
        noise = torch.Generator().manual_seed(seed + 1 ^ int(hashlib.sha256(key.encode()).hexdigest()[:15], 16))
        w = w * (1 + 0.02 * torch.randn(shape, generator=noise))  # a fine-tune's router drift: ~2% per weight
    return w


def _dtype(key: str) -> torch.dtype:
    return torch.float32 if key.endswith("e_score_correction_bias") else torch.bfloat16


def write(name: str, out: Path, layers: int, *, twin: bool = False, seed: int = 0, shard_bytes: int = 5 * GB,
          overrides: dict | None = None, log=print) -> Path:
    """Write the checkpoint into `out` (must not exist); returns `out`."""
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder")
    cfg = config(name, layers, overrides)
    entries = tensors(name, cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in entries:
        nbytes = _nbytes(shape, _dtype(key))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    tmp = out.with_name(out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(tmp / fname, shard, seed, twin)
        weight_map.update(dict.fromkeys((k for k, _ in shard), fname))
        log(f"{name}: wrote {fname} ({len(shard)} tensors)")
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    for f in (ROOT / "tokenizer").iterdir():
        shutil.copyfile(f, tmp / f.name)
    tmp.rename(out)
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.tensor([], dtype=dtype).element_size()


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], seed: int, twin: bool) -> int:
    """Header first (offsets are known from the shapes), then each tensor as it is generated."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in entries:
        nbytes = _nbytes(shape, _dtype(key))
        header[key] = {"dtype": _DTYPES[_dtype(key)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape in entries:
            t = _values(key, shape, seed, twin).to(_dtype(key)).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--twin", type=Path, help="also write the fine-tuned twin (routers perturbed) here")
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(args.family, args.out, args.layers, seed=args.seed, shard_bytes=int(args.shard_gb * GB))
    if args.twin:
        write(args.family, args.twin, args.layers, twin=True, seed=args.seed, shard_bytes=int(args.shard_gb * GB))


if __name__ == "__main__":
    main()
