"""Four `expertbits quantize` processes at once on one store (two identical, two different budgets),
on a local store and on S3, sharing one checkpoint cache: all complete, every run's manifest
verifies, the catalog lists exactly the three distinct runs. And two watchers at once never
announce one checkpoint twice."""

from __future__ import annotations

import shutil

import pytest
from support.runner import finish, quantize_args, run_files, start

from expertbits.tasks.store import catalog
from expertbits.tasks.store.publish import INCOMING
from expertbits.tasks.store.storage import Store
from expertbits.tasks.store.verify import verify_run

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("where", ["local", "s3"])
def test_four_runs_at_once_on_one_store(where, prefect_api, params, s3, tmp_path):
    fs, options = s3
    store = Store(str(tmp_path / "store")) if where == "local" else Store(f"s3://{fs.bucket}/store", options)
    opts = options if where == "s3" else None
    cache = tmp_path / "cache"  # shared by all four: concurrent downloads of one checkpoint too
    budgets = [2.5, 2.5, 2.75, 3.0]
    procs = [(start(quantize_args(params, store.root, opts, avg_bits=b, cache_dir=str(cache)), cache,
                    tmp_path / f"run{i}.log"), tmp_path / f"run{i}.log") for i, b in enumerate(budgets)]
    for proc, log in procs:
        finish(proc, log, timeout=900)

    runs = catalog.list_runs(store)
    assert sorted(runs.avg_bits) == [2.5, 2.75, 3.0], runs  # the identical pair is one run
    for run_id in runs.run_id:
        report = verify_run(store, f"runs/{run_id}")
        assert report["ok"], report
    kl = catalog.query(store, "KL against bits across runs")  # the catalog SQL reads every manifest whole
    assert sorted(kl.avg_bits) == [2.5, 2.75, 3.0] and kl.kl.between(0, 1).all()
    # runs that share stages share their bytes: statistics are the same in all three
    stats = {run_files(store, r)["statistics/expert_stats.parquet"] for r in runs.run_id}
    assert len(stats) == 1
    assert store.list(INCOMING) == []  # every publish finished and cleaned up


WATCH = """
import json, sys
from expertbits.flows.params import WatchParams
from expertbits.flows.watch import watch_checkpoints
params = WatchParams(name=sys.argv[1], prefixes=[sys.argv[2]], store=sys.argv[3])
print("ANNOUNCED " + json.dumps([a["uri"] for a in watch_checkpoints(params)]))
"""


def test_two_watchers_at_once_never_announce_a_checkpoint_twice(prefect_api, micro_pair, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from support.runner import api_url

    _, ft = micro_pair
    for i in range(6):
        shutil.copytree(ft, tmp_path / "in" / f"m{i}")
    env = dict(os.environ, PREFECT_API_URL=api_url())
    procs = [subprocess.Popen([sys.executable, "-c", WATCH, name, str(tmp_path / "in"), str(tmp_path / "store")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("watch-a", "watch-b")]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    announced = [uri for out in outs for line in out.splitlines() if line.startswith("ANNOUNCED ")
                 for uri in json.loads(line.removeprefix("ANNOUNCED "))]
    assert sorted(announced) == sorted(str(tmp_path / "in" / f"m{i}") for i in range(6)), outs
