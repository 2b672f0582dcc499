"""Tiny random models of every architecture expertbits supports, saved as transformers saves them."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from expertbits.zoo import ROOT

V = 4096  # the zoo tokenizer's vocabulary


def _configs(vocab: int = V):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  pad_token_id=1, eos_token_id=0, bos_token_id=0)
    ds = dict(common, intermediate_size=64, moe_intermediate_size=32, n_shared_experts=1, num_experts_per_tok=2,
              first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8)
    return {
        "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=4,
                                                             num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=48, num_experts=4,
                                                                num_experts_per_tok=2)),
        "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                                                head_dim=16, num_experts=4, num_experts_per_tok=2)),
        "olmoe": (tf.OlmoeForCausalLM, tf.OlmoeConfig(**common, intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
        "deepseek_v2": (tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config(**ds, n_routed_experts=4, q_lora_rank=None)),
        "deepseek_v3": (tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(**ds, n_routed_experts=8, n_group=2, topk_group=1,
                                                                      q_lora_rank=16)),
        "switch_transformers": (tf.SwitchTransformersForConditionalGeneration, tf.SwitchTransformersConfig(
            vocab_size=vocab, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
            encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=512, pad_token_id=1, eos_token_id=0,
            decoder_start_token_id=1)),
    }


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "switch_transformers")
FUSED_ON_DISK = tuple(a for a in ARCHS if a != "switch_transformers")  # Switch keeps per-expert modules


def build(arch: str, out: Path, *, fused: bool = False, seed: int = 0, tokenizer: Path | None = None,
          **config: object) -> Path:
    """A random `arch` model with the zoo tokenizer (or the one in the folder `tokenizer`, its
    vocabulary the model's), in the per-expert layout save_pretrained writes by default, or
    (fused=True) transformers 5's fused 3-D expert tensors; `config` overrides config fields."""
    source = tokenizer or ROOT / "tokenizer"
    vocab = V
    if tokenizer is not None:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    cls, base = _configs(vocab)[arch]
    for key, value in config.items():
        setattr(base, key, value)
    torch.manual_seed(seed)
    model = cls(base).eval()
    with torch.no_grad():  # routers whose bias starts at zero would not exercise it
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    model.save_pretrained(out, save_original_format=not fused)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, out / f.name)
    return out
