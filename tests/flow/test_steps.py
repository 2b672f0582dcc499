"""The public API's steps, without Prefect, compute what the flow publishes, byte for byte."""

import json

import pandas as pd
import pytest
from support.flowruns import sha256s

from expertbits.zoo import read_text

pytestmark = pytest.mark.integration


def test_steps_give_the_flows_tables_and_folder(prefect_api, params, tmp_path):
    """GPTQ, whose folder depends on every step before it (the RTN folder is compared in
    test_flow.py, on that file's run)."""
    quantizer = "gptq"
    import expertbits
    from expertbits.tasks.store.tables import read_stats
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    manifest = quantize_moe(QuantizeParams(**dict(params, quantizer=quantizer)))
    run_dir = tmp_path / "store" / "runs" / manifest.run_id
    calibration_text = read_text("zoo://text/wordnet-supersense-train")  # the flow's default
    eval_text = (tmp_path / "heldout.txt").read_text()
    ft, base = params["checkpoint"], params["reference"]

    stats = expertbits.statistics(ft, reference=base)
    pd.testing.assert_frame_equal(stats, read_stats(run_dir / "statistics" / "expert_stats.parquet"))
    # the flow's defaults for GPTQ (flows/params.py): rotated, output-error over one model-wide budget
    assert manifest.summary["parameters"]["allocator"] == "output-error" and manifest.summary["parameters"]["rotate"]
    calib = expertbits.calibrate(ft, calibration_text, bit_widths=(2, 3), group_size=32, quantizer=quantizer,
                                 seq_len=64, rotate=True)
    published = read_stats(run_dir / "calibration" / "expert_calibration.parquet")
    pd.testing.assert_frame_equal(calib.routing, published)
    errors = read_stats(run_dir / "calibration" / "expert_qerror.parquet").sort_values(["layer", "expert", "bits"])
    pd.testing.assert_frame_equal(calib.errors.sort_values(["layer", "expert", "bits"]).reset_index(drop=True),
                                  errors.reset_index(drop=True), check_like=True)
    alloc = expertbits.allocate(stats, calibration=calib, avg_bits=2.5, bit_widths=(2, 3), allocator="output-error",
                                scope="model")
    pd.testing.assert_frame_equal(alloc, read_stats(run_dir / "allocation" / "bit_allocation.parquet"))

    out = tmp_path / "mine"
    summary = expertbits.quantize(ft, alloc, out, group_size=32, quantizer=quantizer, text=calibration_text, seq_len=64,
                                  rotate=True)
    assert summary["avg_bits"] == pytest.approx(2.5)
    shipped = sha256s(run_dir / "quantization")
    assert "README.md" in shipped  # the model card: the run's, written when it is published
    del shipped["README.md"]
    assert sha256s(out) == shipped  # every shard, config.json, the index, the tokenizer

    metrics = expertbits.evaluate(ft, out, eval_text, seq_len=64, windows=4)
    published = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert {k: metrics[k] for k in ("kl", "ppl_fp", "ppl_quant", "tokens")} == {
        k: published[k] for k in ("kl", "ppl_fp", "ppl_quant", "tokens")}
