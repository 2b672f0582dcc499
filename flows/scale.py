"""Where the per-layer work and the league's cells run: one process, or a Dask cluster.

    EXPERTBITS_DASK unset          one process; each stage's layers run in order in one task
    EXPERTBITS_DASK=local[:N]      a local Dask cluster of N worker processes (default 2)
    EXPERTBITS_DASK=local-cuda[:N] a local Dask cluster of one worker process per GPU (the first N)
    EXPERTBITS_DASK=tcp://host:8786  an existing Dask scheduler

`local-cuda` is what dask-cuda's LocalCUDACluster does, built on distributed's own SpecCluster:
each worker's nanny starts it with CUDA_VISIBLE_DEVICES naming its own GPU first, so the flow's
`--device auto` (resolved to `cuda`) means that worker's GPU there and the layers spread over the GPUs.
(dask-cuda 26.10 itself pins dask 2026.7.1, below the project's pin.) What runs in parallel
there: the per-layer stages (RTN calibration error, RTN quantization, kernel validation) and the
league's RTN cells; sequential GPTQ is one task (layer l+1 is calibrated on the quantized layer
l), and so are the routing and evaluation forwards (each one streamed pass over the layers).

The flows read it when they are imported (`expertbits quantize --dask ...` sets it; a deployment
sets it as a job variable: `--job-variable env='{"EXPERTBITS_DASK": "tcp://..."}'`). On Dask,
every MoE layer of a per-layer stage is its own Prefect task and the league's cells go in small
chunks, all through prefect-dask's DaskTaskRunner; a task whose worker dies is run again on
another worker. The results are byte-identical whichever way they ran (tested).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from prefect import unmapped
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.quantization.method import QuantizerConfig
from expertbits.tasks.records import CheckpointRecord
from expertbits.tasks.stages.per_layer import layer_work, sequential_work
from expertbits.tasks.stages.stage_io import ckpt_path

ENV = "EXPERTBITS_DASK"
TASKS_PER_THREAD = 3  # league cells go in this many tasks per worker thread: enough to spread, few
                      # enough to amortise a Prefect task run (~1 s of bookkeeping each on 2 cores)


def task_runner(address: str | None = None):
    """The task runner for `address` (default: $EXPERTBITS_DASK)."""
    address = address if address is not None else os.environ.get(ENV, "")
    if not address:
        return ThreadPoolTaskRunner(max_workers=1)  # one layer at a time: memory stays one layer's
    import dask
    from prefect_dask import DaskTaskRunner

    if address.startswith("local"):
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers; with this workload's large
        # short-lived tensors that halves the speed (league cells: 156 s instead of 86 s in one
        # process). Unset, glibc's adaptive default applies. Remote workers: NO_MALLOC_TRIM below.
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    if address == "local-cuda" or address.startswith("local-cuda:"):
        return DaskTaskRunner(cluster_class="distributed.SpecCluster",
                              cluster_kwargs=cuda_cluster(address.partition(":")[2]))
    if address == "local" or address.startswith("local:"):
        workers = int(address.partition(":")[2] or 2)
        # one thread per worker process: each task is already as parallel as torch makes it
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                 # loopback only: no dashboard on every interface
                                                 "host": "127.0.0.1", "dashboard_address": None})
    return DaskTaskRunner(address=address)


def cuda_cluster(count: str = "", visible: list[str] | None = None) -> dict:
    """SpecCluster arguments for one worker process per GPU (the first `count`, default all): worker
    i's CUDA_VISIBLE_DEVICES lists its GPU first (then the others, as dask-cuda does, so peer
    access still works). The GPUs are those this process may use: its own CUDA_VISIBLE_DEVICES
    (indices or UUIDs, e.g. a scheduler's allocation) when set. A machine without a GPU is refused
    here, before any process starts."""
    from distributed import Nanny, Scheduler

    from expertbits.tasks.errors import ExpertbitsError

    if visible is None:
        import torch

        count_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        inherited = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        visible = inherited[:count_here] if inherited else [str(i) for i in range(count_here)]
    if not visible:
        raise ExpertbitsError("--dask local-cuda: this machine has no CUDA device", "use --dask local[:N] for CPU "
                              "worker processes, or run on a machine with GPUs", "dask")
    if count and (not count.isdigit() or not 1 <= int(count) <= len(visible)):
        raise ExpertbitsError(f"--dask local-cuda:{count}: this machine has {len(visible)} GPUs",
                              f"give a count from 1 to {len(visible)}, or local-cuda for all of them", "dask")
    gpus = visible[: int(count)] if count else visible
    # one thread per worker: a task's kernels already fill its GPU; loopback only, no dashboard
    workers = {f"gpu-{g}": {"cls": Nanny, "options": {
        "nthreads": 1, "host": "127.0.0.1", "dashboard_address": None,
        "env": {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus[i:] + gpus[:i]))}}}
        for i, g in enumerate(gpus)}
    # loopback only; its HTTP endpoints (health, dashboard) on a free loopback port
    return {"workers": workers, "scheduler": {"cls": Scheduler, "options": {"host": "127.0.0.1",
                                                                               "dashboard_address": "127.0.0.1:0"}}}


def absolute_store(store: str) -> str:
    """A local store as an absolute path: workers resolve a relative one against their own folder."""
    if "://" in store and not store.startswith("file://"):
        return store
    return str(Path(store.removeprefix("file://")).expanduser().resolve())


@contextmanager
def shared_api(address: str | None):
    """An API the Dask workers can report to. Without PREFECT_API_URL each process would start its
    own temporary server and the workers' task runs would be invisible to the flow's; so for a
    local cluster one temporary server is started here and its URL put in the environment the
    workers inherit. Workers of a remote scheduler cannot reach it: they need PREFECT_API_URL."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    address = address if address is not None else os.environ.get(ENV, "")
    if address and not address.startswith("local") and not any(h in address for h in ("127.0.0.1", "localhost")):
        from expertbits.tasks.errors import ExpertbitsError

        raise ExpertbitsError(f"the Dask workers of {address} need a Prefect API they can reach, and PREFECT_API_URL "
                              "is not set", "start a Prefect server (prefect server start, or expertbits dev up) and set "
                              "PREFECT_API_URL to its address on this machine and on the workers")
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # the run's last log lines reach the server before it stops
        del os.environ["PREFECT_API_URL"]
        server.stop()


# what a `dask worker` started elsewhere needs in its environment for the same effect
# (a dict literal: Dask lower-cases the key of a single-key variable, which would miss the real one)
NO_MALLOC_TRIM = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": "{'MALLOC_TRIM_THRESHOLD_': None}"}


def on_dask() -> bool:
    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"


def on_workers(device: str) -> str:
    """The flow's resolved device as the Dask workers' tasks get it: on a `local-cuda` cluster each
    worker sees its own GPU first, so `cuda:N` (which the flow's own stages use) becomes `cuda`
    there, that worker's GPU; the keys are the same (placement.key)."""
    runner = FlowRunContext.get().task_runner if FlowRunContext.get() else None
    local_cuda = on_dask() and any(str(w).startswith("gpu-") for w in
                                   (getattr(runner, "cluster_kwargs", None) or {}).get("workers", {}))
    return "cuda" if local_cuda and device.startswith("cuda:") else device


def chunks(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def layer_chunks(checkpoint: CheckpointRecord, cache_dir: str | None, storage_options: dict) -> list[list[int]]:
    """MoE layer positions, one list per task: one layer each on Dask, all in one task otherwise."""
    with Checkpoint.open(ckpt_path(checkpoint, cache_dir, storage_options)) as ckpt:
        n = len(detect(ckpt).layers)
    return chunks(n, 1 if on_dask() else n)


def cell_chunks(n: int) -> list[list[int]]:
    """League cells, one list per task: all in one task in one process; on Dask, about
    TASKS_PER_THREAD tasks per worker thread."""
    if not on_dask():
        return chunks(n, n)
    try:
        threads = sum(FlowRunContext.get().task_runner.client.nthreads().values())
    except Exception:  # a scheduler that cannot say: assume two workers
        threads = 2
    return chunks(n, max(1, -(-n // (TASKS_PER_THREAD * max(1, threads)))))


def per_layer(stage: str, layers: list[list[int]], **inputs) -> list[list[dict]]:
    """The stage's `layer_work` mapped over the chunks of layers, waited for: a layer that fails
    fails the flow with its own error, before the stage's gathering task runs."""
    if "device" in inputs:
        inputs = dict(inputs, device=on_workers(inputs["device"]))
    return gather(layer_work.map(unmapped(stage), layers, unmapped(inputs)))


def quantizer_parts(stage: str, layers: list[list[int]], quantizer: dict, text: dict, **inputs) -> list[list[dict]]:
    """A quantizer-dependent stage's parts: per layer for the data-free quantizers (RTN), one
    sequential pass over every layer for GPTQ (layer l+1 is calibrated on the quantized layer l's
    outputs), run on a worker like any task; `text` is GPTQ's calibration (the pinned text, seq_len, windows)."""
    if QuantizerConfig.from_dict(quantizer).calibrated:
        inputs = dict(inputs, device=on_workers(inputs["device"]))
        return [sequential_work.submit(stage, dict(inputs, quantizer=quantizer, text=text)).result()]
    return per_layer(stage, layers, quantizer=quantizer, **inputs)


def gather(futures) -> list:
    return futures.result()  # raises the first failed task's exception
