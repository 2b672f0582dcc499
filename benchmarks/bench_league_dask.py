"""Wall time of the league flow in one process and on a local Dask cluster of 1 and 2 workers.

Each run is `expertbits league` on the same pair and grid (the default one: every allocator ×
5 budgets × 2 bit sets + the servable variants), into a fresh store, with Prefect's cache
refreshed so every task computes; the tables must come out the same (checked, timing columns
aside). The per-layer stages are tiny on zoo models; the cells are the work.

    python benchmarks/bench_league_dask.py [--pair mixtral-tiny/wordnet] [--workers 0,1,2] [--json out.json]

Worker count 0 is the single-process default.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from expertbits.tasks.store.tables import read_parquet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="mixtral-tiny/wordnet", help="zoo family/variant (its parent is the reference)")
    p.add_argument("--reference", default=None, help="default: zoo://<family>/base")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    family = args.pair.split("/")[0]
    reference = args.reference or f"zoo://{family}/base"
    results, tables = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-league-") as tmp:
        for n in (int(x) for x in args.workers.split(",")):
            store = Path(tmp) / f"store-{n}"
            cmd = ["expertbits", "league", "--checkpoint", f"zoo://{args.pair}", "--reference", reference,
                   "--store", str(store)] + (["--dask", f"local:{n}"] if n else [])
            env = dict(os.environ, PREFECT_TASKS_REFRESH_CACHE="true")
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            results[n] = time.perf_counter() - start
            league = next(store.glob("leagues/*/league/league.parquet"))
            tables[n] = read_parquet(league).drop(columns="allocation_ms")
            print(f"{'one process' if n == 0 else f'{n} Dask worker(s)'}: {results[n]:.0f} s, {len(tables[n])} cells",
                  flush=True)
    first = next(iter(tables.values()))
    same = all(t.equals(first) for t in tables.values())
    print(f"tables identical across runs: {same}")
    if args.json:
        args.json.write_text(json.dumps({"seconds": results, "identical": same, "cells": len(first)}, indent=2))
    if not same:
        raise SystemExit("the league tables differ between runs")


if __name__ == "__main__":
    main()
