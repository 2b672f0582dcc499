"""The public API at the package root: the steps on local folders, without Prefect."""

import subprocess
import sys

import pytest


def test_steps_run_without_prefect_and_the_model_loads(micro_pair, tmp_path):
    """In a fresh interpreter: every step on the tiny pair, then load and generate; Prefect is
    never imported, and importing expertbits alone imports neither torch nor Prefect."""
    base, ft = micro_pair
    code = f"""
import sys
import expertbits
assert "torch" not in sys.modules and "prefect" not in sys.modules
from expertbits.zoo import text_path
text = text_path("code-heldout").read_text()
stats = expertbits.statistics({str(ft)!r}, reference={str(base)!r})
assert len(stats) == 8 and stats.lambda_source.eq("norm-change").all(), stats.lambda_source.unique()
calib = expertbits.calibrate({str(ft)!r}, text, bit_widths=(2, 3), group_size=32, seq_len=64, windows=4)
assert len(calib.routing) == 8 and len(calib.errors) == 16
assert calib.errors.output_error.notna().all()  # GPTQ's, the default quantizer, as the flow's
alloc = expertbits.allocate(stats, calibration=calib, avg_bits=2.5, bit_widths=(2, 3))
assert alloc.bits.mean() == 2.5 and set(alloc.bits) == {{2, 3}}
assert alloc.reason.str.startswith("output-error").all()  # auto: output-error for GPTQ's errors
summary = expertbits.quantize({str(ft)!r}, alloc, {str(tmp_path / "q")!r}, group_size=32, text=text, seq_len=64,
                              windows=4)
import json
assert json.loads(open({str(tmp_path / "q" / "config.json")!r}).read())["quantization_config"]["quantizer"]["rotate"]
metrics = expertbits.evaluate({str(ft)!r}, {str(tmp_path / "q")!r}, text, seq_len=64, windows=4)
assert 0 < metrics["kl"] < 1, metrics
model, tokenizer = expertbits.load({str(tmp_path / "q")!r})
ids = tokenizer("def f(x):", return_tensors="pt").input_ids
assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
assert "prefect" not in sys.modules, "a step imported Prefect"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_steps_refuse_bad_input_clearly(micro_pair, tmp_path):
    """Errors in the API's own words, and a quantization that fails leaves no folder behind."""
    import expertbits
    from expertbits.tasks.errors import BudgetError, CheckpointError, ExpertbitsError

    base, ft = micro_pair
    with pytest.raises(CheckpointError, match="no config.json"):
        expertbits.statistics(tmp_path)
    stats = expertbits.statistics(ft)
    with pytest.raises(BudgetError, match="unknown allocator"):
        expertbits.allocate(stats, allocator="nope")
    with pytest.raises(BudgetError, match=r"(?s)reads routing and quantization error.*expertbits\.calibrate"):
        expertbits.allocate(stats)  # auto (routed-error without GPTQ's errors), without a calibration
    alloc = expertbits.allocate(stats, allocator="paper", bit_widths=(2, 3))
    with pytest.raises(ExpertbitsError, match="GPTQ needs calibration text"):
        expertbits.quantize(ft, alloc, tmp_path / "q", quantizer="gptq")
    with pytest.raises(ExpertbitsError, match="unknown quantizer options"):
        expertbits.quantize(ft, alloc, tmp_path / "q", clipping=True)
    with pytest.raises(ValueError, match="1-bit"):  # fails while writing: nothing is left behind
        expertbits.quantize(ft, expertbits.allocate(stats, allocator="paper", bit_widths=(1, 2), avg_bits=1.5),
                            tmp_path / "q", quantizer="rtn", symmetric=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExpertbitsError, match="already exists"):
        expertbits.quantize(ft, alloc, tmp_path / "taken")


def test_the_steps_defaults_are_the_flows():
    """The steps' defaults are written in their signatures (importing expertbits stays cheap), so a
    test keeps them equal to `expertbits quantize`'s."""
    import inspect

    import expertbits
    from expertbits.flows.params import QuantizeParams
    from expertbits.tasks.quantization.method import QuantizerConfig

    flow = {n: f.get_default(call_default_factory=True) for n, f in QuantizeParams.model_fields.items()}
    steps = {n: {k: p.default for k, p in inspect.signature(getattr(expertbits, n)).parameters.items()}
             for n in ("calibrate", "allocate", "quantize", "evaluate")}
    assert tuple(flow["bit_widths"]) == steps["calibrate"]["bit_widths"] == steps["allocate"]["bit_widths"]
    assert flow["group_size"] == steps["calibrate"]["group_size"] == steps["quantize"]["group_size"]
    assert flow["eval_seq_len"] == steps["calibrate"]["seq_len"] == steps["quantize"]["seq_len"] == steps["evaluate"]["seq_len"]
    assert flow["calibration_windows"] == steps["calibrate"]["windows"] == steps["quantize"]["windows"]
    assert flow["eval_windows"] == steps["evaluate"]["windows"]
    assert (flow["avg_bits"], flow["allocator"]) == (steps["allocate"]["avg_bits"], steps["allocate"]["allocator"])
    # the flow's auto is GPTQ for every decoder-only model, the steps' default (Switch gets RTN there)
    chosen = QuantizeParams().for_checkpoint(encoder_decoder=False)
    assert flow["quantizer"] == "auto" and chosen.quantizer == steps["calibrate"]["quantizer"] == steps["quantize"]["quantizer"]
    assert QuantizeParams().for_checkpoint(encoder_decoder=True).quantizer == "rtn"
    # the quantizer options a step takes are QuantizerConfig's, whose defaults the flow's fields repeat
    q = QuantizerConfig()
    assert (flow["symmetric"], flow["clip"], flow["gptq_damp"], flow["gptq_act_order"], flow["gptq_min_tokens"],
            flow["gptq_weighted"]) == (q.symmetric, q.clip, q.damp, q.act_order, q.min_tokens, q.weighted)
    # and the choices the flow makes by quantizer (rotation), the steps make alike
    from expertbits import _quantizer

    for method in ("gptq", "rtn"):
        assert _quantizer(method, {}).rotate == QuantizeParams(quantizer=method).rotate
    assert steps["allocate"]["allocator"] == "auto"
