"""Run `expertbits quantize` as users do, in its own process against the test session's Prefect API,
and read what a store holds: the harness of the kill, concurrency and flaky-store tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from expertbits.tasks.store.storage import Store

STAGES = ("statistics", "routing", "calibration", "allocation", "quantization", "validation", "evaluation")


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "needs the prefect_api fixture"
    return url


def quantize_args(params: dict, store: str, storage_options: dict | None = None, **extra) -> list[str]:
    """CLI arguments of the test flow's configuration (tests/flow/test_flow.py `params`)."""
    p = dict(params, store=store, **extra)
    args = ["quantize"]
    for k, v in p.items():
        if k == "storage_options":
            continue
        args += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    for k, v in (storage_options or {}).items():
        args += ["--storage-option", f"{k}={v}"]
    return args


def start(args: list[str], cache: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """`python -m expertbits.flows.cli ARGS` in a new process group, output to `log`."""
    full = dict(os.environ, PREFECT_API_URL=api_url(), EXPERTBITS_CACHE=str(cache), OMP_NUM_THREADS="1",
                **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "expertbits.flows.cli", *args], env=full,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the flow's whole process group: no handler, no cleanup runs."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"the flow did not finish in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
    assert rc == 0, f"exit {rc}:\n{log.read_text()[-4000:]}"


def done_stages(store: Store) -> set[str]:
    """The stages whose output is complete in the store (`_stage.json` written)."""
    if not store.is_local:
        store.fs.invalidate_cache()
    return {s for s in STAGES if store.fs.glob(store._path(f"objects/{s}/*/_stage.json"))}


def layer_shards_written(store: Store) -> bool:
    """A per-layer quantized shard is in the store while the quantization stage is not complete."""
    if not store.is_local:
        store.fs.invalidate_cache()
    return any("_stage.json" not in store.list(f"objects/quantization/{key}")
               and any(f.endswith(".safetensors") for f in store.list(f"objects/quantization/{key}"))
               for key in store.list_dirs("objects/quantization"))


def until(check, timeout: float, every: float = 0.05, proc: subprocess.Popen | None = None) -> bool:
    """Poll `check` until true (True), the process ends or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(check())
        time.sleep(every)
    return False


def run_files(store: Store, run_id: str) -> dict[str, str]:
    """A run's manifest file list without the DuckDB file (its format is not byte-reproducible)."""
    files = json.loads(store.read_bytes(f"runs/{run_id}/manifest.json"))["files"]
    return {k: v for k, v in files.items() if k != "expertbits.duckdb"}


def run_tables(store: Store, run_id: str, tmp: Path) -> dict[str, list]:
    """Every table of a run's DuckDB, sorted rows: what its readers see."""
    local = store.get_file(f"runs/{run_id}/expertbits.duckdb", tmp / f"{run_id}.duckdb")
    con = duckdb.connect(str(local), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
        return {n: sorted(map(repr, con.execute(f'SELECT * FROM "{n}"').fetchall())) for n in names}
    finally:
        con.close()
