"""The league flow: which allocator is best at each budget, measured on your checkpoint.

    download → statistics → calibration → league (allocators × budgets × bit-width sets,
    each quantized and evaluated) → publish (tables, Pareto plot, heatmap, DuckDB)

Run it with `expertbits league` (see `expertbits league --help`) or call `league_table` with a
`LeagueParams`. Stages are cached like the quantize flow's; statistics and calibration are
shared with it.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow

from expertbits.tasks.league_stages import publish_league, run_league
from expertbits.tasks.records import RunManifest
from expertbits.tasks.stages import calibrate_experts, check_store, extract_statistics, fetch_checkpoint

from .params import LeagueParams


@flow(name="expertbits-league", log_prints=True)
def league_table(params: LeagueParams = LeagueParams()) -> RunManifest:
    """Evaluate every allocator at every budget on one checkpoint pair and publish the league table."""
    p = params
    io = dict(store=p.store, storage_options=p.storage_options)
    check_store(p.store, p.storage_options)

    finetuned = fetch_checkpoint(p.checkpoint, p.cache_dir, p.storage_options)
    reference = fetch_checkpoint(p.reference, p.cache_dir, p.storage_options) if p.reference else None
    stats = extract_statistics(finetuned, reference, cache_dir=p.cache_dir, **io)
    calibrations = [calibrate_experts(finetuned, p.calibration_text, p.eval_seq_len, p.calibration_windows,
                                      p.widths(symmetric), p.group_size, symmetric, cache_dir=p.cache_dir, **io)
                    for symmetric in p.grid().symmetric]  # errors of each quantizer the grid measures
    result = run_league(finetuned, stats, calibrations, asdict(p.grid()), p.eval_text, p.eval_seq_len, p.eval_windows,
                        p.task, p.task_examples, cache_dir=p.cache_dir, **io)

    return publish_league(p.model_dump(mode="json"), stats, calibrations, result, **io)
