"""The fused mixed-width MoE kernel against the pure-torch (float64) reference.

Without CUDA every launch runs in the Triton interpreter: small shapes, none a multiple of a block
or a group, every width alone and mixed, each launch path (GEMV-style rows, split-K, tl.dot tiles).
"""

import json

import pandas as pd
import pytest
import torch

from expertbits.kernels.bank import ExpertBank, activation_name
from expertbits.kernels.fused_moe import Launch, fused_moe, fused_moe_reference, moe_align
from expertbits.kernels.modules import GatedExperts
from expertbits.kernels.packing import SUPPORTED_BITS, quantize_rtn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, F = 72, 40  # neither a multiple of a group (32) nor of the interpreter's blocks


def _banks(bits, hidden=H, ffn=F, group_size=32, seed=0, gated=True):
    gen = torch.Generator().manual_seed(seed)

    def bank(n, k):
        return ExpertBank.stack([quantize_rtn(torch.randn(n, k, generator=gen) * 0.2, b, group_size) for b in bits])
    gate, up, down = bank(ffn, hidden), bank(ffn, hidden) if gated else None, bank(hidden, ffn)
    return tuple(b.to(DEVICE) if b is not None else None for b in (gate, up, down))


def _routing(tokens, top_k, experts, seed=0, hidden=H):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    scores = torch.rand(tokens, experts, generator=gen)
    weights, index = scores.softmax(-1).topk(top_k, dim=-1)
    return x.to(DEVICE), index.to(DEVICE), weights.to(DEVICE)


def _rel_error(x, index, weights, banks, activation="silu", **kw):
    out = fused_moe(x, index, weights, *banks, activation, **kw)
    ref = fused_moe_reference(x, index, weights, *banks, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


FP32_RTOL = 2e-6  # two chained fp32 GEMMs of K <= 72 against float64; observed ~3e-7


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"{b}bit")
def test_every_width_alone(bits, group_size):
    banks = _banks([bits] * 4, group_size=group_size, seed=bits)
    assert _rel_error(*_routing(7, 2, 4, seed=bits), banks) < FP32_RTOL


MIXED = [1, 2, 3, 4, 8, 5, 6, 7]


@pytest.mark.parametrize("launch", [
    None,                                      # the interpreter's own choice
    Launch(1, (16, 32), (16, 32)),             # decode: one pair per program, several K steps
    Launch(4, (32, 32), (32, 16), split_k=3),  # GEMV-style rows with split-K on down
    Launch(16, (16, 16), (16, 16), split_k=2), # tl.dot tiles, partial M/N/K everywhere
], ids=["auto", "gemv", "gemv-splitk", "dot"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixed_widths_top1_and_topk(launch, top_k):
    banks = _banks(MIXED, seed=top_k)
    assert _rel_error(*_routing(13, top_k, len(MIXED), seed=top_k), banks, launch=launch) < FP32_RTOL


@pytest.mark.slow
@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_sync_free_grid_idles_the_blocks_past_the_end(block_m):
    """The CUDA default: the grid is sized for the worst case and idle blocks return at once."""
    banks = _banks(MIXED, seed=block_m)
    routed = _routing(11, 2, len(MIXED), seed=block_m)
    launch = Launch(block_m, (16, 32), (16, 32), split_k=2)
    exact = fused_moe(*routed, *banks, launch=launch, sync_free=False)
    assert _rel_error(*routed, banks, launch=launch, sync_free=True) < FP32_RTOL
    assert torch.allclose(fused_moe(*routed, *banks, launch=launch, sync_free=True), exact, atol=1e-6)


def test_experts_without_tokens_a_single_token_and_dropped_slots():
    banks = _banks(MIXED)
    x, index, weights = _routing(1, 2, len(MIXED))
    assert _rel_error(x, index, weights, banks) < FP32_RTOL  # one token: 6 of 8 experts get nothing
    x, index, weights = _routing(9, 2, len(MIXED), seed=3)
    index[:, 0] = 5  # every first slot on one expert: others starve
    index[2, 1], index[4, 1] = -1, len(MIXED)  # dropped slots (out-of-range markers) add nothing
    assert _rel_error(x, index, weights, banks, launch=Launch(2, (16, 16), (16, 16), split_k=2)) < FP32_RTOL
    kept = index.clone()
    kept[2, 1] = kept[4, 1] = 0
    w0 = weights.clone()
    w0[2, 1] = w0[4, 1] = 0.0  # a dropped slot equals a slot with weight 0
    assert torch.allclose(fused_moe(x, index, weights, *banks), fused_moe(x, kept, w0, *banks), atol=1e-6)


def test_relu_mlp_without_up_switch_style():
    banks = _banks([2, 4, 3, 8], gated=False)
    assert _rel_error(*_routing(11, 1, 4), banks, activation="relu") < FP32_RTOL


def test_no_tokens():
    banks = _banks([2, 4])
    x = torch.zeros(0, H, device=DEVICE)
    empty = torch.zeros(0, 2, dtype=torch.long, device=DEVICE)
    assert fused_moe(x, empty, empty.float(), *banks).shape == (0, H)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_activations(dtype):
    """(In the interpreter, bf16 runs in fp32: it multiplies bf16 bit patterns otherwise.)"""
    banks = _banks(MIXED)
    x, index, weights = _routing(10, 2, len(MIXED))
    assert _rel_error(x.to(dtype), index, weights, banks) < 2e-2  # h is stored in x's dtype


def test_matches_the_loaded_models_torch_path():
    """The kernel and the loop the CPU loader runs (GatedExperts over packed experts) agree."""
    gate, up, down = _banks(MIXED)

    class Banked(GatedExperts):
        def expert(self, e):
            return gate.expert(e), up.expert(e), down.expert(e)

    x, index, weights = _routing(12, 2, len(MIXED))
    loop = Banked(len(MIXED), torch.nn.functional.silu)(x, index, weights)
    assert torch.allclose(fused_moe(x, index, weights, gate, up, down), loop, rtol=1e-5, atol=1e-6)


def test_bank_views_are_the_experts_bytes():
    qs = [quantize_rtn(torch.randn(F, H), b, 32) for b in MIXED]
    bank = ExpertBank.stack(qs)
    assert bank.weight_bytes == sum(q.nbytes for q in qs)
    for e, q in enumerate(qs):
        got = bank.expert(e)
        assert got.bits == q.bits and torch.equal(got.packed, q.packed) and torch.equal(got.scales, q.scales)
        assert torch.equal(got.zeros, q.zeros) and got.packed.data_ptr() != q.packed.data_ptr()
    with pytest.raises(ValueError, match="expert 1 is"):
        ExpertBank.stack([qs[0], quantize_rtn(torch.randn(F, H + 1), 2, 32)])
    with pytest.raises(ValueError, match="group size"):
        ExpertBank.stack([qs[0], quantize_rtn(torch.randn(F, H), 2, 64)])


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_alignment_sorts_every_pair_once_into_single_expert_blocks(block_m):
    gen = torch.Generator().manual_seed(block_m)
    index = torch.randint(-1, 7, (23, 3), generator=gen)  # experts 0..5 of 6, with -1 and 6 dropped
    for exact in (True, False):
        a = moe_align(index, 6, block_m, exact=exact)
        used = int(a.post_pad)
        pairs = a.sorted_pairs[:used]
        real = pairs[pairs < index.numel()].long()
        flat = index.reshape(-1)
        assert sorted(real.tolist()) == [p for p in range(flat.numel()) if 0 <= flat[p] < 6]
        assert torch.all(a.sorted_pairs[used: a.blocks * block_m] == index.numel())  # idle blocks hold no pair
        for b in range(used // block_m):
            members = a.sorted_pairs[b * block_m:(b + 1) * block_m].long()
            members = members[members < index.numel()]
            assert len(members) and torch.all(flat[members] == a.block_expert[b])
        assert torch.all(a.block_expert[used // block_m:] == -1)
        if exact:
            assert a.blocks * block_m == used


def test_activation_is_recognised_by_what_it_computes():
    from transformers.activations import ACT2FN

    assert activation_name(ACT2FN["silu"]) == activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(ACT2FN["relu"]) == "relu"
    assert activation_name(ACT2FN["gelu"]) is None


def test_bad_inputs_are_refused():
    gate, up, down = _banks([2, 4])
    x, index, weights = _routing(3, 2, 2)
    with pytest.raises(ValueError, match="the format needs"):  # e.g. scales converted by model.bfloat16()
        fused_moe(x, index, weights, gate.with_tensors(dict(gate.tensors(), scales=gate.scales.bfloat16())), up, down)
    x, index, weights = _routing(3, 2, 2)
    with pytest.raises(ValueError, match="activations"):
        fused_moe(x, index, weights, gate, up, down, "gelu")
    with pytest.raises(ValueError, match="expert MLP"):
        fused_moe(x[:, :-1], index, weights, gate, up, down)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        fused_moe(x, index[:, :1], weights, gate, up, down)
    with pytest.raises(ValueError, match="same experts"):
        fused_moe(x, index, weights, gate, _banks([2, 4, 3])[1], down)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 300])
def test_gpu_real_width_bf16(tokens):
    banks = _banks([2, 3, 4, 2, 4, 3, 8, 2], hidden=2048 + 64, ffn=768 + 32, group_size=128, seed=tokens)
    x, index, weights = _routing(tokens, 2, 8, seed=tokens, hidden=2048 + 64)
    assert _rel_error(x.bfloat16(), index, weights, banks) < 2e-2
    assert _rel_error(x, index, weights, banks) < 1e-5


# ---- the validation stage's fused check, on every architecture ---------------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "switch_transformers"])
def test_fused_check_runs_the_shipped_model_routing_on_every_layer(arch, tmp_path, monkeypatch):
    from support.archs import build
    from support.quantized import quantize_mixed

    import expertbits.tasks.measure.fused_check as vf
    from expertbits.zoo import text_path

    src = build(arch, tmp_path / "src")
    quantize_mixed(src, tmp_path / "q")
    monkeypatch.setattr(vf, "INTERPRETER_FFN", 24)  # slice every layer, as the interpreter does real-size ones
    monkeypatch.setattr(vf, "INTERPRETER_HIDDEN", 20)
    rows = vf.validate_fused(tmp_path / "q", text_path("code-train").read_text()[:20_000], seq_len=32)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert sorted({r["layer"] for r in rows}) == sorted(map(int, qc["experts_modules"]))
    for r in rows:
        assert r["passed"] and r["rel_error"] < 1e-5 and r["pairs"] > 0, r
        assert r["activation"] == ("relu" if arch == "switch_transformers" else "silu")
        assert (r["ffn_checked"], r["hidden_checked"]) == (24, 20) and r["model_rel_error"] is None
        bits = qc["expert_bits"][str(r["layer"])]
        assert r["widths"] == ",".join(f"{b}:{bits.count(b)}" for b in sorted(set(bits)))
    assert {r["phase"] for r in rows} == {"prefill", "decode"} | ({"prefill-fp16"} if torch.cuda.is_available() else set())
    summary = vf.summarize(pd.DataFrame(rows))
    assert summary["fused_sliced"] and summary["fused_failed"] == 0 and summary["fused_not_applicable"] == 0


def test_fused_check_fails_rows_over_the_bound_and_reports_unfusable_activations(micro_pair, tmp_path, monkeypatch):
    from support.quantized import quantize_mixed

    import expertbits.tasks.measure.fused_check as vf
    from expertbits.zoo import text_path

    quantize_mixed(micro_pair[1], tmp_path / "q")
    text = text_path("code-train").read_text()[:20_000]
    strict = pd.DataFrame(vf.validate_fused(tmp_path / "q", text, seq_len=32, rtol=0.0))
    assert (strict.rel_error > 0).all() and vf.summarize(strict)["fused_failed"] == len(strict)
    full = pd.DataFrame(vf.validate_fused(tmp_path / "q", text, seq_len=32))
    fp32 = full[full.phase.isin(["prefill", "decode"])]
    assert (fp32.model_rel_error < 1e-5).all()  # the loaded model's own expert path agrees on full layers
    assert vf.served_dtype(tmp_path / "q") == torch.float16  # the fixture's config.json: a half row on a GPU
    monkeypatch.setattr(vf, "activation_name", lambda act: None)  # as for an activation the kernel lacks
    unfused = pd.DataFrame(vf.validate_fused(tmp_path / "q", text, seq_len=32))
    assert unfused.passed.isna().all() and unfused.rel_error.isna().all()
    summary = vf.summarize(unfused)
    assert summary["fused_failed"] == 0 and summary["fused_not_applicable"] == len(unfused)
    assert summary["fused_max_rel_error"] is None


def test_slicing_a_bank_keeps_exactly_the_leading_weights():
    from expertbits.tasks.measure.fused_check import _slice

    down = ExpertBank.stack([quantize_rtn(torch.randn(H, F), b, 32) for b in MIXED])
    cut = _slice(down, "down", 35, 30)  # 35 of 40 columns: inside a group and inside a 3-bit word
    for e in range(len(MIXED)):
        assert torch.equal(cut.expert(e).dequantize(), down.expert(e).dequantize()[:30, :35])


@pytest.mark.slow
def test_benchmark_script_runs_and_refuses_figures_without_a_gpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "bench_fused_moe.py"
    if not torch.cuda.is_available():
        plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        assert plain.returncode == 2 and "timings need a GPU" in plain.stderr
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(script), "--smoke", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["interpreter"] == (not torch.cuda.is_available())
    configs = {(r["tokens"], r["config"]) for r in result["rows"]}
    assert configs == {(t, c) for t in (1, 4) for c in ("bf16", "4bit", "2bit", "mixed")}
    assert all(r["speedup_vs_bf16"] > 0 and r["bytes"] > 0 for r in result["rows"])
    mixed, four = ({r["tokens"]: r["bytes"] for r in result["rows"] if r["config"] == c} for c in ("mixed", "4bit"))
    assert all(mixed[t] < four[t] for t in mixed)  # a 2.5-bit layer holds fewer bytes than a 4-bit one


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_spills(tmp_path):
    """Compiled Triton refuses code the interpreter runs: compile both kernels for sm_90 (offline,
    Triton's own ptxas) at the smallest decode and the largest prefill launch the wrapper picks."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "compile_fused_moe.py"
    out = tmp_path / "compiled.json"
    env = dict(__import__("os").environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    done = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["kernel"], r["x"]) for r in rows} == {(k, x) for k in ("up", "down") for x in ("bf16", "fp32")}
    assert all(r["spill_bytes"] == 0 for r in rows if r["x"] == "bf16"), rows  # the served dtype
