"""Quantization, kernel validation and evaluation as plain functions on a tiny trained pair."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.reference import dequantize_checkpoint

from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.measure.evaluate import evaluate
from expertbits.tasks.measure.kernel_check import validate
from expertbits.tasks.model.packed_folder import iter_quantized
from expertbits.tasks.quantization.writer import quantize_checkpoint
from expertbits.zoo import text_path

TEXT = text_path("code-heldout").read_text()


def uniform(bits: int, layers=2, experts=4) -> pd.DataFrame:
    return pd.DataFrame([{"layer": l, "expert": e, "bits": bits} for l in range(layers) for e in range(experts)])


def mixed() -> pd.DataFrame:
    return pd.DataFrame([{"layer": l, "expert": e, "bits": 2 + (e + l) % 3} for l in range(2) for e in range(4)])


def test_quantized_checkpoint_records_every_expert_and_reconstructs_within_half_a_step(micro_pair, tmp_path):
    ft = micro_pair[1]
    summary = quantize_checkpoint(ft, mixed(), 32, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["expert_bits"] == {"0": [2, 3, 4, 2], "1": [3, 4, 2, 3]}
    assert summary["matrices"] == len(qc["modules"]) == 2 * 4 * 3
    assert summary["avg_bits"] == pytest.approx(2.875)
    assert summary["effective_bits"] > summary["avg_bits"]  # scales and zero points cost bits
    with Checkpoint.open(ft) as src:
        for name, info, q in iter_quantized(tmp_path / "q"):
            w = src.read(info["source"]["key"]).float()
            assert q.bits == qc["expert_bits"][str(info["layer"])][info["expert"]]
            step = q.scales.float().repeat_interleave(32, dim=1)[:, : w.shape[1]]
            assert ((q.dequantize() - w).abs() <= step / 2 + 2e-3 * (w.abs() + step * 2**q.bits) + 1e-6).all(), name
    # non-expert tensors are copied byte for byte
    orig = load_file(ft / "model.safetensors")
    out = {}
    for f in sorted((tmp_path / "q").glob("model-*.safetensors")):
        out.update(load_file(f))
    assert torch.equal(orig["model.layers.0.block_sparse_moe.gate.weight"], out["model.layers.0.block_sparse_moe.gate.weight"])


def test_quantization_is_deterministic(micro_pair, tmp_path):
    quantize_checkpoint(micro_pair[1], mixed(), 32, tmp_path / "a")
    quantize_checkpoint(micro_pair[1], mixed(), 32, tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_fused_layout_roundtrips_through_transformers(micro_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(micro_pair[1])
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    quantize_checkpoint(tmp_path / "fused", uniform(8), 32, tmp_path / "q")
    deq = dequantize_checkpoint(tmp_path / "q", tmp_path / "fused", tmp_path / "deq")
    with Checkpoint.open(deq) as d, Checkpoint.open(tmp_path / "fused") as f:
        assert {k: v.shape for k, v in d.tensors.items()} == {k: v.shape for k, v in f.tensors.items()}
        key = "model.layers.1.mlp.experts.gate_up_proj"
        assert (d.read(key).float() - f.read(key).float()).abs().max() < 0.01  # 8-bit: tiny error
    m8 = AutoModelForCausalLM.from_pretrained(deq).eval()
    ids = torch.arange(32)[None]
    with torch.no_grad():
        assert torch.allclose(m8(ids).logits, model.eval()(ids).logits, atol=0.05)


def test_validation_passes_then_catches_a_corrupted_file(micro_pair, tmp_path):
    quantize_checkpoint(micro_pair[1], mixed(), 32, tmp_path / "q")
    report, summary = validate(tmp_path / "q", micro_pair[1])
    assert summary["matrices"] == 24 and summary["failed"] == 0 and report.passed.all()
    assert summary["max_rel_error"] < 1e-5
    shard = sorted((tmp_path / "q").glob("model-*.safetensors"))[-1]
    t = load_file(shard)
    name = next(k for k in t if k.endswith(".qweight"))
    t[name] = t[name] ^ 0x0F0F0F0F  # flip code bits
    save_file(t, shard, metadata={"format": "pt"})
    report, summary = validate(tmp_path / "q", micro_pair[1])
    assert summary["failed"] == 1
    assert report.loc[~report.passed, "name"].item() == name.removesuffix(".qweight")
    assert not report.loc[~report.passed, "quant_error_ok"].item()


def test_kl_orders_bit_widths(micro_pair, tmp_path):
    kl = {}
    for bits in (8, 4, 2):
        quantize_checkpoint(micro_pair[1], uniform(bits), 32, tmp_path / f"q{bits}")
        kl[bits] = evaluate(micro_pair[1], tmp_path / f"q{bits}", TEXT, seq_len=64, windows=4)
    assert kl[8]["kl"] < kl[4]["kl"] < kl[2]["kl"]
    assert kl[8]["kl"] < 1e-3
    assert kl[2]["ppl_fp"] == pytest.approx(kl[8]["ppl_fp"])  # fp side does not depend on the quantized model
    assert kl[2]["tokens"] == 4 * 63


def test_encoder_decoder_models_are_evaluated_on_span_corruption(tmp_path):
    from transformers import AutoTokenizer, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from expertbits.zoo.build_zoo import TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=2, num_experts=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id)
    SwitchTransformersForConditionalGeneration(cfg).save_pretrained(tmp_path / "sw")
    tok.save_pretrained(tmp_path / "sw")
    layers = (1, 3)  # the sparse block of the encoder (1) and of the decoder (2 + 1)
    kl = {}
    for bits in (8, 2):
        alloc = pd.DataFrame([{"layer": l, "expert": e, "bits": bits} for l in layers for e in range(4)])
        quantize_checkpoint(tmp_path / "sw", alloc, 16, tmp_path / f"q{bits}")
        kl[bits] = evaluate(tmp_path / "sw", tmp_path / f"q{bits}", TEXT, seq_len=64, windows=4)
    assert kl[8]["objective"] == "span-corruption" and kl[8]["windows"] == 4
    assert kl[8]["kl"] < kl[2]["kl"] and kl[8]["kl"] < 1e-3
    assert kl[8]["ppl_fp"] == pytest.approx(kl[2]["ppl_fp"])


def test_interpreter_validation_samples_kernel_rows_but_checks_every_weight(micro_pair, tmp_path, monkeypatch):
    """In the Triton interpreter the kernel runs on a sample of rows; a weight corrupted outside the
    sample is still caught by the weight check."""
    import expertbits.tasks.measure.kernel_check as validate_module

    monkeypatch.setattr(validate_module, "INTERPRETER_ROWS", 8)
    quantize_checkpoint(micro_pair[1], mixed(), 32, tmp_path / "q")
    report, summary = validate(tmp_path / "q", micro_pair[1])
    assert summary["failed"] == 0 and summary["triton_interpreter"]
    assert (report.kernel_rows == 8).all() and (report.rows > 8).all()
    shard = sorted((tmp_path / "q").glob("model-*.safetensors"))[-1]
    t = load_file(shard)
    name = next(k for k in t if k.endswith(".qweight"))
    sampled = set(torch.linspace(0, t[name].shape[0] - 1, 8).round().long().tolist())
    row = next(r for r in range(t[name].shape[0]) if r not in sampled)
    t[name][row] ^= 0x0F0F0F0F
    save_file(t, shard, metadata={"format": "pt"})
    report, summary = validate(tmp_path / "q", micro_pair[1])
    assert summary["failed"] == 1 and not report.loc[~report.passed, "quant_error_ok"].item()


def test_shards_one_per_moe_layer_and_large_blocks_split(micro_pair, tmp_path, monkeypatch):
    """The rest (embeddings, head) is split when over the cap; each MoE layer has its own shard,
    holding its decoder layer's other tensors; the index names every tensor's shard."""
    import json

    import expertbits.tasks.quantization.writer as quantize_module
    from expertbits.tasks.model.streaming import streamed

    monkeypatch.setattr(quantize_module, "REST_SHARD_BYTES", 1)  # every rest tensor its own shard
    quantize_checkpoint(micro_pair[1], mixed(), 32, tmp_path / "q")
    weight_map = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    with Checkpoint.open(micro_pair[1]) as src:
        rest = [k for k in src.tensors if ".layers." not in k]
    shards = sorted(set(weight_map.values()))
    assert len(shards) == len(rest) + 2 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert len({weight_map[k] for k in rest}) == len(rest)
    for layer in (0, 1):
        mine = {f for k, f in weight_map.items() if k.startswith(f"model.layers.{layer}.")}
        assert len(mine) == 1  # attention, norms, router and packed experts of the layer together
    with torch.no_grad(), streamed(tmp_path / "q") as model:
        assert torch.isfinite(model(input_ids=torch.arange(16)[None], use_cache=False).logits).all()
