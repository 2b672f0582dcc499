"""--lm-eval-tasks: the optional lm-eval stage of the quantize flow, end to end on the tiny pair."""

import json
import re
from pathlib import Path

import duckdb
import pytest
from support.flowruns import artifacts, task_states

pytestmark = pytest.mark.integration


def test_the_lm_eval_stage_publishes_its_table_card_and_artifact_and_is_cached(prefect_api, params, tmp_path, capsys):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    # the user's own task over a local text file, beside a zoo task
    (tmp_path / "mine").mkdir()
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("def f(x):\n    return x\n", "import os\n")))
    (tmp_path / "mine" / "docs.yaml").write_text(
        f"task: my_code_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n")
    p = dict(params, lm_eval_tasks=["expertbits_ppl_code", "my_code_ppl"], lm_eval_limit=2,
             lm_eval_include_path=str(tmp_path / "mine"))
    first = quantize_moe(QuantizeParams(**p), return_state=True)
    manifest = first.result()
    run_dir = Path(manifest.uri)
    assert {"lm-eval/lm_eval.parquet", "lm-eval/lm_eval.json", "quantization/README.md"} <= set(manifest.files)
    con = duckdb.connect(str(run_dir / "expertbits.duckdb"), read_only=True)
    rows = con.execute("SELECT task, metric, fp, quant, diff, samples FROM lm_eval ORDER BY task, metric").fetchall()
    con.close()
    assert [(t, m) for t, m, *_ in rows] == [
        ("expertbits_ppl_code", "bits_per_byte"), ("expertbits_ppl_code", "byte_perplexity"),
        ("expertbits_ppl_code", "word_perplexity"), ("my_code_ppl", "bits_per_byte")]
    assert all(fp != q and d == pytest.approx(q - fp) for _, _, fp, q, d, _ in rows)
    assert [n for *_, n in rows] == [2, 2, 2, 2]
    assert "| my_code_ppl | bits_per_byte |" in (run_dir / "quantization" / "README.md").read_text()
    slug = re.sub(r"[^a-z0-9]+", "-", manifest.run_id.lower()).strip("-")
    assert ("markdown", f"lm-eval-{slug}"[:100]) in artifacts(first)

    again = quantize_moe(QuantizeParams(**p), return_state=True)
    assert again.result().run_id == manifest.run_id
    assert task_states(again)["lm-eval"] == "Cached"
    # the run without lm-eval is another run; its stages are the same cache entries
    plain = quantize_moe(QuantizeParams(**params), return_state=True).result()
    assert plain.run_id != manifest.run_id and "lm-eval" not in plain.stages
    assert {s: k for s, k in manifest.stages.items() if s != "lm-eval"} == plain.stages

    # `expertbits evaluate` on the plain run: the same parameters plus the lm-eval options, every
    # stage reused, so the run it publishes is the one above
    from expertbits.flows.cli import main

    store = params["store"]
    ask = ["evaluate", plain.run_id, "--store", store, "--tasks", "expertbits_ppl_code,my_code_ppl", "--limit", "2",
           "--include-path", str(tmp_path / "mine")]
    assert main(ask) == 0
    assert f"artifacts: {run_dir}" in capsys.readouterr().out
    # an evaluated run evaluated again with other tasks: its lm-eval stage is the one redone
    assert main(["evaluate", manifest.run_id, "--store", store, "--tasks", "expertbits_ppl_code", "--limit", "1"]) == 0
    assert "rebuilt" not in capsys.readouterr().err
    # a run whose model would not be reused (here: its manifest names another quantization) is said to be
    # rebuilt; one whose evaluation alone differs is the same model, and said so
    recorded = Path(store) / "runs" / plain.run_id / "manifest.json"
    edited = json.loads(recorded.read_text())
    edited["stages"]["evaluation"] = "0" * 32
    recorded.write_text(json.dumps(edited))
    assert main(ask) == 0
    assert f"note: the same quantized model as run {plain.run_id}; its evaluation stage was computed again" \
        in capsys.readouterr().out
    edited["stages"]["quantization"] = "0" * 32
    recorded.write_text(json.dumps(edited))
    assert main(ask) == 1
    assert f"was rebuilt, not reused: its quantized model differs from run {plain.run_id}'s" in capsys.readouterr().err


def test_an_unknown_lm_eval_task_fails_the_run_before_any_work(prefect_api, params, tmp_path):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    state = quantize_moe(QuantizeParams(**params, lm_eval_tasks=["no_such_task"]), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValueError, match=r"lm-eval task 'no_such_task': not among"):
        state.result()
    states = task_states(state, last="check-lm-eval")
    assert states["check-lm-eval"] == "Failed" and "statistics" not in states and "download" not in states
    assert not (tmp_path / "store" / "runs").exists()
