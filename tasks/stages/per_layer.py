"""Units of work a Dask cluster runs in parallel: MoE layers of a stage, and cells of the league.

A stage that works layer by layer (statistics, calibration error, quantization, kernel
validation) is split in two: `layer_work` over lists of MoE layer positions, which the flow maps
onto its task runner (all layers in one task in one process by default; one task per layer on
a Dask cluster), then the stage's own task, which gathers the parts and publishes. The league
maps `league_cells` the same way. Tasks pass records (URIs, digests, stage keys), never
tensors: a worker without the whole checkpoint in its cache fetches only the shards its layers
live in (stage_io.layer_path), and the per-layer results are the same bytes whichever worker
computed them.
"""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from prefect.logging import get_run_logger

from ..allocation import calibrate, statistics
from ..checkpoints.adapters import detect
from ..checkpoints.reader import Checkpoint
from ..checkpoints.texts import pinned
from ..measure import kernel_check, league
from ..meter import Meter, report
from ..placement import of_checkpoint
from ..placement import key as placement_key
from ..quantization import writer
from ..quantization.method import QuantizerConfig
from ..records import CheckpointRecord, StageOutput, TextRecord
from ..store import tables
from ..store.storage import Store, sha256_file
from .stage_io import (
    cache_key,
    ckpt_path,
    expert_bytes,
    layer_path,
    local_copy,
    progress_reporter,
    read_calibration,
    same_kernels,
    stage_key,
    transient,
)


def quantization_key(checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int, quantizer: dict,
                     text: dict | None, device: str, dense: dict | None = None) -> str:
    """The quantization stage's key; a calibrated quantizer (GPTQ) adds its calibration text's
    digest, windows and window length (`text`: the pinned TextRecord, seq_len, windows), and a
    whole-model run its dense layers' widths (`dense`; absent otherwise, so other keys stay as they were)."""
    calibration = None
    if QuantizerConfig.from_dict(quantizer).calibrated:
        calibration = [text["text"].digest, text["seq_len"], text["windows"]]
    return stage_key("quantization", checkpoint.digest, allocation.key, group_size, quantizer, calibration,
                     placement_key(device), *([dense] if dense else []))


def _quantization_prefix(i: dict) -> str:
    key = quantization_key(i["checkpoint"], i["allocation"], i["group_size"], i["quantizer"], i.get("text"), i["device"],
                           i.get("dense"))
    return f"objects/quantization/{key}"


def _statistics(position: int, checkpoint: CheckpointRecord, reference: CheckpointRecord | None,
                cache_dir: str | None, storage_options: dict, **_) -> dict:
    with Checkpoint.open(layer_path(checkpoint, [position], cache_dir, storage_options)) as ft:
        if reference is None:
            return {"rows": statistics.collect_layer(ft, None, position)}
        with Checkpoint.open(layer_path(reference, [position], cache_dir, storage_options)) as ref:
            return {"rows": statistics.collect_layer(ft, ref, position)}


def _calibration(position: int, checkpoint: CheckpointRecord, routing: StageOutput, bit_widths: list[int],
                 group_size: int, quantizer: dict, device: str, store: str, storage_options: dict,
                 cache_dir: str | None) -> dict:
    st = Store(store, storage_options)
    path = layer_path(checkpoint, [position], cache_dir, storage_options)
    with tempfile.TemporaryDirectory() as tmp, Checkpoint.open(path) as ckpt:
        moments = local_copy(st, routing, Path(tmp), only=["moments.safetensors"]) / "moments.safetensors"
        layer = detect(ckpt).layers[position]
        m = calibrate.load_moments(moments, layer.layer, layer.num_experts)
        return {"rows": calibrate.layer_errors(ckpt, position, m, tuple(sorted(bit_widths)), group_size,
                                               QuantizerConfig.from_dict(quantizer), of_checkpoint(device, path))}


def _quantization(position: int, checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int,
                  quantizer: dict, device: str, store: str, storage_options: dict, cache_dir: str | None) -> dict:
    """Write the layer's shard straight under the stage's prefix (the stage task publishes the rest).
    Each matrix is rounded on the device and written from the host."""
    q = QuantizerConfig.from_dict(quantizer)
    path = layer_path(checkpoint, [position], cache_dir, storage_options)
    on = of_checkpoint(device, path).device
    with _shard_writer(checkpoint, allocation, group_size, quantizer, None, device, store, storage_options,
                       path) as (ckpt, alloc, out, write):
        return write(writer.quantize_layer(ckpt, position, alloc, group_size, q.symmetric, out,
                                             quantizer=lambda m, w, bits: q.round_matrix(w.to(on), bits, group_size)))


@contextmanager
def _shard_writer(checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int, quantizer: dict,
                  text: dict | None, device: str, store: str, storage_options: dict, path: Path, dense: dict | None = None):
    """(open checkpoint, allocation, out, write): `write(part)` checksums a layer shard written
    into `out` and puts it under the stage's prefix (`out` is that prefix for a local store)."""
    st = Store(store, storage_options)
    prefix = _quantization_prefix(dict(checkpoint=checkpoint, allocation=allocation, group_size=group_size,
                                       quantizer=quantizer, text=text, device=device, dense=dense))
    with tempfile.TemporaryDirectory() as tmp, Checkpoint.open(path) as ckpt:
        tmp = Path(tmp)
        alloc = tables.read_stats(local_copy(st, allocation, tmp) / "bit_allocation.parquet")
        out = Path(st.uri(prefix)) if st.is_local else tmp / "out"
        out.mkdir(parents=True, exist_ok=True)

        def write(part: dict) -> dict:
            part["sha256"] = sha256_file(out / part["file"])
            if not st.is_local:
                st.put_file(out / part["file"], f"{prefix}/{part['file']}")
                (out / part["file"]).unlink()
            return part

        yield ckpt, alloc, out, write


def _gptq_quantization(checkpoint: CheckpointRecord, allocation: StageOutput, group_size: int, quantizer: dict,
                       text: dict, device: str, store: str, storage_options: dict, cache_dir: str | None,
                       dense: dict | None = None) -> list[dict]:
    """Every shard by sequential GPTQ: each MoE layer's written as soon as its layer is done, with the
    layer's calibration coverage, then the others (with `dense`, their dense layers packed too)."""
    from ..quantization.dense import DenseWidths
    from ..quantization.gptq_sequential import gptq_shards

    path = ckpt_path(checkpoint, cache_dir, storage_options)
    placement = _gptq_placement(device, path, text, dense)
    with _shard_writer(checkpoint, allocation, group_size, quantizer, text, device, store, storage_options,
                       path, dense) as (ckpt, alloc, out, write):
        return gptq_shards(ckpt, path, pinned(text["text"], cache_dir, storage_options), alloc, group_size,
                           QuantizerConfig.from_dict(quantizer), out, seq_len=text["seq_len"], windows=text["windows"],
                           dense=DenseWidths.from_dict(dense), write=write,
                           progress=progress_reporter("GPTQ quantization"), placement=placement)


def _gptq_placement(device: str, path: Path, text: dict, dense: dict | None = None):
    """Where sequential GPTQ runs, refused first if its layer, expert, Hessians and activations
    would not fit in the device's free memory."""
    from ..model.streaming import place_stage

    from ..quantization.dense import DenseWidths

    head = dense is not None and DenseWidths.from_dict(dense).width("lm_head", head=True) is not None
    return place_stage(device, path, "sequential GPTQ", text["windows"], text["seq_len"], head=False, hessians=True,
                       dense=dense is not None, dense_head=head)


def _gptq_calibration(checkpoint: CheckpointRecord, bit_widths: list[int], group_size: int, quantizer: dict,
                      text: dict, device: str, storage_options: dict, cache_dir: str | None, **_) -> list[dict]:
    """GPTQ's error of every expert at every width, one part per MoE layer."""
    from ..quantization.gptq_sequential import gptq_errors

    path = ckpt_path(checkpoint, cache_dir, storage_options)
    rows = gptq_errors(path, pinned(text["text"], cache_dir, storage_options),
                       tuple(sorted(bit_widths)), group_size, QuantizerConfig.from_dict(quantizer),
                       seq_len=text["seq_len"], windows=text["windows"], progress=progress_reporter("GPTQ errors"),
                       placement=_gptq_placement(device, path, text))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    return [{"rows": [r for r in rows if r["layer"] == layer]} for layer in layers]


def _validation(position: int, quantized: StageOutput, checkpoint: CheckpointRecord, rtol: float, kernels: str,
                store: str, storage_options: dict, cache_dir: str | None) -> dict:
    """Fetch only the config, the index and the shards of the layer's packed matrices (and, for the
    first layer of a run with packed dense layers, theirs, checked against the whole source)."""
    same_kernels(kernels)
    st = Store(store, storage_options)
    meta = ["config.json", "model.safetensors.index.json"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = local_copy(st, quantized, Path(tmp), only=meta)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        # the first layer's unit also checks the packed dense layers, whose sources are anywhere in the model
        whole = position == 0 and qc.get("dense_modules")
        source = (ckpt_path(checkpoint, cache_dir, storage_options) if whole
                  else layer_path(checkpoint, [position], cache_dir, storage_options))
        weight_map = json.loads((folder / meta[1]).read_text())["weight_map"]
        layer = int(sorted(qc["experts_modules"], key=int)[position])
        shards = sorted({weight_map[f"{n}.qweight"] for n, info in qc["modules"].items() if info["layer"] == layer}
                        | ({weight_map[f"{n}.qweight"] for n in qc.get("dense_modules", {})} if position == 0 else set()))
        qpath = local_copy(st, quantized, Path(tmp), only=meta + shards)
        with Checkpoint.open(source) as src:
            return kernel_check.validate_layer(qpath, src, position, rtol=rtol)


WORK = {"statistics": _statistics, "calibration": _calibration, "quantization": _quantization, "validation": _validation}
SEQUENTIAL = {"calibration": _gptq_calibration, "quantization": _gptq_quantization}


def _ident(v: Any) -> Any:
    """What a cache key sees of an input: records by digest or key, everything else as is."""
    if isinstance(v, (CheckpointRecord, TextRecord)):
        return v.digest
    if isinstance(v, StageOutput):
        return v.key
    if isinstance(v, (list, tuple)):
        return [_ident(x) for x in v]
    if isinstance(v, dict):
        return {k: _ident(x) for k, x in v.items()}
    return v


def _layer_key(ctx, p) -> str:
    i = p["inputs"]
    inputs = {k: _ident(v) for k, v in sorted(i.items()) if k not in ("cache_dir", "storage_options")}
    if "device" in inputs:  # the flow's resolved device (never auto): its kind and dtype, as every key holds it
        inputs["device"] = placement_key(inputs["device"])
    key = stage_key(p["stage"], "layers", p.get("positions", "sequential"), inputs)
    if p["stage"] == "quantization":  # a record whose shards left the store is a miss
        st = Store(i["store"], i["storage_options"])
        prefix = _quantization_prefix(i)
        if ctx.result_store is not None and ctx.result_store.exists(key):
            record = ctx.result_store.read(key).result
            if not all(st.exists(f"{prefix}/{part['file']}") for part in record):
                return f"{key}-rebuild-{uuid.uuid4().hex}"
    return key


@task(name="layers", cache_key_fn=_layer_key, persist_result=True, result_serializer="json",
      task_run_name="{stage}-layers-{positions}", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=transient)
def layer_work(stage: str, positions: list[int], inputs: dict) -> list[dict]:
    """One stage's work on some MoE layers (by position in the checkpoint's MoE layer order)."""
    if "device" in inputs:  # a bug if unresolved: a key function's error would only make Prefect skip the cache
        placement_key(inputs["device"])
    with Meter() as meter:
        out = [WORK[stage](p, **inputs) for p in positions]
    path = layer_path(inputs["checkpoint"], positions, inputs.get("cache_dir"), inputs["storage_options"])
    report(stage, meter, expert_bytes(path, ("gate",) if stage == "statistics" else ("gate", "up", "down"), positions),
           get_run_logger())
    return out


@task(name="sequential", cache_key_fn=_layer_key, persist_result=True, result_serializer="json",
      task_run_name="{stage}-sequential-gptq", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=transient)
def sequential_work(stage: str, inputs: dict) -> list[dict]:
    """One stage's work on every MoE layer in one pass, in order (GPTQ: layer l+1 is calibrated on
    the outputs of the quantized layer l, so the layers cannot be split across workers)."""
    placement_key(inputs["device"])  # resolved by the flow, never auto (see layer_work)
    with Meter() as meter:
        out = SEQUENTIAL[stage](**inputs)
    path = ckpt_path(inputs["checkpoint"], inputs.get("cache_dir"), inputs["storage_options"])
    report(f"{stage} (gptq)", meter, expert_bytes(path), get_run_logger())
    return out


_LEAGUE: dict[tuple, tuple] = {}  # per process: the tables, the reference, the cell writer and the task, made once


@functools.cache
def _league_lock() -> threading.Lock:
    """A worker with several threads runs one cell at a time: they share the reference model. (Made
    on first use: Dask pickles the task functions, and a module-level lock would go with them.)"""
    return threading.Lock()


def _league_env(checkpoint, stats, calibrations, grid, text, seq_len, windows, task_name, task_examples, device, store,
                storage_options, cache_dir, gptq_text):
    ident = (checkpoint.digest, stats.key, tuple(c.key for c in calibrations), text.digest, seq_len, windows,
             grid.group_size, task_name, task_examples, device)
    if ident not in _LEAGUE:
        for old in _LEAGUE.values():  # one league at a time per process: release the previous one first
            old[3].close()
        _LEAGUE.clear()
        st = Store(store, storage_options)
        path = ckpt_path(checkpoint, cache_dir, storage_options)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            table = tables.read_stats(local_copy(st, stats, tmp) / "expert_stats.parquet")
            read = [read_calibration(st, c, tmp / f"calibration-{i}") for i, c in enumerate(calibrations)]
        from ..model.streaming import place_stage

        # the reference streams as evaluation does; GPTQ cells calibrate as the GPTQ stage does
        placement = place_stage(device, path, "the league's reference", windows, seq_len, head=True)
        if gptq_text is not None and "gptq" in grid.quantizers:
            place_stage(device, path, "the league's GPTQ cells", gptq_text["windows"], gptq_text["seq_len"], head=False,
                        hessians=True)
        reference = league.Reference(path, pinned(text, cache_dir, storage_options), seq_len=seq_len, windows=windows,
                                     placement=placement)
        calibration = None if gptq_text is None else dict(gptq_text, text=pinned(gptq_text["text"], cache_dir,
                                                                                  storage_options))
        _LEAGUE[ident] = (table, read[0][0], {k: q for k, (_, q) in zip(grid.error_keys(), read)}, reference,
                          league.CellWriter(path, grid.group_size, calibration=calibration, placement=placement),
                          league.task(task_name, task_examples))
    return _LEAGUE[ident]


def cells_key(indices: list[int], checkpoint: CheckpointRecord, stats: StageOutput, calibrations: list[StageOutput],
              grid: dict, text: TextRecord, seq_len: int, windows: int, task_name: str | None, task_examples: int,
              device: str) -> str:
    return stage_key("league", "cells", indices, checkpoint.digest, stats.key, [c.key for c in calibrations], grid,
                     text.digest, seq_len, windows, task_name, task_examples, placement_key(device),
                     league.task_data(task_name))


@task(name="league-cells", cache_key_fn=cache_key("league", cells_key, in_store=False), persist_result=True,
      result_serializer="json",
      task_run_name="league-cells-{indices}", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=transient)
def league_cells(indices: list[int], checkpoint: CheckpointRecord, stats: StageOutput, calibrations: list[StageOutput],
                 grid: dict, text: TextRecord, seq_len: int, windows: int, task_name: str | None, task_examples: int,
                 device: str, store: str, storage_options: dict, cache_dir: str | None,
                 gptq_text: dict | None = None) -> list[dict]:
    """Some cells of the league grid, each allocated, written and evaluated (see league.run_cell);
    `calibrations` in `Grid.error_keys()` order; GPTQ cells calibrate on `gptq_text` (the pinned
    text, seq_len, windows: the routing stage's, which the calibrations' keys cover)."""
    g = league.Grid.from_dict(grid)
    with _league_lock():
        table, calib, qerrors, reference, writer, task = _league_env(
            checkpoint, stats, calibrations, g, text, seq_len, windows, task_name, task_examples, device, store,
            storage_options, cache_dir, gptq_text)
        return [league.run_cell(i, table, calib, qerrors, g, reference, writer, task) for i in indices]
