"""A flaky store: the flow against S3 through a fault-injecting proxy on loopback (tests/support/faultproxy.py:
500s, 503s, connection resets before and after the server acted, delays) completes through
retries, with the same bytes as a run against the healthy server."""

from __future__ import annotations

import pytest
from support.faultproxy import FaultProxy
from support.runner import finish, quantize_args, run_files, run_tables, start

from expertbits.tasks.store import catalog
from expertbits.tasks.store.storage import Store
from expertbits.tasks.store.verify import verify_run

pytestmark = pytest.mark.integration


def test_every_run_completes_through_a_flaky_store_with_the_same_bytes(prefect_api, params, s3, s3_endpoint, tmp_path):
    fs, options = s3
    fs.put(params["checkpoint"] + "/", f"{fs.bucket}/in/ft/", recursive=True)
    fs.put(params["reference"] + "/", f"{fs.bucket}/in/base/", recursive=True)
    config = dict(params, checkpoint=f"s3://{fs.bucket}/in/ft", reference=f"s3://{fs.bucket}/in/base")

    healthy = Store(f"s3://{fs.bucket}/healthy", options)
    proc = start(quantize_args(config, healthy.root, options, cache_dir=str(tmp_path / "c0")), tmp_path / "c0",
                 tmp_path / "healthy.log")
    finish(proc, tmp_path / "healthy.log")
    [ref_id] = catalog.list_runs(healthy).run_id

    report = []
    for i, rate in enumerate((0.05, 0.2)):
        with FaultProxy(s3_endpoint, rate, seed=i) as proxy:
            flaky = {"endpoint_url": proxy.url}
            store = f"s3://{fs.bucket}/flaky-{i}"
            log = tmp_path / f"flaky-{i}.log"
            proc = start(quantize_args(config, store, flaky, cache_dir=str(tmp_path / f"c{i + 1}")), tmp_path / f"c{i + 1}",
                         log)
            finish(proc, log, timeout=900)
        counts = dict(proxy.counts)
        report.append(f"rate {rate:.0%}: {counts['requests']} requests, {proxy.faults} faults injected "
                      f"({', '.join(f'{k} {counts.get(k, 0)}' for k in ('500', '503', 'reset', 'lost', 'delay'))}), "
                      "1 of 1 runs completed")
        assert counts["requests"] > 100 and proxy.faults - counts.get("delay", 0) > 0  # failures, not only delays
        st = Store(store, options)  # read back through the healthy endpoint
        [run_id] = catalog.list_runs(st).run_id
        assert verify_run(st, f"runs/{run_id}")["ok"]
        assert run_files(st, run_id) == run_files(healthy, ref_id)
        assert run_tables(st, run_id, tmp_path) == run_tables(healthy, ref_id, tmp_path)
    print("\nflaky store: " + "; ".join(report))
