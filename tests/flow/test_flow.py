"""The Prefect flow end to end on a tiny trained pair: artifacts, cache hits, S3, bad input."""

import json
import subprocess
import sys

import duckdb
import pytest
from support.flowruns import artifacts, task_states, text_of

from expertbits.tasks.store.storage import Store

pytestmark = pytest.mark.integration


def run(prefect_api, **kw):
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    state = quantize_moe(QuantizeParams(**kw), return_state=True)
    return state






def _verify_reports_what_differs(run_dir, tmp_path):
    """`expertbits verify` on the run: intact; then on a copy with one byte flipped, one file gone
    and one added, each named, exit status 1. Loading a copy whose packed shard changed is refused
    by name; the intact run loads."""
    import shutil

    from expertbits.flows.cli import main
    from expertbits.tasks.errors import CheckpointError
    from expertbits.tasks.model.load import load

    assert main(["verify", run_dir.name, "--store", str(run_dir.parent.parent)]) == 0
    load(run_dir / "quantization")
    shard = max((run_dir / "quantization").glob("*.safetensors"), key=lambda p: p.stat().st_size)
    edited = tmp_path / "edited" / "runs" / run_dir.name
    shutil.copytree(run_dir, edited)
    data = bytearray((edited / "quantization" / shard.name).read_bytes())
    data[-1] ^= 1  # a packed weight, not the header: only the hash can tell
    (edited / "quantization" / shard.name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"changed \\['{shard.name}'\\]"):
        load(edited / "quantization")
    copy = tmp_path / "tampered" / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    target = copy / "quantization" / "config.json"
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    (copy / "evaluation" / "evaluation.json").unlink()
    (copy / "notes.txt").write_text("planted")
    from expertbits.tasks.store.storage import Store
    from expertbits.tasks.store.verify import verify_run

    report = verify_run(Store(str(copy)))
    assert (report["changed"], report["missing"], report["extra"]) == (
        ["quantization/config.json"], ["evaluation/evaluation.json"], ["notes.txt"])
    assert main(["verify", str(copy)]) == 1
    for damaged in (b'{"files": []}', b"\xff\xfe", b"not json"):  # a damaged manifest: an error, not a traceback
        (copy / "manifest.json").write_bytes(damaged)
        assert main(["verify", str(copy)]) == 1


def test_flow_runs_then_caches_then_recomputes_only_what_changed(prefect_api, params, tmp_path):
    first = run(prefect_api, **params)
    manifest = first.result()
    run_dir = tmp_path / "store" / "runs" / manifest.run_id
    assert (run_dir / "manifest.json").is_file()
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert set(on_disk["files"]) >= {"statistics/expert_stats.parquet", "calibration/expert_calibration.parquet",
                                     "allocation/bit_allocation.parquet",
                                     "quantization/config.json", "validation/kernel_validation.parquet",
                                     "evaluation/evaluation.json", "expertbits.duckdb"}
    qc = json.loads((run_dir / "quantization" / "config.json").read_text())["quantization_config"]
    assert sorted(qc["expert_bits"]) == ["0", "1"] and all(len(v) == 4 for v in qc["expert_bits"].values())
    assert sum(sum(v) for v in qc["expert_bits"].values()) / 8 == 2.5
    con = duckdb.connect(str(run_dir / "expertbits.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM expert_stats").fetchone()[0] == 8
    assert con.execute("SELECT count(*) FROM expert_calibration").fetchone()[0] == 8
    assert con.execute("SELECT count(*) FROM kernel_validation WHERE passed").fetchone()[0] == 24
    # the fused kernel ran on both MoE layers with the model's routing, prefill and decode, every width of the layer
    fused = con.execute("SELECT layer, phase, passed, rel_error, widths, pairs FROM fused_validation ORDER BY ALL").fetchall()
    assert [(layer, phase) for layer, phase, *_ in fused] == [(0, "decode"), (0, "prefill"), (1, "decode"), (1, "prefill")]
    assert all(ok and err < 1e-5 and pairs > 0 for _, _, ok, err, _, pairs in fused)
    for *_, widths, _ in fused:  # 'bits:experts,...' of the 4 experts, from the shipped widths {2, 3}
        per = dict(map(int, w.split(":")) for w in widths.split(","))
        assert set(per) <= {2, 3} and sum(per.values()) == 4
    kl = con.execute("SELECT value FROM evaluation WHERE metric = 'kl'").fetchone()[0]
    con.close()
    assert 0 < kl < 1
    # the whole model's size against bf16, counted here from the files: the source's parameters, the shipped bytes
    import math
    from pathlib import Path

    from safetensors import safe_open

    count = 0
    for f in Path(params["checkpoint"]).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            count += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    shipped = sum(f.stat().st_size for f in (run_dir / "quantization").glob("*.safetensors"))
    q = manifest.summary["quantization"]
    assert q["model_parameters"] == count and q["bf16_bytes"] == 2 * count
    assert q["fraction_of_bf16"] == round(shipped / (2 * count), 6) < 1
    assert q["model_bits_per_parameter"] == round(8 * shipped / count, 6) > q["effective_bits"]
    _verify_reports_what_differs(run_dir, tmp_path)
    # the public API's quantize, without Prefect, writes the folder the flow published, byte for byte
    import expertbits
    from support.flowruns import sha256s

    from expertbits.tasks.store.tables import read_stats

    alloc = read_stats(run_dir / "allocation" / "bit_allocation.parquet")
    expertbits.quantize(params["checkpoint"], alloc, tmp_path / "api", group_size=32, quantizer=params["quantizer"])
    shipped = sha256s(run_dir / "quantization")
    del shipped["README.md"]  # the model card: the run's, written when it is published
    assert sha256s(tmp_path / "api") == shipped

    states = task_states(first)
    # the download and the per-layer statistics (functions of the checkpoints alone, kept in no
    # store) may be hits from an earlier test of the session on the same pair
    shared = {"download", "statistics-layers"}
    assert all(s == "Completed" for k, s in states.items() if k not in shared), {
        k: s for k, s in states.items() if s != "Completed"}
    kinds = artifacts(first)
    assert {"table", "markdown", "progress"} <= {t for t, _ in kinds}
    assert any(k and k.startswith("bit-allocation-") for t, k in kinds if t == "table")
    assert any(k and k.startswith("quant-eval-") for t, k in kinds if t == "markdown")

    # --device cpu is what the default (auto) means on a CPU-only host: the same keys, so the same
    # objects and run, byte for byte (the fourth run below recomputes under cpu and compares bytes)
    cpu_only = not __import__("torch").cuda.is_available()
    second = run(prefect_api, **dict(params, device="cpu" if cpu_only else "auto"))
    assert second.result().run_id == manifest.run_id
    states = task_states(second)
    cached = {k for k, v in states.items() if v == "Cached"}
    assert cached == {"download", "statistics-layers", "statistics", "routing", "calibration-layers", "calibration",
                      "allocation", "quantization-layers", "quantization", "validation-layers", "kernel-validation",
                      "evaluation"}, states

    third = run(prefect_api, **dict(params, avg_bits=2.75))
    states = task_states(third)
    assert {k for k, v in states.items() if v == "Cached"} == {"download", "statistics-layers", "statistics", "routing",
                                                               "calibration-layers", "calibration"}, states
    assert third.result().run_id != manifest.run_id
    assert_catalog(Store(params["store"]), {manifest.run_id: 2.5, third.result().run_id: 2.75}, params["checkpoint"])

    # a cache whose objects left the store is a miss, not a pointer at nothing
    import shutil

    shutil.rmtree(tmp_path / "store" / "objects")
    shutil.rmtree(run_dir)
    fourth = run(prefect_api, **dict(params, device="cpu" if cpu_only else "auto"))
    states = task_states(fourth)
    # per-layer results that are numbers stay cached; quantized shards that left the store are rewritten
    assert {k for k, v in states.items() if v == "Cached"} == {
        "download", "statistics-layers", "calibration-layers", "validation-layers"}, states
    # deterministic: the same bytes again (DuckDB's own file format is not byte-reproducible; its tables are)
    again = fourth.result().files
    assert {k: v for k, v in again.items() if k != "expertbits.duckdb"} == {
        k: v for k, v in manifest.files.items() if k != "expertbits.duckdb"}


def test_flow_on_s3_store(prefect_api, params, s3):
    fs, options = s3
    fs.put(params["checkpoint"] + "/", f"{fs.bucket}/in/ft/", recursive=True)
    # the paper's allocator needs no calibration stage: none runs, none is published
    manifest = run(prefect_api, **dict(params, checkpoint=f"s3://{fs.bucket}/in/ft", store=f"s3://{fs.bucket}/store",
                                       storage_options=options, allocator="paper")).result()
    assert manifest.uri == f"s3://{fs.bucket}/store/runs/{manifest.run_id}"
    keys = {k.split(f"runs/{manifest.run_id}/", 1)[1] for k in fs.find(f"{fs.bucket}/store/runs/{manifest.run_id}")}
    assert keys == set(manifest.files) | {"manifest.json"}
    assert not any(k.startswith("calibration/") for k in keys) and manifest.summary["allocation"]["allocator"] == "paper"
    fs.copy(f"{fs.bucket}/store/runs/{manifest.run_id}/allocation/bit_allocation.parquet",
            f"{fs.bucket}/store/runs/half-written/allocation/bit_allocation.parquet")
    assert_catalog(Store(f"s3://{fs.bucket}/store", options), {manifest.run_id: 2.5}, f"s3://{fs.bucket}/in/ft")
    from expertbits.tasks.store.verify import verify_run

    store = Store(f"s3://{fs.bucket}/store", options)
    assert verify_run(store, f"runs/{manifest.run_id}")["ok"]  # every byte read back from S3 and re-hashed
    fs.pipe(f"{fs.bucket}/store/runs/{manifest.run_id}/evaluation/evaluation.json", b"{}")
    store.fs.invalidate_cache()
    assert verify_run(store, f"runs/{manifest.run_id}")["changed"] == ["evaluation/evaluation.json"]


def assert_catalog(store, runs: dict[str, float], checkpoint: str) -> None:
    """`expertbits runs` and the README's SQL list exactly the published runs (a prefix without a
    manifest is not one) with what they were asked for and what they measured."""
    from expertbits.tasks.store import catalog

    listed = catalog.list_runs(store)
    assert dict(zip(listed.run_id, listed.avg_bits)) == runs
    assert (listed.checkpoint == checkpoint).all() and listed.digest.str.len().eq(64).all()
    assert listed.created.notna().all() and listed.kl.between(0, 1).all()
    kl = catalog.query(store, "KL against bits across runs")
    assert dict(zip(kl.run_id, kl.kl)) == pytest.approx(dict(zip(listed.run_id, listed.kl)))
    allocs = catalog.query(store, "every allocation of a checkpoint", checkpoint=checkpoint)
    assert allocs.groupby("run_id").bits.mean().to_dict() == pytest.approx(runs)
    assert allocs.groupby("run_id").size().eq(8).all()  # 2 layers × 4 experts, no rows of other runs


def test_bad_input_fails_clearly_and_leaves_no_run(prefect_api, params, copy_ckpt, tmp_path):
    from expertbits.tasks.errors import CheckpointError

    bad = copy_ckpt(params["checkpoint"], "truncated")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    state = run(prefect_api, **dict(params, checkpoint=str(bad)))
    assert state.is_failed()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        state.result()
    assert not (tmp_path / "store" / "runs").exists()


def test_nan_in_an_expert_fails_quantization_without_a_run(prefect_api, params, copy_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_ckpt(params["checkpoint"], "nan")
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.block_sparse_moe.experts.2.w2.weight"][0, 0] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    state = run(prefect_api, **dict(params, checkpoint=str(bad)))
    assert state.is_failed() and "NaN" in str(state.message) + repr(state.result(raise_on_failure=False))
    assert not (tmp_path / "store" / "runs").exists()
    assert not list((tmp_path / "store" / "objects").glob("quantization/*"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a CPU-only host")
def test_a_device_the_machine_lacks_fails_the_flow_first_and_leaves_nothing(prefect_api, params, tmp_path):
    from expertbits.tasks.errors import ExpertbitsError

    state = run(prefect_api, **dict(params, device="cuda:1"))
    assert state.is_failed()
    with pytest.raises(ExpertbitsError, match=r"--device cuda:1: this machine has no CUDA device") as e:
        state.result()
    assert "--device cpu" in e.value.fix
    assert not (tmp_path / "store" / "objects").exists() and not (tmp_path / "store" / "runs").exists()


def test_budget_outside_the_bit_widths_is_refused_before_any_work():
    from pydantic import ValidationError

    from expertbits.flows.params import QuantizeParams

    with pytest.raises(ValidationError, match="outside the available bit-widths"):
        QuantizeParams(avg_bits=4.5, bit_widths=[2, 3, 4])


def test_unreachable_store_fails_the_flow_first(prefect_api, params, s3_endpoint):
    state = run(prefect_api, **dict(params, store="s3://missing-bucket/x", storage_options={"endpoint_url": s3_endpoint}))
    assert state.is_failed()
    assert "unreachable" in repr(state.result(raise_on_failure=False))


def test_cli_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "quantize", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--checkpoint", "--reference", "--avg-bits", "--bit-widths", "--group-size", "--zeta", "--store",
                "--storage-option", "--eval-text", "--eval-windows", "--eval-seq-len", "--validation-rtol", "--cache-dir",
                "--device", "--dask"):
        assert opt in out
    assert "local-cuda" in out and "cuda:N" in out
    bad = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "quantize", "--device", "gpu"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--device: 'gpu' is not a device: give auto, cpu, cuda or cuda:N" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "expertbits.flows.cli", "quantize", "--avg-bits", "9"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--avg-bits: got 9.0" in bad.stderr and "fix: give at most 8" in bad.stderr


def test_only_io_errors_are_retried():
    from prefect.states import Failed

    from expertbits.tasks.errors import CheckpointError
    from expertbits.tasks.stages.stage_io import transient as _transient

    assert _transient(None, None, Failed(data=ConnectionResetError("peer reset")))
    assert _transient(None, None, Failed(data=TimeoutError("slow")))
    assert not _transient(None, None, Failed(data=CheckpointError("truncated", "re-download")))
    assert not _transient(None, None, Failed(data=RuntimeError("bug")))


def test_readme_command_quantizes_the_bundled_model(tmp_path):
    """`expertbits quantize` with no options, as the README's first command runs it."""
    import os

    # a fresh shell: no Prefect API, and no TRITON_INTERPRET (expertbits must choose the
    # interpreter itself before transformers imports triton)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API") and k != "TRITON_INTERPRET"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh ephemeral API, as on a new machine
    env.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    out = subprocess.run(["expertbits", "quantize"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "expertbits-store" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "manifest.json").is_file()
    manifest = json.loads((runs[0] / "manifest.json").read_text())
    assert manifest["summary"]["parameters"]["checkpoint"] == "zoo://mixtral-tiny/wordnet"
    # no default reference: the bundled fine-tune's model card declares its base
    assert manifest["summary"]["parameters"]["reference"] is None
    assert manifest["summary"]["reference"]["uri"] == "zoo://mixtral-tiny/base"
    assert manifest["summary"]["statistics"]["lambda_source"] == "norm-change"
    assert "Λ: router-norm change against zoo://mixtral-tiny/base (declared in README.md)" in out.stdout
    assert manifest["summary"]["allocation"]["achieved_avg_bits"] == 2.5
    # the default quantizer is GPTQ here (auto): on a CPU the run says up front how long it will take
    assert "GPTQ on this CPU: about" in out.stdout + out.stderr
    assert manifest["summary"]["parameters"]["quantizer"] == "gptq" and manifest["summary"]["parameters"]["rotate"]
    assert f"artifacts: {tmp_path / 'expertbits-store' / 'runs' / runs[0].name}" in out.stdout
    q = manifest["summary"]["quantization"]  # the line the README shows, from the run's own figures
    assert (f"size: {q['bytes'] / 1e6:.2f} MB, {100 * q['fraction_of_bf16']:.1f}% of bf16, "
            f"{q['model_bits_per_parameter']:.2f} bits per parameter over the whole model "
            f"({q['effective_bits']:.2f} in the routed experts; dense layers as stored)") in out.stdout
    if not __import__("torch").cuda.is_available():
        assert "evaluated on cpu (float32)" in out.stdout
    _card_and_lm_eval(runs[0], manifest, env, tmp_path)


def _card_and_lm_eval(run_dir, manifest, env, tmp_path):
    """The default run's folder carries its model card (hub front matter, listed in the manifest);
    `expertbits evaluate` publishes the run again with lm-eval's results, whose supersense accuracy
    is the project's own scorer's on the same examples, for both models."""
    import duckdb
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.tasks.model.load import load
    from expertbits.zoo import resolve
    from expertbits.zoo.cards import supersense_accuracy

    card = ModelCard.load(run_dir / "quantization" / "README.md")  # huggingface_hub's own parser
    meta = card.data.to_dict()
    assert "base_model" not in meta and meta["library_name"] == "expertbits"  # a zoo model is not a hub model
    assert "`zoo://mixtral-tiny/wordnet` with every routed expert at its own bit-width" in card.text
    assert {"moe", "quantized", "2-bit", "3-bit", "4-bit", "mixtral"} <= set(meta["tags"])
    assert "quantization/README.md" in manifest["files"]
    layer_rows = [line for line in card.text.splitlines() if line.startswith("| 0 | 8 |")]
    bits = json.loads((run_dir / "quantization" / "config.json").read_text())["quantization_config"]["expert_bits"]["0"]
    assert layer_rows == [f"| 0 | 8 | {bits.count(2)} | {bits.count(3)} | {bits.count(4)} | {sum(bits) / 8:.3f} |"]
    assert f"| KL(fp ‖ quantized) per token | {manifest['summary']['evaluation']['kl']:.5f} |" in card.text

    out = subprocess.run(["expertbits", "evaluate", run_dir.name, "--tasks", "expertbits_supersense", "--limit", "40"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    new = [r for r in run_dir.parent.iterdir() if r.name != run_dir.name]
    assert len(new) == 1 and f"artifacts: {new[0]}" in out.stdout
    assert subprocess.run(["expertbits", "verify", str(run_dir)], env=env).returncode == 0  # the first run is as it was
    con = duckdb.connect(str(new[0] / "expertbits.duckdb"), read_only=True)
    (fp_acc, q_acc, samples), = con.execute(
        "SELECT fp, quant, samples FROM lm_eval WHERE task = 'expertbits_supersense' AND metric = 'acc'").fetchall()
    assert samples == 40
    fp = resolve("zoo://mixtral-tiny/wordnet")
    q_model, tok = load(new[0] / "quantization")
    with torch.no_grad():
        assert q_acc == supersense_accuracy(q_model, tok, limit=40)
        assert fp_acc == supersense_accuracy(AutoModelForCausalLM.from_pretrained(fp, dtype=torch.float32).eval(),
                                             AutoTokenizer.from_pretrained(fp), limit=40)
    assert "### lm-evaluation-harness" in (new[0] / "quantization" / "README.md").read_text()
    assert "| expertbits_supersense | acc |" in out.stdout


def test_credentials_in_storage_options_are_refused_with_the_fix():
    from pydantic import ValidationError

    from expertbits.flows.params import LeagueParams, QuantizeParams, WatchParams

    for options in ({"key": "AKIA"}, {"secret": "s"}, {"client_kwargs": {"aws_secret_access_key": "s"}}, {"token": "t"}):
        for model, extra in ((QuantizeParams, {}), (LeagueParams, {}), (WatchParams, {"prefixes": ["s3://b/in"]})):
            with pytest.raises(ValidationError, match="worker's environment"):
                model(storage_options=options, **extra)
    assert QuantizeParams(storage_options={"endpoint_url": "http://127.0.0.1:9000"}).storage_options


def test_a_store_path_with_a_quote_works_end_to_end(prefect_api, params, tmp_path):
    """Paths reach DuckDB as parameters, never as SQL text: a quote in the store path neither
    breaks the run's database nor the catalog's queries."""
    store = tmp_path / "it's a store"
    manifest = run(prefect_api, **dict(params, store=str(store), allocator="paper")).result()
    con = duckdb.connect(str(store / "runs" / manifest.run_id / "expertbits.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM bit_allocation").fetchone()[0] == 8
    finally:
        con.close()
    assert_catalog(Store(str(store)), {manifest.run_id: 2.5}, params["checkpoint"])




def test_a_planted_secret_reaches_no_store_file_table_parameter_log_or_artifact(prefect_api, params, s3, tmp_path,
                                                                                 monkeypatch, caplog):
    """A secret in the worker's environment (where credentials belong) appears nowhere the run
    writes: every object of the S3 store (manifests, parquet, the run's DuckDB tables, the model),
    and the Prefect database (parameters, logs, artifacts, events, states). In storage_options it is
    refused before anything runs."""
    import uuid
    from pathlib import Path

    from prefect.settings import get_current_settings
    from pydantic import ValidationError

    from expertbits.flows.params import QuantizeParams

    fs, options = s3
    secret = f"planted-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    fs.put(params["checkpoint"] + "/", f"{fs.bucket}/in/ft/", recursive=True)
    state = run(prefect_api, **dict(params, checkpoint=f"s3://{fs.bucket}/in/ft", store=f"s3://{fs.bucket}/store",
                                    storage_options=options))
    manifest = state.result()
    task_states(state)  # every task state has reached the API
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # and every log line
    EventsWorker.drain_all(timeout=30)  # and every event
    fs.invalidate_cache()
    control = f"{fs.bucket}/in/ft"  # the checkpoint URI: a value the run does write, to show the scan sees values
    scanned, found = 0, False
    for key in fs.find(f"{fs.bucket}/store"):
        text = text_of(key, fs.cat(key), tmp_path)
        assert secret not in text, key
        scanned, found = scanned + 1, found or control in text
    assert scanned > 20 and found and manifest.run_id
    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(url.split(":///", 1)[1])
    files = [f for f in db.parent.glob(db.name + "*") if f.is_file()]  # the database and its WAL
    assert not any(secret.encode() in f.read_bytes() for f in files)
    assert any(control.encode() in f.read_bytes() for f in files)  # parameters are in what was scanned
    assert any(b"run published: " in f.read_bytes() for f in files)  # and so are log lines
    assert secret not in caplog.text
    with pytest.raises(ValidationError, match="must not carry credentials"):
        QuantizeParams(**dict(params, storage_options={**options, "secret": secret}))
