"""Prefect task wrappers around the stage functions: caching, retries, progress, store I/O.

Each stage's cache key is the sha256 of its input digests, its configuration and the source of
the code it runs, never a run id, so a rerun with the same inputs is all cache hits and changing
only the budget recomputes only allocation onward. A key whose objects are missing from the store
(or whose checkpoint left the local cache) is treated as a miss, so a cache never points at
nothing. Stage outputs are written to `objects/<stage>/<key>/` and `_stage.json` last.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from . import adapters, allocate, download, evaluate, publish, quantize, quantized, statistics, validate
from . import checkpoint as checkpoint_io
from .checkpoint import Checkpoint
from .errors import ExpertbitsError, ValidationFailed
from .records import CheckpointRecord, RunManifest, StageOutput
from .storage import Store, open_fs, sha256_file

STAGE_CODE = {
    "download": (download, checkpoint_io),
    "statistics": (statistics, adapters, checkpoint_io),
    "allocation": (allocate, "expertbits.tasks.allocators"),
    "quantization": (quantize, adapters, checkpoint_io, "expertbits.kernels.packing"),
    "validation": (validate, quantized, "expertbits.kernels.packing", "expertbits.kernels.dequant_matmul",
                   "expertbits.kernels.dequant_matmul_triton"),
    "evaluation": (evaluate, "expertbits.tasks.loader", "expertbits.tasks.quantize", "expertbits.tasks.seq2seq",
                   "expertbits.kernels.packing", "expertbits.kernels.modules", "expertbits.kernels.dequant_matmul",
                   "expertbits.kernels.dequant_matmul_triton"),
}


@lru_cache
def code_version(stage: str) -> str:
    import importlib
    import sys

    h = hashlib.sha256()
    for mod in (*STAGE_CODE[stage], sys.modules[__name__]):
        mod = importlib.import_module(mod) if isinstance(mod, str) else mod
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def stage_key(stage: str, *parts: Any) -> str:
    blob = json.dumps([stage, code_version(stage), parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _transient(task, task_run, state) -> bool:
    """Retry I/O errors only; bad input and numerics fail at once."""
    try:
        state.result()
    except ExpertbitsError:
        return False
    except (OSError, TimeoutError, ConnectionError):
        return True
    except Exception:
        return False
    return False


def _progress(stage: str):
    """A callback that moves a progress artifact on the flow run and logs at each quarter."""
    logger = get_run_logger()
    artifact = create_progress_artifact(progress=0.0, description=f"{stage} progress")
    logged = [0.0]

    def report(fraction: float, message: str) -> None:
        update_progress_artifact(artifact_id=artifact, progress=round(100 * fraction, 1))
        if fraction >= min(1.0, logged[0] + 0.25):
            logged[0] = fraction
            logger.info(message)

    return report


def _miss_unless(ctx, store: Store, stage: str, key: str) -> str:
    """The key, unless Prefect holds a record for it whose objects left the store: then a one-off miss."""
    record = ctx.result_store is not None and ctx.result_store.exists(key)
    if record and not store.exists(f"objects/{stage}/{key}/_stage.json"):
        return f"{key}-rebuild-{uuid.uuid4().hex}"
    return key


def _publish_stage(store: Store, stage: str, key: str, local: Path, summary: dict) -> StageOutput:
    """Upload a local folder as the stage's objects, `_stage.json` last."""
    prefix = f"objects/{stage}/{key}"
    files = {p.relative_to(local).as_posix(): sha256_file(p) for p in sorted(local.rglob("*")) if p.is_file()}
    with store.staging(prefix):
        store.remove(prefix)
        for rel in files:
            store.put_file(local / rel, f"{prefix}/{rel}")
        out = StageOutput(stage=stage, key=key, prefix=prefix, files=files, summary=summary)
        store.write_bytes(f"{prefix}/_stage.json", out.model_dump_json(indent=2).encode())
    return out


def _local(store: Store, out: StageOutput, tmp: Path) -> Path:
    """A local folder with the stage's files: the store folder itself when the store is local."""
    if store.is_local:
        return Path(store.uri(out.prefix))
    for rel in out.files:
        store.get_file(f"{out.prefix}/{rel}", tmp / out.stage / rel)
    return tmp / out.stage


def _ckpt_path(rec: CheckpointRecord, cache_dir: str | None, storage_options: dict) -> Path:
    return download.ensure_local(rec.uri, rec.digest, cache_dir, storage_options)


# ---- 0. preflight -------------------------------------------------------------------------------

@task(name="check-store")
def check_store(root: str, storage_options: dict) -> str:
    """Fail fast, before any work, if the artifact store cannot be written."""
    Store(root, storage_options).check_reachable()
    return root


# ---- 1. download --------------------------------------------------------------------------------

def _download_key(ctx, p) -> str:
    # A record whose cache folder was cleared since is still valid: consumers refetch by digest.
    return stage_key("download", download.fingerprint(p["uri"], p["storage_options"]), p["cache_dir"])


@task(name="download", cache_key_fn=_download_key, persist_result=True, result_serializer="json",
      retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_transient)
def fetch_checkpoint(uri: str, cache_dir: str | None, storage_options: dict) -> CheckpointRecord:
    """Fetch a checkpoint into the content-addressed local cache and verify its sha256."""
    logger = get_run_logger()
    ckpt = download.download(uri, cache_dir, storage_options)
    with Checkpoint.open(ckpt.path):  # header check: a truncated file fails here, by name
        pass
    cache = Path(cache_dir or download.default_cache_dir())
    fp = download.fingerprint(uri, storage_options)
    (cache / "index").mkdir(parents=True, exist_ok=True)
    (cache / "index" / f"{fp}.json").write_text(json.dumps({"uri": uri, "digest": ckpt.digest}))
    logger.info(f"{uri} -> {ckpt.path} (sha256 {ckpt.digest[:12]})")
    return CheckpointRecord(uri=uri, digest=ckpt.digest, path=str(ckpt.path))


# ---- 2. statistics ------------------------------------------------------------------------------

def _stats_key(ctx, p) -> str:
    ref = p["reference"].digest if p["reference"] else None
    return _miss_unless(ctx, Store(p["store"], p["storage_options"]), "statistics",
                        stage_key("statistics", p["checkpoint"].digest, ref, p["store"]))


@task(name="statistics", cache_key_fn=_stats_key, persist_result=True, result_serializer="json")
def extract_statistics(checkpoint: CheckpointRecord, reference: CheckpointRecord | None, store: str,
                       storage_options: dict, cache_dir: str | None) -> StageOutput:
    """Router norms, Λ and MaxVar per expert, streamed from safetensors into DuckDB and parquet."""
    st = Store(store, storage_options)
    key = stage_key("statistics", checkpoint.digest, reference.digest if reference else None, store)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ft = Checkpoint.open(_ckpt_path(checkpoint, cache_dir, storage_options))
        ref = Checkpoint.open(_ckpt_path(reference, cache_dir, storage_options)) if reference else None
        try:
            stats, info = statistics.collect(ft, ref, _progress("statistics"))
        finally:
            ft.close()
            if ref:
                ref.close()
        ckpts = [dict(info, digest=checkpoint.digest, uri=checkpoint.uri, role="finetuned")]
        if reference:
            ckpts.append(dict(info, digest=reference.digest, uri=reference.uri, role="reference"))
        statistics.export_parquet(stats, tmp / "expert_stats.parquet")
        (tmp / "checkpoints.json").write_text(json.dumps(ckpts, indent=2, sort_keys=True))
        summary = dict(info, lambda_source=str(stats.lambda_source.iloc[0]),
                       lambda_min=float(stats["lambda_score"].min()), lambda_max=float(stats["lambda_score"].max()))
        return _publish_stage(st, "statistics", key, tmp, summary)


# ---- 3. allocation ------------------------------------------------------------------------------

def _alloc_key(ctx, p) -> str:
    calib = p["calibration"].key if p["calibration"] else None
    return _miss_unless(ctx, Store(p["store"], p["storage_options"]), "allocation",
                        stage_key("allocation", p["stats"].key, calib, p["config"]))


@task(name="allocation", cache_key_fn=_alloc_key, persist_result=True, result_serializer="json")
def allocate_bits(stats: StageOutput, calibration: StageOutput | None, config: dict, store: str,
                  storage_options: dict) -> StageOutput:
    """Per-expert bit-widths: tier counts from the budget, the order from the chosen allocator."""
    from .league_stages import read_calibration

    st = Store(store, storage_options)
    cfg = allocate.AllocationConfig(**dict(config, bit_widths=tuple(config["bit_widths"])))
    key = stage_key("allocation", stats.key, calibration.key if calibration else None, config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = statistics.read_stats(_local(st, stats, tmp) / "expert_stats.parquet")
        calib, qerr = read_calibration(st, calibration, tmp)
        start = time.perf_counter()
        alloc = allocate.allocate(table, cfg, calib, qerr)
        elapsed = time.perf_counter() - start
        out = tmp / "out"
        out.mkdir()
        statistics.export_parquet(alloc, out / "bit_allocation.parquet")
        summary = dict(allocate.summarize(alloc, cfg), allocation_ms=round(1000 * elapsed, 3))
        get_run_logger().info(f"allocation: {summary}")
        return _publish_stage(st, "allocation", key, out, summary)


# ---- 4. quantization ----------------------------------------------------------------------------

def _quant_key(ctx, p) -> str:
    return _miss_unless(ctx, Store(p["store"], p["storage_options"]), "quantization",
                        stage_key("quantization", p["checkpoint"].digest, p["allocation"].key, p["group_size"], p["symmetric"]))


@task(name="quantization", cache_key_fn=_quant_key, persist_result=True, result_serializer="json")
def quantize_experts(checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int, symmetric: bool, store: str,
                     storage_options: dict, cache_dir: str | None) -> StageOutput:
    """Group-wise round-to-nearest of every expert at its bits, written as packed safetensors."""
    st = Store(store, storage_options)
    key = stage_key("quantization", checkpoint.digest, allocation.key, group_size, symmetric)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        alloc = statistics.read_stats(_local(st, allocation, tmp) / "bit_allocation.parquet")
        summary = quantize.quantize_checkpoint(
            _ckpt_path(checkpoint, cache_dir, storage_options), alloc, group_size, tmp / "checkpoint",
            progress=_progress("quantization"), symmetric=symmetric)
        return _publish_stage(st, "quantization", key, tmp / "checkpoint", summary)


# ---- 5. kernel validation -----------------------------------------------------------------------

def _valid_key(ctx, p) -> str:
    return _miss_unless(ctx, Store(p["store"], p["storage_options"]), "validation",
                        stage_key("validation", p["quantized"].key, p["rtol"]))


@task(name="kernel-validation", cache_key_fn=_valid_key, persist_result=True, result_serializer="json")
def validate_kernels(quantized: StageOutput, checkpoint: CheckpointRecord, rtol: float, store: str,
                     storage_options: dict, cache_dir: str | None) -> StageOutput:
    """Run the Triton dequantize-matmul kernel on every packed matrix against the torch reference."""
    st = Store(store, storage_options)
    key = stage_key("validation", quantized.key, rtol)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report, summary = validate.validate(_local(st, quantized, tmp), _ckpt_path(checkpoint, cache_dir, storage_options),
                                            rtol=rtol, progress=_progress("kernel validation"))
        if summary["failed"]:
            worst = report[~report.passed].iloc[0]
            raise ValidationFailed(
                f"{summary['failed']} of {summary['matrices']} quantized matrices failed validation, e.g. {worst['name']} "
                f"(kernel rel error {worst.rel_error:.2e}, weights within half a step: {bool(worst.quant_error_ok)})",
                "this is a bug or a corrupted quantized checkpoint, not a transient error; report it with the run's validation.parquet",
            )
        out = tmp / "out"
        out.mkdir()
        statistics.export_parquet(report, out / "kernel_validation.parquet")
        return _publish_stage(st, "validation", key, out, summary)


# ---- 6. evaluation ------------------------------------------------------------------------------

def read_text(uri: str, storage_options: dict) -> str:
    if uri.startswith("zoo://"):
        from expertbits.zoo import read_text as read_zoo_text

        return read_zoo_text(uri)
    fs, path = open_fs(uri.removeprefix("file://") if uri.startswith("file://") else uri, storage_options)
    with fs.open(path, "rb") as f:
        return f.read().decode()


def _eval_key(ctx, p) -> str:
    text = hashlib.sha256(read_text(p["text_uri"], p["storage_options"]).encode()).hexdigest()
    return _miss_unless(ctx, Store(p["store"], p["storage_options"]), "evaluation",
                        stage_key("evaluation", p["checkpoint"].digest, p["quantized"].key, text, p["seq_len"], p["windows"]))


@task(name="evaluation", cache_key_fn=_eval_key, persist_result=True, result_serializer="json")
def evaluate_model(checkpoint: CheckpointRecord, quantized: StageOutput, text_uri: str, seq_len: int, windows: int,
                   store: str, storage_options: dict, cache_dir: str | None) -> StageOutput:
    """KL divergence and perplexity of the quantized model vs full precision on held-out text."""
    st = Store(store, storage_options)
    text = read_text(text_uri, storage_options)
    key = stage_key("evaluation", checkpoint.digest, quantized.key, hashlib.sha256(text.encode()).hexdigest(), seq_len, windows)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        metrics = evaluate.evaluate(_ckpt_path(checkpoint, cache_dir, storage_options), _local(st, quantized, tmp), text,
                                    seq_len=seq_len, windows=windows, progress=_progress("evaluation"))
        metrics["text"] = text_uri
        out = tmp / "out"
        out.mkdir()
        (out / "evaluation.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return _publish_stage(st, "evaluation", key, out, metrics)

# ---- publish ------------------------------------------------------------------------------------

@task(name="publish-run", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_transient)
def publish_run(parameters: dict, stats: StageOutput, calibration: StageOutput | None, allocation: StageOutput,
                quantized: StageOutput, validation: StageOutput, evaluation: StageOutput, store: str,
                storage_options: dict) -> RunManifest:
    """Copy every stage output under one run prefix, write the manifest last, show artifacts in the UI."""
    st = Store(store, storage_options)
    outputs = {"statistics": stats, **({"calibration": calibration} if calibration else {}), "allocation": allocation,
               "quantization": quantized, "validation": validation, "evaluation": evaluation}
    rid = publish.run_id(parameters["checkpoint"], list(outputs.values()), f"{parameters['avg_bits']:g}b")
    manifest = publish.publish(st, rid, outputs, parameters)
    _ui_artifacts(st, manifest, outputs)
    get_run_logger().info(f"run published: {manifest.uri}/manifest.json")
    return manifest


def _ui_artifacts(st: Store, manifest: RunManifest, outputs: dict[str, StageOutput]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    slug = re.sub(r"[^a-z0-9]+", "-", manifest.run_id.lower()).strip("-")
    with tempfile.TemporaryDirectory() as tmp:
        alloc = statistics.read_stats(_local(st, outputs["allocation"], Path(tmp)) / "bit_allocation.parquet")
    create_table_artifact(key=f"bit-allocation-{slug}"[:100], table=alloc.to_dict(orient="records"),
                          description=f"Per-expert bit allocation of run {manifest.run_id}")
    ev, al, q, v = (outputs[s].summary for s in ("evaluation", "allocation", "quantization", "validation"))
    create_markdown_artifact(key=f"quant-eval-{slug}"[:100], description="Quantized vs full precision", markdown=(
        f"# {manifest.run_id}\n\n"
        f"| metric | value |\n|---|---|\n"
        f"| KL(fp ‖ quant) per token | {ev['kl']:.5f} |\n"
        f"| perplexity fp / quant | {ev['ppl_fp']:.3f} / {ev['ppl_quant']:.3f} |\n"
        f"| tokens evaluated | {ev['tokens']} |\n"
        f"| avg bits requested / achieved | {al['requested_avg_bits']} / {al['achieved_avg_bits']} |\n"
        f"| effective bits (with scales) | {q['effective_bits']} |\n"
        f"| experts moved by MaxVar | {al['moved_by_maxvar']} |\n"
        f"| kernel check | {v['matrices']} matrices, max rel error {v['max_rel_error']:.2e} on {v['device']} |\n\n"
        f"Artifacts: `{manifest.uri}`\n"))
