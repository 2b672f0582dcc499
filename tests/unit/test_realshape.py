"""The real-shaped checkpoint generator: real configs and shapes, hub layout, bounded shards; the
same code path is exercised here at a small width."""

import json

import pytest
import torch
from safetensors import safe_open

from expertbits.tasks.allocation.statistics import collect
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.zoo import realshape

SMALL = {"mixtral-8x7b": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
         "qwen3-30b-a3b": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, num_experts=16),
         "deepseek-v3": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
                             n_group=4, topk_group=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
                             q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8)}


def test_real_shapes_without_writing_anything():
    sizes = {}
    for name, (hidden, ffn, experts) in {"mixtral-8x7b": (4096, 14336, 8), "qwen3-30b-a3b": (2048, 768, 128),
                                         "deepseek-v3": (7168, 2048, 256)}.items():
        cfg = realshape.config(name, 1)
        entries = dict(realshape.tensors(name, cfg))
        experts_of_layer = [k for k in entries if ".experts." in k]
        assert len(experts_of_layer) == 3 * experts
        down = next(k for k in experts_of_layer if k.endswith(("w2.weight", "down_proj.weight")))
        assert entries[down] == (hidden, ffn)
        sizes[name] = sum(2 * entries[k][0] * entries[k][1] for k in experts_of_layer)
    assert round(sizes["mixtral-8x7b"] / 1e9, 1) == 2.8 and 21e9 < sizes["deepseek-v3"] < 23e9
    assert realshape.config("deepseek-v3", 2).first_k_dense_replace == 1  # the first layer dense, the second MoE


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_width_generation_loads_in_transformers_and_gives_lambda(name, tmp_path):
    from transformers import AutoModelForCausalLM

    base = realshape.write(name, tmp_path / "base", 2, overrides=SMALL[name], shard_bytes=150_000, log=lambda m: None)
    twin = realshape.write(name, tmp_path / "ft", 2, twin=True, overrides=SMALL[name], shard_bytes=150_000,
                           log=lambda m: None)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) > 2 and set(index.values()) == {p.name for p in shards}
    for p in shards:  # tensor bytes within the limit, unless one tensor alone is larger
        keys = [k for k, v in index.items() if v == p.name]
        header = int.from_bytes(p.read_bytes()[:8], "little")
        assert len(keys) == 1 or p.stat().st_size - 8 - header <= 150_000, (p.name, len(keys), p.stat().st_size)
    model, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(12)[None]).logits).all()
    differ = set()
    for shard in shards:
        with safe_open(shard, "pt") as a, safe_open(twin / shard.name, "pt") as b:
            differ |= {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    with Checkpoint.open(twin) as ft, Checkpoint.open(base) as ref:
        routers = {layer.router_key for layer in detect(ft).layers}
        stats, info = collect(ft, ref)
    assert differ == routers and info["layout"] == "per-expert"
    assert stats.lambda_score.abs().gt(0).all() and stats.lambda_score.abs().lt(0.1).all()
