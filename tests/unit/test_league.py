"""Calibration statistics, the league table and its flow, on the tiny trained pair."""

import json
import tempfile
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import torch

from expertbits.kernels.packing import quantize_rtn
from expertbits.tasks.allocation import calibrate, statistics
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.measure import league
from expertbits.tasks.measure.evaluate import Reference, evaluate
from expertbits.tasks.quantization.writer import quantize_checkpoint
from expertbits.zoo import text_path


@pytest.fixture(scope="module")
def texts():
    return text_path("code-train").read_text()[:40_000], text_path("code-heldout").read_text()[:40_000]


@pytest.fixture(scope="module")
def calibrated(micro_pair, texts):
    _, ft = micro_pair
    return calibrate.calibrate(ft, texts[0], seq_len=64, windows=4, bit_widths=(2, 3, 4), group_size=32)


def test_frequency_matches_the_models_own_router(micro_pair, texts, calibrated):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, ft = micro_pair
    calib, _, info = calibrated
    tok = AutoTokenizer.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    from expertbits.tasks.checkpoints.texts import token_windows

    counts, tokens = None, 0
    with torch.no_grad():
        for w in token_windows(texts[0], tok, 64, 4):
            logits = model(w[None], output_router_logits=True).router_logits
            chosen = torch.stack([l.reshape(-1, l.shape[-1]).topk(info["top_k"], -1).indices.flatten()
                                  .bincount(minlength=l.shape[-1]) for l in logits])
            counts = chosen if counts is None else counts + chosen
            tokens += w.numel()
    want = (counts.double() / tokens).flatten().tolist()
    got = calib.sort_values(["layer", "expert"]).frequency.tolist()
    assert got == pytest.approx(want, abs=1e-9)
    assert calib.groupby("layer").frequency.sum().tolist() == pytest.approx([info["top_k"]] * 2)
    assert (calib.routing_weight > 0).all() and (calib.routing_weight <= 1).all() and (calib.hessian_trace > 0).all()


def test_quantization_error_is_the_rtn_residual(micro_pair, calibrated):
    _, ft = micro_pair
    _, qerr, _ = calibrated
    with Checkpoint.open(ft) as c:
        from expertbits.tasks.checkpoints.adapters import detect

        layer = detect(c).layers[1]
        mats = [m for m in layer.matrices if m.expert == 2]
        want = sum(float((w - quantize_rtn(w, 3, 32).dequantize()).square().sum())
                   for w in (c.read(m.key, m.index, m.rows).float() for m in mats))
    row = qerr[(qerr.layer == layer.layer) & (qerr.expert == 2) & (qerr.bits == 3)].iloc[0]
    assert row.weight_error == pytest.approx(want, rel=1e-6)
    per_expert = qerr.sort_values("bits").groupby(["layer", "expert"])
    assert all(g.weight_error.is_monotonic_decreasing and g.routed_input_error.is_monotonic_decreasing
               for _, g in per_expert)


@pytest.fixture(scope="module")
def small_league(micro_pair, texts, calibrated):
    base, ft = micro_pair
    with Checkpoint.open(ft) as a, Checkpoint.open(base) as b:
        stats, _ = statistics.collect(a, b)
    calib, qerr, _ = calibrated
    _, qerr_sym, _ = calibrate.calibrate(ft, texts[0], seq_len=64, windows=4, bit_widths=(2, 3, 4), group_size=32,
                                         symmetric=True)
    grid = league.Grid(allocators=("uniform", "paper", "random", "pmq"), budgets=(2.5, 3.0), bit_sets=((2, 3, 4),),
                       random_draws=3, group_size=32)
    ref = Reference(ft, texts[1], seq_len=64, windows=4)
    rows, allocs = league.run(ft, stats, calib, {("rtn", False): qerr, ("rtn", True): qerr_sym}, grid, ref)
    return grid, rows, allocs


def test_league_cells_cover_the_grid(small_league):
    grid, rows, allocs = small_league
    # default variant: 2.5 bits: paper, 3 random draws, pmq (no uniform); 3.0 bits: all four, random drawn 3 times;
    # servability variants for pmq at both budgets (@layer, +sym, @layer+sym) and uniform+sym at 3.0
    assert len(grid.configs()) == 5 + 6 and len(rows) == len(grid.cells()) == 11 + 6 + 1
    assert set(rows[rows.budget == 2.5].variant) == {"paper", "random", "pmq", "pmq@layer", "pmq+sym", "pmq@layer+sym"}
    layerwise = allocs[allocs.variant.str.contains("@layer")]
    assert (layerwise.groupby(["variant", "budget", "layer"]).bits.nunique() == 1).all()
    assert not (allocs[allocs.variant == "pmq"].groupby(["budget", "layer"]).bits.nunique() == 1).all()
    assert (allocs.groupby(["budget", "allocator", "seed"]).bits.mean().round(6) == 
            allocs.groupby(["budget", "allocator", "seed"]).budget.first()).all()
    assert (rows.effective_bits > rows.avg_bits).all()  # scales and zero points cost bits
    s = league.summarize(rows)
    rnd = s[(s.allocator == "random") & (s.budget == 2.5)].iloc[0]
    assert rnd.draws == 3 and rnd.kl_min <= rnd.kl <= rnd.kl_max
    assert s[s.variant.str.contains("[@+]")]["rank"].isna().all() and s[s.variant == "pmq"]["rank"].notna().all()
    md = league.markdown(s)
    assert "| paper |" in md and "| one width per layer, symmetric (vLLM) |" in md


def test_league_cell_equals_the_quantize_stage_path(micro_pair, texts, small_league):
    """A cell's numbers are those of the evaluation stage on the quantization stage's output for the
    same allocation (the loader itself is checked against an independent reference in test_loader)."""
    _, ft = micro_pair
    _, rows, allocs = small_league
    for variant, symmetric in (("paper", False), ("pmq@layer+sym", True)):
        cell = allocs[(allocs.variant == variant) & (allocs.budget == 2.5)][["layer", "expert", "bits"]]
        with tempfile.TemporaryDirectory() as tmp:
            quantize_checkpoint(ft, cell.reset_index(drop=True), 32, Path(tmp) / "q", symmetric=symmetric)
            want = evaluate(ft, Path(tmp) / "q", texts[1], seq_len=64, windows=4)
        got = rows[(rows.variant == variant) & (rows.budget == 2.5)].iloc[0]
        assert got.kl == pytest.approx(want["kl"], rel=1e-5)
        assert got.ppl == pytest.approx(want["ppl_quant"], rel=1e-5)


@pytest.mark.integration
def test_league_flow_publishes_tables_figures_and_artifacts(prefect_api, micro_pair, tmp_path, texts):
    from expertbits.flows.league import league_table
    from expertbits.flows.params import LeagueParams

    base, ft = micro_pair
    (tmp_path / "cal.txt").write_text(texts[0])
    (tmp_path / "eval.txt").write_text(texts[1])
    params = LeagueParams(checkpoint=str(ft), reference=str(base), allocators=["paper", "lambda", "frequency"],
                          budgets=[2.5], bit_sets=[[2, 3]], group_size=32, store=str(tmp_path / "store"),
                          eval_text=str(tmp_path / "eval.txt"), calibration_text=str(tmp_path / "cal.txt"),
                          eval_windows=2, calibration_windows=2, eval_seq_len=64)
    state = league_table(params, return_state=True)
    manifest = state.result()
    root = Path(manifest.uri)
    assert json.loads((root / "manifest.json").read_text())["run_id"] == manifest.run_id
    for name in ("league/pareto.png", "league/heatmap.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    con = duckdb.connect(str(root / "expertbits.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM league").fetchone()[0] == 3
        assert con.execute("SELECT count(*) FROM expert_calibration").fetchone()[0] == 8
        assert con.execute("SELECT count(DISTINCT allocator) FROM league_summary").fetchone()[0] == 3
    finally:
        con.close()
    from support.flowruns import artifacts

    kinds = {kind for kind, _ in artifacts(state)}
    assert {"table", "markdown", "progress"} <= kinds


def test_league_params_refuse_a_bad_grid():
    from pydantic import ValidationError

    from expertbits.flows.params import LeagueParams

    with pytest.raises((ValidationError, ValueError), match="unknown allocators"):
        LeagueParams(allocators=["paper", "oracle"])
    with pytest.raises((ValidationError, ValueError), match="no budget"):
        LeagueParams(bit_sets=[[2, 3, 4]], budgets=[1.5, 5.0])


def _tiny(tmp_path, kind, **config):
    from transformers import (
        AutoTokenizer,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        SwitchTransformersConfig,
        SwitchTransformersForConditionalGeneration,
    )

    from expertbits.zoo.build_zoo import TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    if kind == "switch":
        cfg = SwitchTransformersConfig(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                       num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_heads=2, num_experts=4,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=tok.pad_token_id, **config)
        model = SwitchTransformersForConditionalGeneration(cfg)
        if cfg.router_bias:  # a bias that overrules the weights: every token goes to expert 2
            with torch.no_grad():
                for name, module in model.named_modules():
                    if name.endswith("router.classifier"):
                        module.bias.zero_()[2] = 50.0
    else:
        cfg = Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                             shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
        model = Qwen2MoeForCausalLM(cfg)
    model.save_pretrained(tmp_path / kind)
    tok.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind,top_k", [("switch", 1), ("qwen2_moe", 2)])
def test_calibration_on_top1_encoder_decoder_and_shared_expert_models(tmp_path, texts, kind, top_k):
    path = _tiny(tmp_path, kind)
    calib, qerr, info = calibrate.calibrate(path, texts[0], seq_len=64, windows=2, bit_widths=(2, 4), group_size=16)
    assert info["top_k"] == top_k
    assert sorted(calib.layer.unique()) == ([1, 3] if kind == "switch" else [0, 1])
    assert calib.groupby("layer").frequency.sum().tolist() == pytest.approx([top_k] * 2)
    assert len(qerr) == len(calib) * 2 and (qerr.weight_error > 0).all()


def test_calibration_applies_the_router_bias(tmp_path, texts):
    path = _tiny(tmp_path, "switch", router_bias=True)
    calib, _, _ = calibrate.calibrate(path, texts[0], seq_len=64, windows=2, bit_widths=(2,), group_size=16)
    assert (calib.set_index(["layer", "expert"]).frequency.unstack().idxmax(axis=1) == 2).all()
    assert calib[calib.expert == 2].frequency.tolist() == pytest.approx([1.0, 1.0])


def test_league_cli_help_lists_every_parameter():
    import subprocess
    import sys

    from expertbits.flows.params import LeagueParams

    out = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "league", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in LeagueParams.model_fields:
        assert ("--storage-option" if name == "storage_options" else "--" + name.replace("_", "-")) in out
    bad = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "league", "--allocators", "paper,oracle"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "oracle" in bad.stderr


def test_cli_parses_lists_and_bit_sets():
    from expertbits.flows.cli import _given, build_parser
    from expertbits.flows.params import LeagueParams

    args = build_parser().parse_args(["league", "--budgets", "2,2.5", "--bit-sets", "2,3,4", "1,2,3", "--allocators", "paper,pmq"])
    p = LeagueParams(**_given(args, LeagueParams))
    assert p.budgets == [2.0, 2.5] and p.bit_sets == [[2, 3, 4], [1, 2, 3]] and p.allocators == ["paper", "pmq"]


def test_signal_correlations_are_per_layer_spearman(micro_pair, calibrated):
    from scipy.stats import spearmanr

    base, ft = micro_pair
    with Checkpoint.open(ft) as a, Checkpoint.open(base) as b:
        stats, _ = statistics.collect(a, b)
    calib, qerr, _ = calibrated
    corr = league.diagnostics(stats, calib, qerr)
    merged = stats.merge(calib, on=["layer", "expert"])
    want = sum(spearmanr(g.lambda_score, g.frequency).statistic for _, g in merged.groupby("layer")) / 2
    assert corr.loc["lambda_score", "frequency"] == pytest.approx(want)
    assert set(corr.columns) == set(league.SIGNALS)


def test_league_cell_is_the_artifact_the_quantize_stage_ships(micro_pair, tmp_path):
    """A cell is written byte for byte as the quantization stage writes it, its cached packed
    matrices never leak from one cell into the next, and what it evaluates is that folder."""
    _, ft = micro_pair
    with Checkpoint.open(ft) as c:
        experts = sorted({(m.layer, m.expert) for m in detect(c).matrices})
    alloc = lambda b: pd.DataFrame([{"layer": layer, "expert": e, "bits": b(e)} for layer, e in experts])  # noqa: E731
    writer = league.CellWriter(ft, 32)
    writer.write(alloc(lambda e: 2), tmp_path / "first")
    writer.write(alloc(lambda e: 2 + e % 3), tmp_path / "cell")
    quantize_checkpoint(ft, alloc(lambda e: 2 + e % 3), 32, tmp_path / "stage")
    names = sorted(p.name for p in (tmp_path / "stage").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cell").iterdir())
    for name in names:
        assert (tmp_path / "cell" / name).read_bytes() == (tmp_path / "stage" / name).read_bytes(), name


def test_league_grid_heatmap_cell_and_bad_sets():
    from expertbits.tasks.errors import BudgetError

    g = league.Grid(budgets=(2.0, 2.5), bit_sets=((3, 4), (1, 2, 3)))
    assert g.heatmap_cell() == ("1,2,3", 2.5)
    with pytest.raises(BudgetError, match="non-empty"):
        league.Grid(bit_sets=((),)).configs()


def test_published_zoo_league_tables_render(tmp_path):
    """The README's cross-pair tables are rendered from the committed summaries: every pair has
    every allocator, the bold KL is the column's minimum, and the overall ranks cover each pair."""
    import re

    from expertbits.zoo import leagues

    docs = Path(leagues.__file__).parent / "results"
    pairs = sorted(p.parent.name for p in docs.glob("*/league_summary.parquet"))
    assert pairs == sorted(leagues.PAIRS)
    table = leagues.budget_table(docs, 2.5)
    for block in table.split("Bit-widths")[1:]:
        rows = [r.split(" | ")[1:] for r in block.splitlines() if r.startswith("| ") and "allocator" not in r]
        assert len(rows) == len(leagues.ORDER)
        for col in zip(*rows):
            kls = [float(re.sub(r"[*|]", "", c).split()[0]) for c in col]
            assert len(set(kls)) > 1  # Switch's 1e-4 KLs keep enough digits to tell allocators apart
            bold = [float(re.sub(r"[*|]", "", c).split()[0]) for c in col if c.startswith("**")]
            assert bold and all(b == min(kls) for b in bold)
    with pytest.raises(ValueError, match="no published league"):
        leagues.budget_table(docs, 9.0)
    overall = leagues.overall(docs)
    assert f"RTN, over {len(pairs)} pairs" in overall and "| pmq |" in overall
    assert "@" not in overall and "+sym" not in overall  # ranks compare the default variant only
    rows = {r.split("`")[1]: r.split(" | ")[1:] for r in leagues.servability_table(docs).splitlines() if r.startswith("| `")}
    assert set(rows) == {v for v, _ in leagues.SERVABILITY}
    for variant, cells in rows.items():
        measured = [c.strip(" |") != "–" for c in cells]
        # 2.5 bits is no width: uniform has no cell there; every other variant is measured on every pair
        assert measured == ([False] * len(pairs) + [True] * len(pairs) if variant.startswith("uniform")
                            else [True] * 2 * len(pairs)), (variant, cells)


def test_deepseek_v3_is_calibrated_with_its_own_router(tmp_path, texts):
    """Sigmoid scores + e_score_correction_bias + group-limited top-k, worked out here from the
    router's weights, must be what calibration counts (softmax top-k over W·x would not be)."""
    from support.archs import build
    from transformers import AutoConfig, AutoModelForCausalLM

    path = build("deepseek_v3", tmp_path / "ds")
    cfg = AutoConfig.from_pretrained(path)
    calib, qerr, info = calibrate.calibrate(path, texts[0], seq_len=64, windows=2, bit_widths=(2, 4), group_size=16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    router = model.model.layers[1].mlp.gate
    inputs = []
    handle = router.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, cfg.hidden_size)))
    from transformers import AutoTokenizer

    from expertbits.tasks.checkpoints.texts import token_windows

    with torch.no_grad():
        for w in token_windows(texts[0], AutoTokenizer.from_pretrained(path), 64, 2):
            model(w[None])
    handle.remove()
    x = torch.cat(inputs)
    scores = torch.sigmoid(x @ router.weight.T)
    choice = scores + router.e_score_correction_bias
    e, g = cfg.n_routed_experts, cfg.n_group
    group_score = choice.view(-1, g, e // g).topk(2, -1).values.sum(-1)
    allowed = torch.zeros_like(group_score).scatter_(1, group_score.topk(cfg.topk_group, -1).indices, 1.0)
    allowed = allowed.repeat_interleave(e // g, dim=1).bool()
    chosen = choice.masked_fill(~allowed, float("-inf")).topk(cfg.num_experts_per_tok, -1).indices
    want = chosen.flatten().bincount(minlength=e).double() / len(x)
    got = torch.tensor(calib[calib.layer == 1].sort_values("expert").frequency.tolist(), dtype=torch.float64)
    assert torch.allclose(got, want), (got, want)
    softmax_topk = (x @ router.weight.T).topk(cfg.num_experts_per_tok, -1).indices.flatten().bincount(minlength=e)
    assert not torch.allclose(got, softmax_topk.double() / len(x)), "the test cannot tell the two routers apart"
    assert sorted(calib.layer.unique()) == [1]  # layer 0 is dense (first_k_dense_replace)


def test_routed_input_error_is_the_expected_output_error_per_routed_token(micro_pair, texts, calibrated):
    """Σ_i h_i ‖ΔW[:, i]‖² with h from the tokens routed to the expert (not divided by all tokens),
    the down projection weighted by its own input (the hidden activation), checked from scratch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.tasks.checkpoints.texts import token_windows

    _, ft = micro_pair
    calib, qerr, _ = calibrated
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    layer, expert = 1, 2
    routed = []

    def grab(module, args):
        x, index = args[0], args[1]
        routed.append(x.reshape(-1, x.shape[-1])[(index == expert).any(-1)])
    handle = model.model.layers[layer].mlp.experts.register_forward_pre_hook(grab)
    with torch.no_grad():
        for w in token_windows(texts[0], AutoTokenizer.from_pretrained(ft), 64, 4):
            model(w[None])
    handle.remove()
    x = torch.cat(routed)
    with Checkpoint.open(ft) as c:
        mats = {m.role: c.read(m.key, m.index, m.rows).float() for m in detect(c).layers[layer].matrices if m.expert == expert}
    hidden = torch.nn.functional.silu(x @ mats["gate"].T) * (x @ mats["up"].T)
    want = 0.0
    for role, inp in (("gate", x), ("up", x), ("down", hidden)):
        d = (mats[role] - quantize_rtn(mats[role], 3, 32).dequantize()).square()
        want += float(d.sum(0) @ inp.square().mean(0))
    row = qerr[(qerr.layer == layer) & (qerr.expert == expert) & (qerr.bits == 3)].iloc[0]
    assert row.routed_input_error == pytest.approx(want, rel=1e-4)
    c = calib[(calib.layer == layer) & (calib.expert == expert)].iloc[0]
    assert c.routed_tokens == len(x)
    assert c.hessian_trace == pytest.approx(float(x.square().sum(1).mean()), rel=1e-5)
