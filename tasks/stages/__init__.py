"""The Prefect layer: thin task wrappers around the stage functions (quantize_tasks, league_tasks),
the per-layer and per-cell units a Dask cluster maps (per_layer), and what every stage shares:
cache keys, retries, progress, stage outputs in the store (stage_io).

May import: every other expertbits.tasks subpackage; prefect.
"""
