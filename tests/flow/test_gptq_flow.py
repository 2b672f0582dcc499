"""GPTQ and the clipping search as the flow's and the league's quantizers, end to end on a tiny trained pair."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from expertbits.kernels.gptq import gptq, output_error
from expertbits.kernels.packing import QuantizedTensor, pack, quantize_clipped, quantize_rtn, unpack
from expertbits.tasks.allocation import calibrate, statistics
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.measure import league
from expertbits.tasks.measure.evaluate import Reference, evaluate
from expertbits.tasks.measure.kernel_check import _on_grid, _within_half_step, weight_error_ratio
from expertbits.tasks.quantization.gptq_sequential import gptq_errors, sequential_gptq
from expertbits.tasks.quantization.method import QuantizerConfig
from expertbits.tasks.quantization.writer import quantize_checkpoint
from expertbits.zoo import text_path

CAL = text_path("code-train").read_text()[:40_000]
HELD = text_path("code-heldout").read_text()[:40_000]


@pytest.fixture
def params(micro_pair, tmp_path):
    base, ft = micro_pair
    (tmp_path / "cal.txt").write_text(CAL)
    (tmp_path / "held.txt").write_text(HELD)
    return dict(checkpoint=str(ft), reference=str(base), group_size=32, store=str(tmp_path / "store"),
                eval_text=str(tmp_path / "held.txt"), calibration_text=str(tmp_path / "cal.txt"), eval_windows=4,
                eval_seq_len=64, calibration_windows=8)


def run(**kw):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    return quantize_moe(QuantizeParams(**kw), return_state=True)


def shards(store: Path, manifest) -> dict[str, bytes]:
    """The MoE layer shards' expert tensors of a published run, by tensor name."""
    folder = store / "runs" / manifest.run_id / "quantization"
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys() if ".experts." in k})
    return out


@pytest.mark.integration
def test_gptq_run_reports_coverage_validates_caches_and_falls_back_to_exactly_rtn(prefect_api, params, tmp_path):
    from support.flowruns import artifacts, task_states

    store = tmp_path / "store"
    state = run(**dict(params, quantizer="gptq", allocator="routed-error", avg_bits=2.5, bit_widths=[2, 3]))
    m = state.result()
    # GPTQ rotates by default (flows/params.py): the labels say so
    assert m.summary["quantization"]["quantizer"] == "gptq+rot" and m.summary["calibration"]["quantizer"] == "gptq+rot"
    run_dir = store / "runs" / m.run_id
    qc = json.loads((run_dir / "quantization" / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"]["method"] == "gptq" and qc["quantizer"]["act_order"] and qc["quantizer"]["weighted"]
    assert qc["quantizer"]["rotate"] and qc["version"] == 3
    con = duckdb.connect(str(run_dir / "expertbits.duckdb"), read_only=True)
    cov = con.execute("SELECT layer, expert, calibration_tokens, quantizer FROM calibration_coverage ORDER BY 1, 2").df()
    routed = con.execute("SELECT layer, expert, routed_tokens, tokens FROM expert_calibration ORDER BY 1, 2").df()
    checks = con.execute("SELECT DISTINCT weight_check, passed FROM kernel_validation").fetchall()
    qerr = con.execute("SELECT DISTINCT quantizer FROM expert_qerror").fetchall()
    con.close()
    assert len(cov) == 8 and set(cov.quantizer) == {"gptq+rot"}
    # layer 0 sees the embeddings, which are not quantized: exactly what the routing stage's
    # full-precision forward counted; every layer routes each of its tokens to top-2 experts
    assert cov[cov.layer == 0].calibration_tokens.tolist() == routed[routed.layer == 0].routed_tokens.tolist()
    assert (cov.groupby("layer").calibration_tokens.sum() == 2 * routed.tokens.iloc[0]).all()
    least = m.summary["quantization"]["least_covered"]
    assert least[0]["calibration_tokens"] == cov.calibration_tokens.min() and m.summary["quantization"]["fallback_experts"] == 0
    assert checks == [("grid", True)] and qerr == [("gptq+rot",)]
    assert any(key and key.startswith("calibration-coverage-") for _, key in artifacts(state))

    again = run(**dict(params, quantizer="gptq", allocator="routed-error", avg_bits=2.5, bit_widths=[2, 3]))
    states = task_states(again)
    assert states["calibration-sequential"] == states["quantization-sequential"] == "Cached"

    # the whole-model budget: the same allocation, the attention layers packed too, validated, published
    whole = run(**dict(params, quantizer="gptq", allocator="routed-error", avg_bits=2.5, bit_widths=[2, 3],
                       dense_bits=8, dense_override=["*.o_proj=4"]))
    w = whole.result()
    assert task_states(whole)["calibration-sequential"] == "Cached" and w.run_id != m.run_id
    q = w.summary["quantization"]
    assert q["dense_matrices"] == 8 and q["dense_bits"] == [4, 8] and q["bytes"] < m.summary["quantization"]["bytes"]
    assert w.summary["validation"]["matrices"] == m.summary["validation"]["matrices"] + 8
    con = duckdb.connect(str(store / "runs" / w.run_id / "expertbits.duckdb"), read_only=True)
    attention = con.execute("SELECT count(*), bool_and(passed) FROM kernel_validation WHERE name LIKE '%self_attn%'").fetchone()
    con.close()
    assert attention == (8, True) and w.summary["evaluation"]["kl"] < 2 * m.summary["evaluation"]["kl"]

    # at 3 bits uniform: GPTQ beats RTN; with every expert under --gptq-min-tokens, GPTQ's output is
    # RTN's, tensor for tensor, and says so
    uniform = dict(params, allocator="uniform", avg_bits=3, bit_widths=[3], quantizer="rtn")
    rtn, gq = run(**uniform).result(), run(**dict(uniform, quantizer="gptq")).result()
    assert gq.summary["evaluation"]["kl"] < 0.9 * rtn.summary["evaluation"]["kl"]
    fallback = run(**dict(uniform, quantizer="gptq", rotate=False, gptq_min_tokens=10**6)).result()
    assert fallback.summary["quantization"]["fallback_experts"] == 8
    a, b = shards(store, rtn), shards(store, fallback)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any((t == 0).all() for k, t in b.items() if k.endswith(".scales"))

    clipped = run(**uniform, clip=True).result()
    assert clipped.summary["validation"]["failed"] == 0 and clipped.summary["quantization"]["quantizer"] == "rtn+clip"
    c = shards(store, clipped)  # the search shrank some groups' ranges (its weight error is tested in test_gptq)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith(".scales"))


def test_gptq_errors_match_an_independent_capture_of_the_routed_tokens(micro_pair):
    """Layer 0's GPTQ errors from the streamed measuring pass equal GPTQ run by hand on the tokens a
    plain transformers model routes to each expert (its own hook), with the routing-weighted Hessian."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.tasks.checkpoints.texts import token_windows

    _, ft = micro_pair
    q = QuantizerConfig("gptq")
    rows = pd.DataFrame(gptq_errors(ft, CAL, (2, 3), 32, q, seq_len=64, windows=4))
    tok = AutoTokenizer.from_pretrained(ft)
    ids = token_windows(CAL, tok, 64, 4)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    seen = {}
    model.model.layers[0].mlp.experts.register_forward_pre_hook(
        lambda mod, args: seen.update(x=args[0].detach().reshape(-1, args[0].shape[-1]), idx=args[1], w=args[2]))
    with torch.no_grad():
        model(input_ids=ids)
    experts = model.model.layers[0].mlp.experts
    for e in (0, 3):
        token, slot = torch.where(seen["idx"] == e)
        x, r = seen["x"][token], seen["w"][token, slot].clamp(min=0)
        gate, up = experts.gate_up_proj[e].detach().chunk(2, dim=0)
        down = experts.down_proj[e].detach()
        h_in = (x * r.sqrt()[:, None]).T @ (x * r.sqrt()[:, None])
        a = experts.act_fn(x @ gate.T) * (x @ up.T)
        h_out = (a * r.sqrt()[:, None]).T @ (a * r.sqrt()[:, None])
        y = a @ down.T
        for bits in (2, 3):
            qg, qu, qd = (gptq(w, h, bits, 32, act_order=True) for w, h in ((gate, h_in), (up, h_in), (down, h_out)))
            want = sum(output_error(w, q, h) for w, q, h in ((gate, qg, h_in), (up, qu, h_in), (down, qd, h_out))) / len(token)
            row = rows[(rows.layer == 0) & (rows.expert == e) & (rows.bits == bits)]
            assert row.routed_input_error.item() == pytest.approx(want, rel=1e-3)
            # the expert's whole output through its quantized matrices, times the routing weight
            y_q = (experts.act_fn(x @ qg.dequantize().T) * (x @ qu.dequantize().T)) @ qd.dequantize().T
            want_out = float(((y_q - y).double().square().sum(1) * r.double().square()).sum()) / len(token)
            assert row.output_error.item() == pytest.approx(want_out, rel=1e-3)
    for column in ("routed_input_error", "output_error"):
        assert (rows.groupby(["layer", "expert"])[column].apply(lambda s: s.is_monotonic_decreasing)).all()


def test_league_runs_gptq_cells_ranked_among_themselves_and_each_is_the_shipped_path(micro_pair):
    base, ft = micro_pair
    with Checkpoint.open(ft) as a, Checkpoint.open(base) as b:
        stats, _ = statistics.collect(a, b)
    grid = league.Grid(allocators=("uniform", "paper", "routed-error"), budgets=(2.5, 3.0), bit_sets=((2, 3, 4),),
                       group_size=32, granularities=("expert",), symmetric=(False,), quantizers=("rtn", "gptq"))
    assert grid.error_keys() == [("rtn", False), ("gptq", False)]
    qerrors = {}
    for method, sym in grid.error_keys():
        calib, qerrors[method, sym], _ = calibrate.calibrate(ft, CAL, seq_len=64, windows=4, bit_widths=(2, 3, 4),
                                                             group_size=32, quantizer=grid.quantizer(method, sym))
    with Reference(ft, HELD, seq_len=64, windows=4) as ref:
        rows, allocs = league.run(ft, stats, calib, qerrors, grid, ref,
                                  gptq_calibration={"text": CAL, "seq_len": 64, "windows": 4})
    assert set(rows.variant) == {"uniform", "paper", "routed-error", "uniform+gptq", "paper+gptq", "routed-error+gptq"}
    s = league.summarize(rows)
    for quantizer, g in s.groupby("quantizer"):
        for _, at in g.groupby("budget"):
            assert sorted(at["rank"].tolist()) == list(range(1, len(at) + 1))  # ranked among their own quantizer
    kl = rows.set_index(["variant", "budget"]).kl
    assert kl["uniform+gptq", 3.0] < kl["uniform", 3.0]
    cell = allocs[(allocs.variant == "routed-error+gptq") & (allocs.budget == 2.5)][["layer", "expert", "bits"]]
    cell = cell.reset_index(drop=True)
    packed, _, _ = sequential_gptq(ft, CAL, cell, 32, grid.quantizer("gptq", False), seq_len=64, windows=4)
    with tempfile.TemporaryDirectory() as tmp:
        quantize_checkpoint(ft, cell, 32, Path(tmp) / "q", quantizer=lambda m, w, b: packed[m.name])
        want = evaluate(ft, Path(tmp) / "q", HELD, seq_len=64, windows=4)["kl"]
    assert kl["routed-error+gptq", 2.5] == pytest.approx(want, rel=1e-5)


def test_the_weight_check_follows_the_quantizer():
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    x = torch.randn(256, 96) @ torch.randn(96, 96) * 0.3
    h = x.T @ x
    q = gptq(w, h, 2, 32, act_order=True)
    assert _on_grid(w, q, False) and not _within_half_step(w, q)  # GPTQ moves weights past half a step, on the grid
    assert _on_grid(w, quantize_clipped(w, 2, 32), False) and _on_grid(w, quantize_rtn(w, 2, 32, True), True)
    for bits in (4, 8):  # tiny weights: subnormal fp16 scales, rounded up by a whole subnormal ulp
        tiny = torch.randn(16, 96) * 1e-5
        assert _on_grid(tiny, gptq(tiny, h, bits, 32, act_order=True), False)
    wide = QuantizedTensor(q.packed, (q.scales.float() * 1.5).half(), q.zeros, q.bits, q.group_size, q.shape)
    assert not _on_grid(w, wide, False)  # a corrupted scale
    shifted = QuantizedTensor(q.packed, q.scales, (q.zeros.int() + 2).clamp(max=3).to(torch.uint8), q.bits,
                              q.group_size, q.shape)
    assert not _on_grid(w, shifted, False)  # corrupted zero points put weights off the group's range
    codes = unpack(q.packed, 2, 96)
    scrambled = QuantizedTensor(pack(codes[:, torch.randperm(96)], 2), q.scales, q.zeros, 2, 32, q.shape)
    # mis-ordered codes stay on the grid; their weight error, reported beside the check, gives them away
    assert _on_grid(w, scrambled, False)
    assert weight_error_ratio(w, quantize_rtn(w, 2, 32), False) == pytest.approx(1.0)
    assert weight_error_ratio(w, quantize_clipped(w, 2, 32), False) <= 1.0
    assert 1.0 < weight_error_ratio(w, q, False) < 5 < weight_error_ratio(w, scrambled, False)


def test_quantizer_options_are_checked_before_any_work():
    from expertbits.flows.params import LeagueParams, QuantizeParams

    with pytest.raises(ValueError, match="unknown quantizer 'awq'"):
        QuantizeParams(quantizer="awq")
    with pytest.raises(ValueError, match="unknown quantizer"):
        LeagueParams(quantizers=["rtn", "awq"])
    with pytest.raises(ValueError):
        QuantizeParams(quantizer="gptq", gptq_damp=0)
    # the defaults' choices: one width per layer keeps its own (model-wide) budget, under auto and Switch alike
    for quantizer in ("auto", "gptq", "rtn"):
        layer = QuantizeParams(quantizer=quantizer, granularity="layer")
        for chosen in ([layer.for_checkpoint(False), layer.for_checkpoint(True)] if quantizer == "auto" else [layer]):
            assert chosen.budget_scope == "layer" and chosen.allocation_config().granularity == "layer"
    assert QuantizeParams(quantizer="gptq", clip=True).quantizer_config().label == "gptq+rot+clip"
    assert QuantizeParams(quantizer="gptq", clip=True, rotate=False).quantizer_config().label == "gptq+clip"
    # GPTQ's options do not touch an RTN run's keys or config; routing-only allocators skip GPTQ errors
    rtn = QuantizeParams(quantizer="rtn")
    assert QuantizeParams(quantizer="rtn", gptq_damp=0.05).quantizer_config().as_dict() == rtn.quantizer_config().as_dict()
    assert QuantizeParams(quantizer="gptq", gptq_damp=0.05).quantizer_config().as_dict()["damp"] == 0.05
    assert QuantizeParams(quantizer="gptq", allocator="frequency").error_quantizer().method == "rtn"
    assert QuantizeParams(quantizer="gptq", allocator="pmq").error_quantizer().method == "gptq"


def test_servability_tables_keep_clipped_rtn_cells():
    rows = [{"bit_set": "2,3,4", "budget": 3.0, "allocator": a, "granularity": g, "symmetric_quant": sym,
             "quantizer": q, "kl": kl, "variant": a}
            for a, g, sym, q, kl in (("routed-error", "expert", False, "rtn+clip", 0.1),
                                     ("routed-error", "layer", False, "rtn+clip", 0.2),
                                     ("routed-error", "expert", False, "gptq+clip", 0.05))]
    md = league.servability(pd.DataFrame(rows))
    assert "| per-expert widths, zero points (expertbits) | 0.1000 |" in md
    assert "| one width per layer, zero points (vLLM) | 0.2000 |" in md and "0.0500" not in md
