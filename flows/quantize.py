"""The expertbits flow: its stages are cached, retryable Prefect tasks passing URIs and digests.

    download (the checkpoint, then its reference: given, declared by the checkpoint, or none;
    the calibration and evaluation texts pinned by digest, what every later stage sees)
    → statistics (+ routing and calibration, for allocators that use routing or error)
    → allocation → quantization → kernel validation → evaluation
    → lm-eval (with --lm-eval-tasks: lm-evaluation-harness on both models) → publish

Statistics, calibration error, quantization and validation work layer by layer: `per_layer`
maps their per-layer task over the MoE layers, in order in one process or on a Dask cluster
(`--dask`, see scale.py), and the stage's own task gathers the parts. With `--quantizer gptq`,
calibration error and quantization are one sequential pass instead (`quantizer_parts`).

Run it with `expertbits quantize` (see `expertbits quantize --help`) or call `quantize_moe`
with a `QuantizeParams`. Every stage is keyed on content digests, so a rerun with the same
inputs is all cache hits.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from expertbits.tasks.allocation.allocators import NEEDS_CALIBRATION, NEEDS_ERROR
from expertbits.tasks.records import RunManifest
from expertbits.tasks.stages.quantize_tasks import (
    allocate_bits,
    announce_gptq,
    calibrate_experts,
    check_lm_eval,
    check_device,
    check_store,
    choose_quantizer,
    evaluate_model,
    evaluate_tasks,
    extract_statistics,
    fetch_checkpoint,
    fetch_reference,
    pin_revision,
    pin_text,
    publish_run,
    quantize_experts,
    route_experts,
    validate_kernels,
)
from expertbits.tasks.stages.stage_io import kernel_device

from .params import QuantizeParams
from .scale import absolute_store, layer_chunks, per_layer, quantizer_parts, task_runner


@flow(name="expertbits-quantize", log_prints=True, task_runner=task_runner())
def quantize_moe(params: QuantizeParams = QuantizeParams()) -> RunManifest:
    """Quantize a fine-tuned MoE checkpoint with per-expert bit-widths and publish every artifact."""
    p = params
    store = absolute_store(p.store)  # Dask workers resolve a relative path against their own folder
    io = dict(store=store, storage_options=p.storage_options)
    local = dict(cache_dir=p.cache_dir, storage_options=p.storage_options)
    check_store(store, p.storage_options)
    device = check_device(p.device)  # auto resolved once: every process keys alike
    if (harness := p.harness_config()) is not None:
        check_lm_eval(harness.as_dict())  # lm-eval, its tasks and their data, before GPTQ rather than after

    finetuned = fetch_checkpoint(pin_revision(p.checkpoint), p.cache_dir, p.storage_options)
    p = choose_quantizer(p, finetuned, p.cache_dir, p.storage_options)  # --quantizer auto: GPTQ, or RTN for Switch
    reference, choice = fetch_reference(finetuned, p.reference, p.cache_dir, p.storage_options)
    calibration_text = pin_text(p.calibration_text, p.cache_dir, p.storage_options)
    eval_text = pin_text(p.eval_text, p.cache_dir, p.storage_options)
    layers = layer_chunks(finetuned, **local)
    announce_gptq(finetuned, p.quantizer_config().as_dict(), len(p.bit_widths) * (p.allocator in NEEDS_ERROR), device,
                  **local)  # on a CPU, how long GPTQ will take, before it starts
    stats = extract_statistics(finetuned, reference, per_layer("statistics", layers, checkpoint=finetuned,
                                                               reference=reference, **local), cache_dir=p.cache_dir, **io)
    quantizer = p.quantizer_config().as_dict()
    text = dict(text=calibration_text, seq_len=p.eval_seq_len, windows=p.calibration_windows)
    calibration = None
    if p.allocator in NEEDS_CALIBRATION | NEEDS_ERROR:
        routing = route_experts(finetuned, calibration_text, p.eval_seq_len, p.calibration_windows, device,
                                cache_dir=p.cache_dir, **io)
        measured = p.error_quantizer().as_dict()
        calibration = calibrate_experts(routing, p.bit_widths, p.group_size, measured, device, quantizer_parts(
            "calibration", layers, checkpoint=finetuned, routing=routing, bit_widths=p.bit_widths,
            group_size=p.group_size, quantizer=measured, text=text, device=device, store=store, **local), **io)
    allocation = allocate_bits(stats, calibration, asdict(p.allocation_config()), **io)
    dense = p.dense_config()  # None: only the routed experts
    quantized = quantize_experts(finetuned, allocation, p.group_size, quantizer, text, device, quantizer_parts(
        "quantization", layers, checkpoint=finetuned, allocation=allocation, group_size=p.group_size,
        quantizer=quantizer, text=text, device=device, store=store, **({"dense": dense} if dense else {}), **local),
        cache_dir=p.cache_dir, dense=dense, **io)
    kernels = kernel_device()  # where the Triton kernels run, decided here once (the keys say it)
    validation = validate_kernels(quantized, p.validation_rtol, calibration_text, p.eval_seq_len, kernels, per_layer(
        "validation", layers, quantized=quantized, checkpoint=finetuned, rtol=p.validation_rtol, kernels=kernels,
        store=store, **local), cache_dir=p.cache_dir, **io)
    evaluation = evaluate_model(finetuned, quantized, eval_text, p.eval_seq_len, p.eval_windows, device,
                                cache_dir=p.cache_dir, **io)

    lm_eval = None
    if harness is not None:  # --lm-eval-tasks: standard benchmarks, both models
        lm_eval = evaluate_tasks(finetuned, quantized, harness.as_dict(), device, cache_dir=p.cache_dir, **io)

    return publish_run(p.model_dump(mode="json"), choice, stats, calibration, allocation, quantized, validation, evaluation,
                       checkpoint=finetuned, lm_eval=lm_eval, cache_dir=p.cache_dir, **io)
