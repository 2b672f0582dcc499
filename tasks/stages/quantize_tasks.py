"""Prefect task wrappers around the quantize flow's stage functions (the league flow shares the first
four): caching, retries, progress and store I/O follow `stage_io.py`.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.logging import get_run_logger

from ..allocation import allocate, budget, calibrate, statistics
from ..checkpoints import fetch, texts
from ..checkpoints.adapters import detect, matrix_shape
from ..checkpoints.reader import Checkpoint
from ..checkpoints.reference import check as check_routers
from ..checkpoints.reference import choose, unusable
from ..checkpoints.texts import pinned
from ..errors import ExpertbitsError, ValidationFailed
from ..measure import evaluate, fused_check, harness, kernel_check
from ..meter import Meter, report
from ..model.streaming import place_stage
from ..placement import key as placement_key
from ..quantization import writer
from ..quantization.method import QuantizerConfig
from ..records import CheckpointRecord, ReferenceChoice, RunManifest, StageOutput, TextRecord
from ..store import publish, tables
from ..store.storage import Store
from .per_layer import quantization_key
from .stage_io import (
    cache_key,
    ckpt_path,
    expert_bytes,
    local_copy,
    progress_reporter,
    read_calibration,
    same_kernels,
    stage_key,
    stage_work,
    transient,
)

# ---- 0. preflight -------------------------------------------------------------------------------

@task(name="check-store")
def check_store(root: str, storage_options: dict) -> str:
    """Fail fast, before any work, if the artifact store cannot be written."""
    Store(root, storage_options).check_reachable()
    return root


@task(name="check-device")
def check_device(device: str) -> str:
    """Fail fast, before any work, if the device asked for is not on this machine (where the flow
    and its routing and evaluation stages run), and resolve it once for every stage: `auto` becomes
    `cpu` or `cuda` here, so every process computes the same cache keys (a Dask worker takes `cuda`
    as its own GPU)."""
    from ..placement import resolve, resolved

    placement, chosen = resolve(device), resolved(device)
    get_run_logger().info(f"--device {device} -> {chosen}: the heavy stages compute on {placement}"
                          + ("" if placement.is_cuda else " in float32"))
    return chosen


@task(name="check-lm-eval")
def check_lm_eval(harness_config: dict) -> None:
    """With --lm-eval-tasks, fail before any work (not after GPTQ) if lm-eval is missing, a task is
    unknown or the include path is not a folder. Datasets are loaded by the stage itself (checked
    before its models load): a cached stage needs none on this machine."""
    config = harness.HarnessConfig(**{**harness_config, "tasks": tuple(harness_config["tasks"])})
    harness.check_tasks(config, datasets=False)
    get_run_logger().info(f"lm-eval tasks found: {', '.join(config.tasks)}")


# ---- 1. download --------------------------------------------------------------------------------

@task(name="choose-quantizer")
def choose_quantizer(params, checkpoint: CheckpointRecord, cache_dir: str | None, storage_options: dict):
    """The run's parameters with `--quantizer auto` decided for this checkpoint (flows/params.py
    `for_checkpoint`): GPTQ, or RTN for an encoder-decoder model, said in the log."""
    from ..model.streaming import is_seq2seq

    if params.quantizer != "auto":
        return params
    encoder_decoder = is_seq2seq(ckpt_path(checkpoint, cache_dir, storage_options))
    chosen = params.for_checkpoint(encoder_decoder)
    get_run_logger().info("quantizer auto: %s%s, allocator %s (budget per %s), rotation %s", chosen.quantizer,
                          " (GPTQ supports decoder-only MoE models; this one is encoder-decoder)" if encoder_decoder else "",
                          chosen.allocator, chosen.budget_scope, "on" if chosen.rotate else "off")
    return chosen


@task(name="gptq-estimate")
def announce_gptq(checkpoint: CheckpointRecord, quantizer: dict, widths_measured: int, device: str,
                  cache_dir: str | None, storage_options: dict) -> float | None:
    """On a CPU, how long the run's GPTQ will take, said up front (quantization/gptq_time.py): the
    quantization pass, and the calibration pass at each width for the error-based allocators.
    Seconds, or None where it does not apply (RTN, or a GPU)."""
    from ..quantization import gptq_time

    if not QuantizerConfig.from_dict(quantizer).calibrated or device != "cpu":
        return None
    with Checkpoint.open(ckpt_path(checkpoint, cache_dir, storage_options)) as ckpt:
        shapes = [matrix_shape(ckpt, m) for m in detect(ckpt).matrices]
    passes = 1 + widths_measured
    seconds = gptq_time.estimate_seconds(shapes, passes, gptq_time.probe_rate())
    largest = max(shapes, key=lambda s: gptq_time.flops(*s))
    text = (f"GPTQ on this CPU: about {gptq_time.human(seconds)} ({len(shapes)} expert matrices, the largest "
            f"{largest[0]} × {largest[1]}; {passes} pass{'es' if passes > 1 else ''}: "
            + (f"{widths_measured} to measure each width, then " if widths_measured else "") + "the quantization)")
    log = get_run_logger()
    if seconds > 600:
        log.warning("%s; --device cuda, or --quantizer rtn (data-free, no GPTQ), is much faster", text)
    else:
        log.info(text)
    return seconds


@task(name="pin-revision", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=transient)
def pin_revision(uri: str | None) -> str | None:
    """An hf:// branch or tag resolved to its commit, once, before the download's cache key and
    the download itself read it (so both see one commit); other URIs as given."""
    return fetch.pin(uri) if uri else uri


@task(name="pin-text", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=transient)
def pin_text(uri: str, cache_dir: str | None, storage_options: dict) -> TextRecord:
    """A calibration or evaluation text read once, kept by digest: what every key and stage of the
    run sees (checkpoints/texts.py)."""
    text = texts.pin(uri, cache_dir, storage_options)
    get_run_logger().info(f"{uri}: sha256 {text.digest[:12]}")
    return text


def _download_key(ctx, p) -> str:
    # A record whose cache folder was cleared since is still valid: consumers refetch by digest.
    return stage_key("download", fetch.fingerprint(p["uri"], p["storage_options"]), p["cache_dir"])


@task(name="download", cache_key_fn=_download_key, persist_result=True, result_serializer="json",
      retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=transient)
def fetch_checkpoint(uri: str, cache_dir: str | None, storage_options: dict) -> CheckpointRecord:
    """Fetch a checkpoint into the content-addressed local cache and verify its sha256."""
    logger = get_run_logger()
    with Meter() as meter:
        ckpt = fetch.download(uri, cache_dir, storage_options)
    with Checkpoint.open(ckpt.path):  # header check: a truncated file fails here, by name
        report("download", meter, sum(p.stat().st_size for p in Path(ckpt.path).glob("*.safetensors")), logger)
    cache = Path(cache_dir or fetch.default_cache_dir())
    fp = fetch.fingerprint(uri, storage_options)
    (cache / "index").mkdir(parents=True, exist_ok=True)
    (cache / "index" / f"{fp}.json").write_text(json.dumps({"uri": uri, "digest": ckpt.digest}))
    logger.info(f"{uri} -> {ckpt.path} (sha256 {ckpt.digest[:12]})" + (f", commit {ckpt.uri}" if ckpt.uri != uri else ""))
    # the record names what was fetched: for hf:// the commit, so workers refetch exactly it
    return CheckpointRecord(uri=ckpt.uri, digest=ckpt.digest, path=str(ckpt.path), files=fetch.file_digests(ckpt.path))


@task(name="reference")
def fetch_reference(checkpoint: CheckpointRecord, given: str | None, cache_dir: str | None,
                    storage_options: dict) -> tuple[CheckpointRecord | None, ReferenceChoice]:
    """The checkpoint Λ compares with (checkpoints/reference.py), fetched and checked against the
    checkpoint's routers before any statistics. One the user names must be fetchable and match;
    one the checkpoint declares that cannot be fetched or does not match is reported, and the run
    goes on without a reference. The download is the cached `download` task, its retries its own."""
    logger = get_run_logger()
    path = ckpt_path(checkpoint, cache_dir, storage_options)
    config = json.loads((path / "config.json").read_text())
    card, card_problem = (None, None) if given else _read_card(checkpoint.uri, storage_options)
    choice = choose(checkpoint.uri, config, card, given, card_problem)
    if choice.uri is None:
        (logger.info if choice.source == "none-given" else logger.warning)(choice.note)
        return None, choice
    try:
        uri = pin_revision(choice.uri)
        fetch.check_source(uri, storage_options, remote=True, tokenizer=False)
        ref = fetch_checkpoint(uri, cache_dir, storage_options)
        check_routers(checkpoint.uri, path, choice, ckpt_path(ref, cache_dir, storage_options))
    except Exception as e:
        if choice.source == "given" or not unusable_because(e):
            raise
        choice = unusable(choice, f"{checkpoint.uri} declares base_model {choice.declared!r} "
                                  f"({choice.source}), which cannot be used: {_why(e)}")
        logger.warning(choice.note)
        return None, choice
    choice = choice.model_copy(update={"uri": uri})
    logger.info(choice.note)
    return ref, choice


def _read_card(uri: str, storage_options: dict) -> tuple[str | None, str | None]:
    """(the model card, why it could not be read). The card is a hint: a transport failure is tried
    twice more, bad input is not retried, and either leaves the run without it, reported."""
    for attempt in range(3):
        try:
            return fetch.read_card(uri, storage_options), None
        except Exception as e:  # noqa: BLE001  sorted below: bugs surface, the rest is reported
            if not unusable_because(e):
                raise
            if isinstance(e, ValueError) or attempt == 2:
                return None, _why(e)
            time.sleep(2 ** attempt)
    raise AssertionError("unreachable")


def unusable_because(e: BaseException) -> bool:
    """Whether an error makes a declared reference unusable (bad input, unreachable, refused),
    rather than being a bug, which must surface."""
    return isinstance(e, (ValueError, OSError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "httpx", "httpx2", "httpcore", "huggingface_hub", "botocore", "aiobotocore", "requests", "urllib3")


def _why(e: BaseException) -> str:
    text = e.problem if isinstance(e, ExpertbitsError) else str(e) or type(e).__name__
    return text.splitlines()[0][:300]


# ---- 2. statistics ------------------------------------------------------------------------------

def statistics_key(checkpoint: CheckpointRecord, reference: CheckpointRecord | None, store: str) -> str:
    return stage_key("statistics", checkpoint.digest, reference.digest if reference else None, store)


@task(name="statistics", cache_key_fn=cache_key("statistics", statistics_key), persist_result=True,
      result_serializer="json")
def extract_statistics(checkpoint: CheckpointRecord, reference: CheckpointRecord | None, parts: list[list[dict]],
                       store: str, storage_options: dict, cache_dir: str | None) -> StageOutput:
    """Router norms, Λ and MaxVar per expert (computed per layer by `per_layer.layer_work`), into parquet."""
    with (stage_work("statistics", statistics_key(checkpoint, reference, store), store, storage_options) as w,
          Checkpoint.open(ckpt_path(checkpoint, cache_dir, storage_options)) as ft):
        stats, info = statistics.frame([r for chunk in parts for part in chunk for r in part["rows"]]), statistics.info_of(detect(ft))
        ckpts = [dict(info, digest=checkpoint.digest, uri=checkpoint.uri, role="finetuned")]
        if reference:
            ckpts.append(dict(info, digest=reference.digest, uri=reference.uri, role="reference"))
        tables.export_parquet(stats, w.out / "expert_stats.parquet")
        (w.out / "checkpoints.json").write_text(json.dumps(ckpts, indent=2, sort_keys=True))
        summary = dict(info, lambda_source=str(stats.lambda_source.iloc[0]),
                       lambda_min=float(stats["lambda_score"].min()), lambda_max=float(stats["lambda_score"].max()))
        return w.publish(summary)


# ---- 2b. calibration (allocators that use routing or quantization error) ----------------------

def routing_key(checkpoint: CheckpointRecord, text: TextRecord, seq_len: int, windows: int, device: str) -> str:
    return stage_key("routing", checkpoint.digest, text.digest, seq_len, windows, placement_key(device))


@task(name="routing", cache_key_fn=cache_key("routing", routing_key), persist_result=True, result_serializer="json")
def route_experts(checkpoint: CheckpointRecord, text: TextRecord, seq_len: int, windows: int, device: str, store: str,
                  storage_options: dict, cache_dir: str | None) -> StageOutput:
    """What the router does on the calibration text: frequency, routing weight and input moments of
    every expert, from one streamed forward pass of the full-precision model on `device`."""
    with stage_work("routing", routing_key(checkpoint, text, seq_len, windows, device), store, storage_options) as w:
        path = ckpt_path(checkpoint, cache_dir, storage_options)
        placement = place_stage(device, path, "the routing stage", windows, seq_len, head=True)
        with Meter() as meter:
            calib, moments, info = calibrate.route(path, pinned(text, cache_dir, storage_options), seq_len=seq_len,
                                                   windows=windows, placement=placement,
                                                   progress=progress_reporter("routing"))
        report("routing", meter, expert_bytes(path), get_run_logger())
        if info["uncalibrated_experts"]:
            get_run_logger().warning(
                f"{len(info['uncalibrated_experts'])} experts received no calibration token (layer/expert: "
                f"{', '.join(info['uncalibrated_experts'][:8])}); routing-based allocators treat them as never "
                "routed: give more --calibration-windows or text closer to what the model will serve")
        tables.export_parquet(calib, w.out / "expert_calibration.parquet")
        calibrate.save_moments(moments, w.out / "moments.safetensors")
        return w.publish(dict(info, text=text.uri, **placement.summary()))


def calibration_key(routing: StageOutput, bit_widths: list[int], group_size: int, quantizer: dict, device: str) -> str:
    return stage_key("calibration", routing.key, sorted(bit_widths), group_size, quantizer, placement_key(device))


@task(name="calibration", cache_key_fn=cache_key("calibration", calibration_key), persist_result=True,
      result_serializer="json")
def calibrate_experts(routing: StageOutput, bit_widths: list[int], group_size: int, quantizer: dict, device: str,
                      parts: list[list[dict]], store: str, storage_options: dict) -> StageOutput:
    """The routing statistics beside the error of every expert at every width, measured with the
    quantizer the run uses (computed per layer by `per_layer.layer_work`; GPTQ's by
    `per_layer.sequential_work` on the routing stage's text, which its key covers)."""
    with stage_work("calibration", calibration_key(routing, bit_widths, group_size, quantizer, device), store,
                    storage_options) as w:
        calib = tables.read_stats(w.read(routing, only=["expert_calibration.parquet"]) / "expert_calibration.parquet")
        qerr = pd.DataFrame([r for chunk in parts for part in chunk for r in part["rows"]])
        tables.export_parquet(calib, w.out / "expert_calibration.parquet")
        tables.export_parquet(qerr, w.out / "expert_qerror.parquet")
        return w.publish(dict(routing.summary, quantizer=QuantizerConfig.from_dict(quantizer).label))


# ---- 3. allocation ------------------------------------------------------------------------------

def allocation_key(stats: StageOutput, calibration: StageOutput | None, config: dict) -> str:
    return stage_key("allocation", stats.key, calibration.key if calibration else None, config)


@task(name="allocation", cache_key_fn=cache_key("allocation", allocation_key), persist_result=True,
      result_serializer="json")
def allocate_bits(stats: StageOutput, calibration: StageOutput | None, config: dict, store: str,
                  storage_options: dict) -> StageOutput:
    """Per-expert bit-widths: tier counts from the budget, the order from the chosen allocator."""
    cfg = budget.AllocationConfig(**dict(config, bit_widths=tuple(config["bit_widths"])))
    with stage_work("allocation", allocation_key(stats, calibration, config), store, storage_options) as w:
        table = tables.read_stats(w.read(stats) / "expert_stats.parquet")
        calib, qerr = read_calibration(w.store, calibration, w.tmp)
        start = time.perf_counter()
        alloc = allocate.allocate(table, cfg, calib, qerr)
        elapsed = time.perf_counter() - start
        tables.export_parquet(alloc, w.out / "bit_allocation.parquet")
        summary = dict(allocate.summarize(alloc, cfg), allocation_ms=round(1000 * elapsed, 3))
        get_run_logger().info(f"allocation: {summary}")
        return w.publish(summary)


# ---- 4. quantization ----------------------------------------------------------------------------

@task(name="quantization", cache_key_fn=cache_key("quantization", quantization_key), persist_result=True,
      result_serializer="json")
def quantize_experts(checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int, quantizer: dict,
                     text: dict | None, device: str, parts: list[list[dict]], store: str, storage_options: dict,
                     cache_dir: str | None, dense: dict | None = None) -> StageOutput:
    """The quantized checkpoint: MoE layer shards (written by `per_layer.layer_work`, or by
    `per_layer.sequential_work` for GPTQ, calibrated on `text`, which writes the other shards too:
    with `dense`, their dense layers are packed), the other shards where no task wrote them,
    config.json, the index and the side files."""
    symmetric = QuantizerConfig.from_dict(quantizer).symmetric
    written = [part for chunk in parts for part in chunk]
    layers = [part for part in written if part["modules"]]
    with stage_work("quantization", quantization_key(checkpoint, allocation, group_size, quantizer, text, device, dense),
                    store, storage_options) as w:
        alloc = tables.read_stats(w.read(allocation) / "bit_allocation.parquet")
        path = ckpt_path(checkpoint, cache_dir, storage_options)
        missing = [p["file"] for p in written if not w.store.exists(f"objects/quantization/{w.key}/{p['file']}")]
        if missing:
            raise ValidationFailed(f"layer shards {missing[:3]} written by the per-layer tasks are not in the store {store}",
                                   "Dask workers on other machines need a store they share with the flow: use s3:// "
                                   "(or a shared filesystem mounted at the same path)")
        with Meter() as meter, Checkpoint.open(path) as ckpt:
            writer.check_allocation(ckpt, alloc)
            if len(layers) != len(detect(ckpt).layers):
                raise ValidationFailed(f"{len(layers)} quantized layer shards for {len(detect(ckpt).layers)} MoE layers",
                                       "this is a bug; please report it")
            rest = [part for part in written if not part["modules"]] or writer.write_rest(ckpt, w.out)
            summary = writer.finish(path, alloc, group_size, symmetric, [*rest, *layers], w.out, quantizer, dense)
        report("quantization", meter, 0, get_run_logger())
        if summary.get("fallback_experts"):
            get_run_logger().warning(
                f"{summary['fallback_experts']} experts received fewer than {quantizer['min_tokens']} calibration "
                f"tokens and were rounded to nearest{' with the clipping search' if quantizer.get('clip') else ''} "
                f"instead of GPTQ (least covered: {summary['least_covered']}); "
                "give more --calibration-windows, text closer to what the model will serve, or a lower --gptq-min-tokens")
        return w.publish(summary, present={p["file"]: p["sha256"] for p in written})


# ---- 5. kernel validation -----------------------------------------------------------------------

def validation_key(quantized: StageOutput, rtol: float, text: TextRecord, seq_len: int, kernels: str) -> str:
    """`kernels`: where the Triton kernels run (`stage_io.kernel_device`), decided once by the flow,
    so the key cannot say GPU while a worker sampled rows in the interpreter, nor the reverse."""
    return stage_key("validation", quantized.key, rtol, text.digest, seq_len, kernels)


@task(name="kernel-validation", cache_key_fn=cache_key("validation", validation_key), persist_result=True,
      result_serializer="json")
def validate_kernels(quantized: StageOutput, rtol: float, text: TextRecord, seq_len: int, kernels: str, parts: list[list[dict]],
                     store: str, storage_options: dict, cache_dir: str | None) -> StageOutput:
    """Two checks, as one report: the dequantize-matmul kernel on every packed matrix against the
    torch reference (run per layer by `per_layer.layer_work`), and the fused MoE kernel on every MoE
    layer with the shipped model's own routing of a calibration window (fused_check.py)."""
    with stage_work("validation", validation_key(quantized, rtol, text, seq_len, kernels), store, storage_options) as w:
        same_kernels(kernels)
        table, summary = kernel_check.summarize([part for chunk in parts for part in chunk], rtol)
        if summary["failed"]:
            worst = table[~table.passed].iloc[0]
            raise ValidationFailed(
                f"{summary['failed']} of {summary['matrices']} quantized matrices failed validation, e.g. {worst['name']} "
                f"(kernel rel error {worst.rel_error:.2e}, {worst.weight_check} weight check passed: "
                f"{bool(worst.quant_error_ok)})",
                "this is a bug or a corrupted quantized checkpoint, not a transient error; report it with this message",
            )
        with Meter() as meter:
            fused = pd.DataFrame(fused_check.validate_fused(
                w.read(quantized), pinned(text, cache_dir, storage_options), seq_len=seq_len, rtol=rtol,
                progress=progress_reporter("fused kernel")))
        report("validation (fused kernel)", meter, None, get_run_logger())
        summary.update(fused_check.summarize(fused))
        if summary["fused_failed"]:
            bad = fused[fused.passed == False]  # noqa: E712  (None: not applicable)
            raise ValidationFailed(
                f"the fused MoE kernel failed {summary['fused_failed']} of {len(fused)} (layer, phase) checks: " + "; ".join(
                    f"layer {r.layer} {r.phase}: rel error {r.rel_error:.2e} > {r.rtol:g}" for r in bad.head(4).itertuples()),
                "this is a bug, not a transient error; report it with this message",
            )
        if summary["fused_not_applicable"]:
            get_run_logger().warning(f"{summary['fused_not_applicable']} fused-kernel checks not applicable: an activation "
                                     "the kernel has no fused form of (the loader runs those experts one by one)")
        tables.export_parquet(table, w.out / "kernel_validation.parquet")
        tables.export_parquet(fused, w.out / "fused_validation.parquet")
        return w.publish(summary)


# ---- 6. evaluation ------------------------------------------------------------------------------

def evaluation_key(checkpoint: CheckpointRecord, quantized: StageOutput, text: TextRecord, seq_len: int,
                   windows: int, device: str) -> str:
    return stage_key("evaluation", checkpoint.digest, quantized.key, text.digest, seq_len, windows, placement_key(device))


@task(name="evaluation", cache_key_fn=cache_key("evaluation", evaluation_key), persist_result=True,
      result_serializer="json")
def evaluate_model(checkpoint: CheckpointRecord, quantized: StageOutput, text: TextRecord, seq_len: int, windows: int,
                   device: str, store: str, storage_options: dict, cache_dir: str | None) -> StageOutput:
    """KL divergence and perplexity of the quantized model vs full precision on held-out text; on a
    GPU also the served model's prefill and decode speed beside full precision's (throughput.json)."""
    with stage_work("evaluation", evaluation_key(checkpoint, quantized, text, seq_len, windows, device), store,
                    storage_options) as w:
        path = ckpt_path(checkpoint, cache_dir, storage_options)
        placement = place_stage(device, path, "the evaluation stage", windows, seq_len, head=True)
        with ExitStack() as held:
            with Meter() as meter:
                metrics, q_model = held.enter_context(evaluate.evaluated(
                    path, w.read(quantized), pinned(text, cache_dir, storage_options), seq_len=seq_len,
                    windows=windows, placement=placement, progress=progress_reporter("evaluation")))
            report("evaluation", meter, expert_bytes(path), get_run_logger())
            if placement.is_cuda:  # a GPU's speed is what a user serves at; a streamed CPU model's is not
                from ..measure import speed

                figures = speed.compare(path, q_model, placement)  # the served model evaluation loaded
                get_run_logger().info(speed.describe(figures))
                (w.out / "throughput.json").write_text(json.dumps(figures, indent=2, sort_keys=True))
        metrics.update(text=text.uri, **placement.summary())
        (w.out / "evaluation.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        return w.publish(metrics)


# ---- 7. lm-eval (optional) ----------------------------------------------------------------------

def lm_eval_key(checkpoint: CheckpointRecord, quantized: StageOutput, harness_config: dict, device: str) -> str:
    return stage_key("lm-eval", checkpoint.digest, quantized.key, harness_config, placement_key(device),
                     harness.tasks_digest(harness_config.get("include_path")))


@task(name="lm-eval", cache_key_fn=cache_key("lm-eval", lm_eval_key), persist_result=True, result_serializer="json")
def evaluate_tasks(checkpoint: CheckpointRecord, quantized: StageOutput, harness_config: dict, device: str, store: str,
                   storage_options: dict, cache_dir: str | None) -> StageOutput:
    """lm-evaluation-harness tasks on the full-precision checkpoint and on the shipped quantized
    folder, side by side (lm_eval.parquet, lm_eval.json with lm-eval's own results, lm_eval.md)."""
    from ..placement import MARGIN_BYTES, of_checkpoint, require_free

    config = harness.HarnessConfig(**{**harness_config, "tasks": tuple(harness_config["tasks"])})
    with stage_work("lm-eval", lm_eval_key(checkpoint, quantized, harness_config, device), store, storage_options) as w:
        path = ckpt_path(checkpoint, cache_dir, storage_options)
        placement = of_checkpoint(device, path)
        if placement.is_cuda:  # lm-eval runs each model whole on the GPU, one after the other
            require_free(placement, sum(f.stat().st_size for f in path.glob("*.safetensors")) + MARGIN_BYTES,
                         "lm-eval on the full-precision model")
        with Meter() as meter:
            table, raw = harness.compare(path, w.read(quantized), config, placement, progress_reporter("lm-eval"))
        report("lm-eval", meter, expert_bytes(path), get_run_logger())
        tables.export_parquet(table, w.out / "lm_eval.parquet")
        (w.out / "lm_eval.json").write_text(json.dumps(raw, indent=2, sort_keys=True, default=str))
        md = harness.markdown(table)
        (w.out / "lm_eval.md").write_text(md)
        get_run_logger().info("lm-eval, full precision vs quantized:\n" + md)
        return w.publish({"tasks": list(config.tasks), "seconds": raw["seconds"], **placement.summary(),
                          "results": table.to_dict(orient="records")})


# ---- publish ------------------------------------------------------------------------------------

@task(name="publish-run", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=transient)
def publish_run(parameters: dict, reference: ReferenceChoice, stats: StageOutput, calibration: StageOutput | None,
                allocation: StageOutput, quantized: StageOutput, validation: StageOutput, evaluation: StageOutput,
                store: str, storage_options: dict, checkpoint: CheckpointRecord | None = None,
                lm_eval: StageOutput | None = None, cache_dir: str | None = None) -> RunManifest:
    """Copy every stage output under one run prefix with the quantized folder's model card, write
    the manifest last, show artifacts in the UI."""
    st = Store(store, storage_options)
    outputs = {"statistics": stats, **({"calibration": calibration} if calibration else {}), "allocation": allocation,
               "quantization": quantized, "validation": validation, "evaluation": evaluation,
               **({"lm-eval": lm_eval} if lm_eval else {})}
    rid = publish.run_id(parameters["checkpoint"], list(outputs.values()), f"{parameters['avg_bits']:g}b")
    readme = model_card(st, parameters, outputs, checkpoint, cache_dir, storage_options)
    manifest = publish.publish(st, rid, outputs, parameters, notes={"reference": reference.model_dump()},
                               extra={"quantization/README.md": readme.encode()})
    _ui_artifacts(st, manifest, outputs)
    get_run_logger().info(f"run published: {manifest.uri}/manifest.json")
    return manifest


def model_card(st: Store, parameters: dict, outputs: dict[str, StageOutput],
               checkpoint: CheckpointRecord | None, cache_dir: str | None, storage_options: dict) -> str:
    """The quantized folder's README.md (tasks/store/card.py), from the run's own records."""
    from importlib.metadata import PackageNotFoundError, version

    from ..store.card import render

    def read(stage: str, rel: str) -> bytes:
        return st.read_bytes(f"{outputs[stage].prefix}/{rel}")

    config = json.loads(read("quantization", "config.json"))
    source = None
    if checkpoint is not None:  # the source's card, for its license
        card = ckpt_path(checkpoint, cache_dir, storage_options) / "README.md"
        source = card.read_text(errors="replace")[:1 << 16] if card.is_file() else None
    try:
        ours = version("expertbits")
    except PackageNotFoundError:
        ours = ""
    return render(parameters=parameters, quantization_config=config["quantization_config"],
                  summaries={s: o.summary for s, o in outputs.items()},
                  evaluation=json.loads(read("evaluation", "evaluation.json")),
                  lm_eval=read("lm-eval", "lm_eval.md").decode() if "lm-eval" in outputs else None,
                  source_card=source, encoder_decoder=bool(config.get("is_encoder_decoder")),
                  model_type=config["quantization_config"].get("base_model_type", ""), version=ours)


def _e(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2e}"


def _ui_artifacts(st: Store, manifest: RunManifest, outputs: dict[str, StageOutput]) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    slug = re.sub(r"[^a-z0-9]+", "-", manifest.run_id.lower()).strip("-")
    with tempfile.TemporaryDirectory() as tmp:
        alloc = tables.read_stats(local_copy(st, outputs["allocation"], Path(tmp)) / "bit_allocation.parquet")
    create_table_artifact(key=f"bit-allocation-{slug}"[:100], table=alloc.to_dict(orient="records"),
                          description=f"Per-expert bit allocation of run {manifest.run_id}")
    ev, al, q, v = (outputs[s].summary for s in ("evaluation", "allocation", "quantization", "validation"))
    coverage = ""
    if "least_covered" in q:  # a calibrated quantizer (GPTQ): how many tokens its experts saw
        least = ", ".join(f"{r['layer']}/{r['expert']}: {r['calibration_tokens']}" for r in q["least_covered"])
        coverage = (f"| experts rounded to nearest (too few calibration tokens) | {q['fallback_experts']} |\n"
                    f"| least calibrated experts (layer/expert: tokens) | {least} |\n")
        create_table_artifact(key=f"calibration-coverage-{slug}"[:100], table=q["least_covered"],
                              description=f"The least calibrated experts of run {manifest.run_id} (all of them: "
                                          "the calibration_coverage table of the run's DuckDB)")
    speed = ""
    if "throughput.json" in outputs["evaluation"].files:  # evaluated on a GPU: the served model's speed
        from ..measure.speed import describe

        figures = json.loads(st.read_bytes(outputs["evaluation"].prefix + "/throughput.json"))
        speed = f"| speed | {describe(figures)} |\n"
    create_markdown_artifact(key=f"quant-eval-{slug}"[:100], description="Quantized vs full precision", markdown=(
        f"# {manifest.run_id}\n\n"
        f"| metric | value |\n|---|---|\n"
        f"| KL(fp ‖ quant) per token | {ev['kl']:.5f} |\n"
        f"| perplexity fp / quant | {ev['ppl_fp']:.3f} / {ev['ppl_quant']:.3f} |\n"
        f"| tokens evaluated | {ev['tokens']} |\n"
        f"| computed on | {ev.get('device', 'cpu')} ({ev.get('dtype', 'float32')}) |\n"
        f"{speed}"
        f"| avg bits requested / achieved | {al['requested_avg_bits']} / {al['achieved_avg_bits']} |\n"
        f"| effective bits (with scales and zero points) | {q['effective_bits']} |\n"
        f"| whole model: bytes against bf16, bits per parameter | {100 * q.get('fraction_of_bf16', 0):.1f}%, "
        f"{q.get('model_bits_per_parameter', 0):.2f} |\n"
        f"| experts moved by MaxVar | {al['moved_by_maxvar']} |\n"
        f"| quantizer | {q.get('quantizer', 'rtn')} |\n"
        f"{coverage}"
        f"| kernel check | {v['matrices']} matrices, max rel error {v['max_rel_error']:.2e} on {v['device']} |\n"
        f"| fused MoE kernel | {v['fused_layers']} layers with the model's routing, max rel error "
        f"{_e(v['fused_max_rel_error'])}, {v['fused_not_applicable']} checks not applicable |\n\n"
        f"Artifacts: `{manifest.uri}`\n"))
    if "lm-eval" in outputs:
        create_markdown_artifact(key=f"lm-eval-{slug}"[:100], description="lm-evaluation-harness: full precision vs quantized",
                                 markdown=f"# {manifest.run_id}: lm-eval\n\n"
                                          + st.read_bytes(outputs["lm-eval"].prefix + "/lm_eval.md").decode())
