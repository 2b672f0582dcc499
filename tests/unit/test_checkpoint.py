"""Checkpoint reading, architecture adapters and statistics against hand-computed values."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from expertbits.tasks.allocation.statistics import collect, maxvar
from expertbits.tasks.checkpoints.adapters import check_compatible, detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.errors import CheckpointError


def write_ckpt(path: Path, tensors: dict, model_type: str = "mixtral") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, path / "model.safetensors")
    return path


def mixtral_tensors(router: torch.Tensor, w1s: list[torch.Tensor], layer: int = 0) -> dict:
    p = f"model.layers.{layer}.block_sparse_moe"
    t = {f"{p}.gate.weight": router, "model.embed_tokens.weight": torch.zeros(4, router.shape[1])}
    for e, w1 in enumerate(w1s):
        t[f"{p}.experts.{e}.w1.weight"] = w1
        t[f"{p}.experts.{e}.w3.weight"] = w1 * 2
        t[f"{p}.experts.{e}.w2.weight"] = w1.T.contiguous()
    return t


def test_lambda_and_maxvar_hand_computed(tmp_path):
    # router rows: ft ‖[3,4]‖ = 5, ‖[0,2]‖ = 2; base ‖[0,1]‖ = 1, ‖[0,3]‖ = 3 -> Λ = 4, -1
    # w1 of expert 0: rows [1,1,1,1] (var 0) and [0,2,0,2] (var 1) -> MaxVar 1
    # w1 of expert 1: rows [0,0,0,4] (var 3) and [1,2,3,4] (var 1.25) -> MaxVar 3
    w1 = [torch.tensor([[1.0, 1, 1, 1], [0, 2, 0, 2]]), torch.tensor([[0.0, 0, 0, 4], [1, 2, 3, 4]])]
    ft = write_ckpt(tmp_path / "ft", mixtral_tensors(torch.tensor([[3.0, 4, 0, 0], [0, 2, 0, 0]]), w1))
    base = write_ckpt(tmp_path / "base", mixtral_tensors(torch.tensor([[0.0, 1, 0, 0], [0, 3, 0, 0]]), w1))
    with Checkpoint.open(ft) as f, Checkpoint.open(base) as b:
        stats, info = collect(f, b)
    assert info == {"model_type": "mixtral", "layout": "per-expert", "moe_layers": 1, "experts": 2}
    assert stats["lambda_score"].tolist() == pytest.approx([4.0, -1.0])
    assert stats.maxvar.tolist() == pytest.approx([1.0, 3.0])
    assert stats.lambda_rank.tolist() == [1, 0]
    assert set(stats.lambda_source) == {"norm-change"}
    with Checkpoint.open(ft) as f:
        proxy, _ = collect(f, None)
    assert proxy["lambda_score"].tolist() == pytest.approx([5.0, 2.0])
    assert set(proxy.lambda_source) == {"final-norm-proxy"}


def test_maxvar_is_max_over_rows_of_population_variance():
    w = torch.tensor([[1.0, 3.0], [0.0, 10.0], [5.0, 5.0]])
    assert maxvar(w) == pytest.approx(25.0)


def test_fused_layout_gives_the_same_statistics(micro_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    base, ft = micro_pair
    model = AutoModelForCausalLM.from_pretrained(ft)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    with Checkpoint.open(tmp_path / "fused") as fused, Checkpoint.open(ft) as legacy, Checkpoint.open(base) as ref:
        m = detect(fused)
        assert m.layout == "fused" and len(m.layers) == 2 and len(m.matrices) == 2 * 4 * 3
        a, _ = collect(fused, ref)
        b, _ = collect(legacy, ref)
    assert a[["lambda_score", "maxvar"]].values.ravel().tolist() == pytest.approx(b[["lambda_score", "maxvar"]].values.ravel().tolist(), rel=1e-6)


def test_qwen2_moe_shared_expert_is_not_a_routed_expert(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    Qwen2MoeForCausalLM(cfg).save_pretrained(tmp_path / "q")
    with Checkpoint.open(tmp_path / "q") as c:
        m = detect(c)
    assert m.model_type == "qwen2_moe" and [len(layer.matrices) for layer in m.layers] == [12, 12]
    assert not any("shared" in x.key for x in m.matrices)


def test_dense_model_is_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    with Checkpoint.open(tmp_path / "dense") as c, pytest.raises(CheckpointError, match="dense model"):
        detect(c)


def test_unknown_architecture_with_experts_is_an_error_not_a_skip(tmp_path):
    t = mixtral_tensors(torch.ones(2, 4), [torch.ones(2, 4)] * 2)
    with Checkpoint.open(write_ckpt(tmp_path / "x", t, model_type="mystery_moe")) as c:
        with pytest.raises(CheckpointError, match="no expertbits adapter"):
            detect(c)


def test_missing_expert_matrix_is_named(tmp_path):
    t = mixtral_tensors(torch.ones(2, 4), [torch.ones(2, 4)] * 2)
    del t["model.layers.0.block_sparse_moe.experts.1.w3.weight"]
    with Checkpoint.open(write_ckpt(tmp_path / "x", t)) as c:
        with pytest.raises(CheckpointError, match="no up matrix for expert 1"):
            detect(c)


def test_truncated_safetensors_names_the_file(micro_pair, copy_ckpt):
    d = copy_ckpt(micro_pair[1])
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        Checkpoint.open(d)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors only"):
        Checkpoint.open(tmp_path)


def test_reference_with_different_router_shape_is_rejected(tmp_path):
    ft = write_ckpt(tmp_path / "ft", mixtral_tensors(torch.ones(2, 4), [torch.ones(2, 4)] * 2))
    ref = write_ckpt(tmp_path / "ref", mixtral_tensors(torch.ones(3, 4), [torch.ones(2, 4)] * 3))
    with Checkpoint.open(ft) as f, Checkpoint.open(ref) as r:
        with pytest.raises(CheckpointError, match=r"router shape \(3, 4\) vs \(2, 4\)"):
            check_compatible(detect(f), detect(r), f, r)
        with pytest.raises(CheckpointError, match="does not match"):
            collect(f, r)


def test_nan_weights_are_rejected(tmp_path):
    w1 = torch.ones(2, 4)
    w1[1, 2] = float("nan")
    with Checkpoint.open(write_ckpt(tmp_path / "x", mixtral_tensors(torch.ones(2, 4), [torch.ones(2, 4), w1]))) as c:
        with pytest.raises(CheckpointError, match="experts.1.w1 has 1 NaN/Inf"):
            collect(c, None)


def test_switch_transformers_encoder_and_decoder_experts(tmp_path):
    import pandas as pd
    from support.reference import dequantize_checkpoint
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from expertbits.tasks.quantization.writer import quantize_checkpoint

    cfg = SwitchTransformersConfig(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=4, num_decoder_layers=4,
                                   num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_heads=2, num_experts=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, router_bias=True)
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a router bias that decides routing (the zoo's Switch has one) must survive quantization
        for name, module in model.named_modules():
            if name.endswith("router.classifier"):
                module.bias.copy_(torch.randn(4) * 3)
    model.save_pretrained(tmp_path / "sw")
    with Checkpoint.open(tmp_path / "sw") as c:
        m = detect(c)
        stats, _ = collect(c, None)
    # sparse blocks 1 and 3 of the encoder, and of the decoder (ids after the encoder's 4 layers)
    assert m.model_type == "switch_transformers" and [layer.layer for layer in m.layers] == [1, 3, 5, 7]
    assert all(len(layer.matrices) == 4 * 2 for layer in m.layers)  # wi and wo per expert, no up
    assert m.layers[2].router_key == "decoder.block.1.layer.2.mlp.router.classifier.weight"
    assert len(stats) == 16
    alloc = pd.DataFrame([{"layer": l, "expert": e, "bits": 8} for l in (1, 3, 5, 7) for e in range(4)])
    quantize_checkpoint(tmp_path / "sw", alloc, 16, tmp_path / "q")
    deq = SwitchTransformersForConditionalGeneration.from_pretrained(
        dequantize_checkpoint(tmp_path / "q", tmp_path / "sw", tmp_path / "deq")).eval()
    x, y = torch.arange(2, 12)[None], torch.arange(3, 8)[None]
    with torch.no_grad():
        assert torch.allclose(deq(input_ids=x, labels=y).logits, model(input_ids=x, labels=y).logits, atol=0.05)


@pytest.mark.parametrize("block", [7, 1024])
def test_row_variances_blockwise_match_the_definitions(block):
    from expertbits.tasks.allocation.statistics import row_variances

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(300, 40, generator=g) * torch.linspace(0.5, 2, 300)[:, None] + torch.randn(300, 1, generator=g)).half()
    x = w.float()
    var = ((x - x.mean(1, keepdim=True)) ** 2).mean(1)  # paper: (1/d) Σ (w − mean)², per row
    got_max, got_norm_row = row_variances(w, block=block)
    assert got_max == pytest.approx(float(var.max()), rel=1e-5)
    assert got_norm_row == pytest.approx(float(var[x.norm(dim=1).argmax()]), rel=1e-5)  # reference code's variant
    w[123, 7] = float("inf")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        row_variances(w, "expert 3 w1", block=block)


def test_fp8_experts_are_refused_naming_the_file_and_the_fix(tmp_path):
    """DeepSeek-V3 ships experts as float8_e4m3fn with 128×128 weight_scale_inv blocks."""
    from safetensors.torch import load_file
    from support.archs import build

    path = build("deepseek_v3", tmp_path / "ds")
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if ".experts." in k]:
        tensors[key] = tensors[key].to(torch.float8_e4m3fn)
        tensors[key.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(path) as c, pytest.raises(CheckpointError, match=r"(?s)model\.safetensors: 24 expert tensors are "
                                                                          r"stored in FP8.*fp8_cast_bf16"):
        detect(c)


def test_row_variances_match_an_independent_reference_and_leave_the_input_alone():
    from expertbits.tasks.allocation.statistics import row_variances

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3000, 257, generator=gen) * 0.02 + torch.linspace(-1, 1, 3000)[:, None]  # large row means
    before = w.clone()
    best, at_norm = row_variances(w, block=1024)
    var = w.double().var(dim=1, unbiased=False)
    assert best == pytest.approx(float(var.max()), rel=1e-5)
    assert at_norm == pytest.approx(float(var[w.double().norm(dim=1).argmax()]), rel=1e-5)
    assert torch.equal(w, before)
