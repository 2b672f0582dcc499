"""GPTQ with routed, sequential calibration on a small trained Mixtral."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from expertbits.kernels.packing import quantize_rtn
from expertbits.tasks.measure.evaluate import evaluate
from expertbits.tasks.model.streaming import streamed
from expertbits.tasks.quantization.gptq_sequential import sequential_gptq
from expertbits.tasks.quantization.method import QuantizerConfig
from expertbits.tasks.quantization.writer import quantize_checkpoint
from expertbits.zoo import text_path

CAL = text_path("code-train").read_text()[:40_000]
HELD = text_path("code-heldout").read_text()[:40_000]


def uniform(bits: int) -> pd.DataFrame:
    return pd.DataFrame([{"layer": layer, "expert": e, "bits": bits} for layer in range(2) for e in range(4)])


def write(ft: Path, alloc: pd.DataFrame, packed: dict, out: Path) -> Path:
    quantize_checkpoint(ft, alloc, 32, out, quantizer=lambda m, w, bits: packed[m.name])
    return out


def test_gptq_beats_rtn_and_layers_see_the_quantized_layers_before_them(micro_pair, tmp_path):
    _, ft = micro_pair
    alloc = uniform(2)
    packed, coverage, _ = sequential_gptq(ft, CAL, alloc, 32, seq_len=64, windows=8)
    assert len(packed) == 24 and all(q.bits == 2 for q in packed.values())
    assert (coverage.calibration_tokens > 0).all() and set(coverage.quantizer) == {"gptq"}
    gptq_kl = evaluate(ft, write(ft, alloc, packed, tmp_path / "gptq"), HELD, seq_len=64, windows=4)["kl"]
    quantize_checkpoint(ft, alloc, 32, tmp_path / "rtn")
    rtn_kl = evaluate(ft, tmp_path / "rtn", HELD, seq_len=64, windows=4)["kl"]
    assert gptq_kl < 0.9 * rtn_kl, (gptq_kl, rtn_kl)

    # sequential: what layer 1's experts were calibrated on is what they get in the quantized model
    # (layer 0 already quantized), not what the full-precision model gives them
    from transformers import AutoTokenizer

    from expertbits.tasks.checkpoints.texts import examples, token_windows
    from expertbits.tasks.model.streaming import batches

    tok = AutoTokenizer.from_pretrained(ft)
    inputs = next(iter(batches(examples(token_windows(CAL, tok, 64, 8), tok, False), 0, 1, logits_bytes=1 << 62)))[0]
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = args[0].detach().clone()
        return hook

    for name, path in (("fp", ft), ("quantized", tmp_path / "gptq")):
        with streamed(path) as model, torch.no_grad():
            model.model.layers[1].mlp.experts.register_forward_pre_hook(grab(name))
            model(**inputs)
    captured = {}
    import expertbits.tasks.quantization.gptq_sequential as sequential

    original = sequential._Calibrating.expert_for

    def spy(self, e, x, weight):
        if self.layer.layer == 1:
            captured[e] = x.detach().clone()
        return original(self, e, x, weight)

    sequential._Calibrating.expert_for = spy
    try:
        sequential_gptq(ft, CAL, alloc, 32, seq_len=64, windows=8)
    finally:
        sequential._Calibrating.expert_for = original
    routed = torch.cat([captured[e] for e in sorted(captured)])
    assert len(captured) == 4
    # every token layer 1 routed, in the quantized model's hidden states, up to float noise
    q_rows = seen["quantized"].reshape(-1, seen["quantized"].shape[-1])
    fp_rows = seen["fp"].reshape(-1, seen["fp"].shape[-1])
    exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut cancels catastrophically at this scale
    dist_q = torch.cdist(routed, q_rows, compute_mode=exact).min(1).values.max()
    dist_fp = torch.cdist(routed, fp_rows, compute_mode=exact).min(1).values.max()
    assert dist_q < 1e-4 < 1e-2 < dist_fp


def test_too_few_tokens_falls_back_to_rtn_and_says_so(micro_pair):
    _, ft = micro_pair
    alloc = uniform(3)
    packed, coverage, _ = sequential_gptq(ft, CAL, alloc, 32, QuantizerConfig("gptq", min_tokens=10**9), seq_len=64, windows=2)
    assert set(coverage.quantizer) == {"rtn-fallback"} and (coverage.calibration_tokens > 0).any()
    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint

    with Checkpoint.open(ft) as ckpt:
        for m in detect(ckpt).matrices:
            assert torch.equal(packed[m.name].packed, quantize_rtn(ckpt.read(m.key, m.index, m.rows), 3, 32).packed)
    assert not any((q.dequantize() == 0).all() for q in packed.values())  # never zeroed


def test_switch_is_refused(tmp_path):
    from support.archs import build

    path = build("switch_transformers", tmp_path / "m")
    with pytest.raises(Exception, match="decoder-only"):
        sequential_gptq(path, CAL, uniform(4), 32, seq_len=32, windows=2)
