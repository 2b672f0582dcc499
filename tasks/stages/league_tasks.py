"""Prefect tasks of the league flow (caching rules in `stage_io.py`; its first stages are `quantize_tasks.py`'s).

    league        allocators × budgets × bit-width sets (and servable variants), each quantized and evaluated
    publish       leagues/<id>/: tables, figures, one DuckDB, manifest.json last
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from ..measure import league, plots
from ..placement import key as placement_key
from ..records import CheckpointRecord, ReferenceChoice, RunManifest, StageOutput, TextRecord
from ..store import publish, tables
from ..store.storage import Store
from .stage_io import (
    cache_key,
    read_calibration,
    stage_key,
    stage_work,
    transient,
)


def league_key(checkpoint: CheckpointRecord, stats: StageOutput, calibrations: list[StageOutput], grid: dict,
               text: TextRecord, seq_len: int, windows: int, task_name: str | None, task_examples: int,
               device: str) -> str:
    return stage_key("league", checkpoint.digest, stats.key, [c.key for c in calibrations], grid, text.digest, seq_len,
                     windows, task_name, task_examples, placement_key(device), league.task_data(task_name))


@task(name="league", cache_key_fn=cache_key("league", league_key), persist_result=True, result_serializer="json")
def run_league(checkpoint: CheckpointRecord, stats: StageOutput, calibrations: list[StageOutput], grid: dict,
               text: TextRecord, seq_len: int, windows: int, task_name: str | None, task_examples: int, device: str,
               cells: list[list[dict]], store: str, storage_options: dict, cache_dir: str | None) -> StageOutput:
    """The tables and the figures of every cell of the grid (each quantized and evaluated by
    `per_layer.league_cells`).

    `calibrations` holds one calibration per quantizer of the grid, in `Grid.error_keys()` order."""
    key = league_key(checkpoint, stats, calibrations, grid, text, seq_len, windows, task_name, task_examples, device)
    g = league.Grid.from_dict(grid)
    with stage_work("league", key, store, storage_options) as w:
        table = tables.read_stats(w.read(stats) / "expert_stats.parquet")
        calib, qerr = read_calibration(w.store, calibrations[0], w.tmp / "calibration")
        rows, allocs = league.gather([cell for chunk in cells for cell in chunk])
        summary = league.summarize(rows)
        out = w.out
        for name, frame in (("league", rows), ("league_summary", summary), ("league_allocation", allocs)):
            tables.export_parquet(frame, out / f"{name}.parquet")
        title = checkpoint.uri
        corr = league.diagnostics(table, calib, qerr)
        tables.export_parquet(corr.reset_index(names="signal"), out / "signal_correlation.parquet")
        (out / "league.md").write_text(f"# League table: {title}\n\n{league.markdown(summary)}\n{league.correlation_markdown(corr)}")
        plots.pareto(summary, out / "pareto.png", title)
        if cell := g.heatmap_cell():
            plots.heatmap(allocs, out / "heatmap.png", *cell, title)
        best = summary[summary["rank"] == 1].groupby("variant").size().sort_values(ascending=False)
        get_run_logger().info(f"league: {len(rows)} cells; allocators ranked first: {best.to_dict()}")
        return w.publish({"cells": len(rows), "ranked_first": best.to_dict(), "task": task_name, "text": text.uri})


@task(name="publish-league", retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=transient)
def publish_league(parameters: dict, reference: ReferenceChoice, stats: StageOutput, calibrations: list[StageOutput],
                   result: StageOutput, store: str, storage_options: dict) -> RunManifest:
    """leagues/<id>/ with every table, both figures, one DuckDB, and manifest.json written last."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    st = Store(store, storage_options)
    outputs = {"statistics": stats, **{("calibration" if i == 0 else f"calibration-{i}"): c for i, c in enumerate(calibrations)},
               "league": result}
    manifest = publish.publish(st, publish.run_id(parameters["checkpoint"], list(outputs.values())), outputs,
                               parameters, root="leagues",
                               notes={"reference": reference.model_dump()})
    rid = manifest.run_id
    with tempfile.TemporaryDirectory() as tmp:
        summary = tables.read_parquet(st.get_file(f"{result.prefix}/league_summary.parquet", Path(tmp) / "summary.parquet"))
        md = st.get_file(f"{result.prefix}/league.md", Path(tmp) / "league.md").read_text()
    create_table_artifact(key=f"league-{rid}"[:100].lower(), table=json.loads(summary.to_json(orient="records")),
                          description=f"League table of {parameters['checkpoint']}")
    create_markdown_artifact(key=f"league-md-{rid}"[:100].lower(), description="League table", markdown=(
        f"{md}\n\nFigures: `{manifest.uri}/league/pareto.png`, `{manifest.uri}/league/heatmap.png`\n"))
    get_run_logger().info(f"league published: {manifest.uri}/manifest.json")
    return manifest
