"""The league flow: which allocator is best at each budget, measured on your checkpoint.

    download (checkpoint, then its reference: given, declared or none) → statistics → routing → calibration → league cells (allocators × budgets ×
    bit-width sets, each quantized and evaluated; mapped like the per-layer work, see scale.py)
    → league tables → publish (tables, Pareto plot, heatmap, DuckDB)

Run it with `expertbits league` (see `expertbits league --help`) or call `league_table` with a
`LeagueParams`. Stages are cached like the quantize flow's; statistics and calibration are
shared with it.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, unmapped

from expertbits.tasks.records import RunManifest
from expertbits.tasks.stages.league_tasks import publish_league, run_league
from expertbits.tasks.stages.per_layer import league_cells
from expertbits.tasks.stages.quantize_tasks import (
    calibrate_experts,
    check_device,
    check_store,
    extract_statistics,
    fetch_checkpoint,
    fetch_reference,
    pin_revision,
    pin_text,
    route_experts,
)

from .params import LeagueParams
from .scale import (absolute_store, cell_chunks, gather, layer_chunks, on_workers, per_layer, quantizer_parts,
                    task_runner)


@flow(name="expertbits-league", log_prints=True, task_runner=task_runner())
def league_table(params: LeagueParams = LeagueParams()) -> RunManifest:
    """Evaluate every allocator at every budget on one checkpoint pair and publish the league table."""
    p = params
    store = absolute_store(p.store)  # Dask workers resolve a relative path against their own folder
    io = dict(store=store, storage_options=p.storage_options)
    local = dict(cache_dir=p.cache_dir, storage_options=p.storage_options)
    check_store(store, p.storage_options)
    device = check_device(p.device)  # auto resolved once: every process keys alike

    finetuned = fetch_checkpoint(pin_revision(p.checkpoint), p.cache_dir, p.storage_options)
    reference, choice = fetch_reference(finetuned, p.reference, p.cache_dir, p.storage_options)
    calibration_text = pin_text(p.calibration_text, p.cache_dir, p.storage_options)
    eval_text = pin_text(p.eval_text, p.cache_dir, p.storage_options)
    layers = layer_chunks(finetuned, **local)
    stats = extract_statistics(finetuned, reference, per_layer("statistics", layers, checkpoint=finetuned,
                                                               reference=reference, **local), cache_dir=p.cache_dir, **io)
    routing = route_experts(finetuned, calibration_text, p.eval_seq_len, p.calibration_windows, device,
                            cache_dir=p.cache_dir, **io)
    text = dict(text=calibration_text, seq_len=p.eval_seq_len, windows=p.calibration_windows)
    calibrations = []
    for method, symmetric in p.grid().error_keys():  # errors of each quantizer the grid measures
        quantizer = p.grid().quantizer(method, symmetric).as_dict()
        calibrations.append(calibrate_experts(routing, p.widths(symmetric), p.group_size, quantizer, device,
                                              quantizer_parts("calibration", layers, quantizer, text, checkpoint=finetuned,
                                                              routing=routing, bit_widths=p.widths(symmetric),
                                                              group_size=p.group_size, device=device, store=store,
                                                              **local), **io))
    league = dict(checkpoint=finetuned, stats=stats, calibrations=calibrations, grid=asdict(p.grid()),
                  text=eval_text, seq_len=p.eval_seq_len, windows=p.eval_windows, task_name=p.task,
                  task_examples=p.task_examples, device=device)
    cells = gather(league_cells.map(cell_chunks(len(p.grid().cells())),
                                    **{k: unmapped(v) for k, v in dict(league, device=on_workers(device)).items()},
                                    store=unmapped(store), gptq_text=unmapped(text),
                                    **{k: unmapped(v) for k, v in local.items()}))
    result = run_league(**league, cells=cells, cache_dir=p.cache_dir, **io)

    return publish_league(p.model_dump(mode="json"), choice, stats, calibrations, result, **io)
