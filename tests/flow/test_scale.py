"""Scale-out on a Dask cluster of worker processes: the same bytes, and a killed worker survived."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A random Mixtral pair big enough that one layer's work takes seconds: a worker can be killed mid-task."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertbits.zoo import ROOT

    out = tmp_path_factory.mktemp("slow")
    config = MixtralConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           pad_token_id=1, eos_token_id=0, bos_token_id=0)
    paths = []
    for name, seed in (("base", 0), ("ft", 1)):
        torch.manual_seed(0)
        model = MixtralForCausalLM(config)
        if seed:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("gate.weight"):
                        p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(out / name, max_shard_size="20MB")  # several shards: workers fetch only their layer's
        for f in (ROOT / "tokenizer").iterdir():
            (out / name / f.name).write_bytes(f.read_bytes())
        paths.append(out / name)
    return paths[0], paths[1]


@pytest.fixture
def cluster(prefect_api, tmp_path):
    """A Dask scheduler and two worker processes (each behind a nanny that restarts it), reporting to
    the session's Prefect API with the flow's result storage."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    from expertbits.flows.scale import NO_MALLOC_TRIM

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1",
               PREFECT_LOCAL_STORAGE_PATH=str(PREFECT_LOCAL_STORAGE_PATH.value()),
               EXPERTBITS_CACHE=str(tmp_path / "worker-cache"),  # the workers' own cache, as on other machines
               **NO_MALLOC_TRIM)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for _ in range(2):
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard", "--local-directory", str(tmp_path / "dask")],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    from distributed import Client

    client = Client(address, timeout=60)
    client.wait_for_workers(2, timeout=120)
    yield address, client
    client.close()
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(pair, store: Path, cache: Path | None):
    from expertbits.flows.params import QuantizeParams
    from expertbits.zoo import text_path

    text = store.parent.parent / "text.txt"
    text.write_text(text_path("code-heldout").read_text())
    return QuantizeParams(checkpoint=str(pair[1]), reference=str(pair[0]), store=str(store),
                          cache_dir=str(cache) if cache else None,
                          avg_bits=2.5, bit_widths=[2, 3], group_size=64, quantizer="rtn", eval_text=str(text),
                          calibration_text=str(text),
                          eval_windows=4, calibration_windows=4, eval_seq_len=64)


class Killer(threading.Thread):
    """SIGKILLs the first worker seen running a per-layer task for `after` seconds (once)."""

    def __init__(self, client, stage: str, after: float = 0.3):
        super().__init__(daemon=True)
        self.client, self.stage, self.after, self.killed, self.stop = client, stage, after, None, threading.Event()

    def run(self):
        seen: dict[str, float] = {}
        while not self.stop.is_set() and self.killed is None:
            for worker, keys in self.client.processing().items():
                if any(self.stage in str(k) for k in keys):
                    first = seen.setdefault(worker, time.monotonic())
                    if time.monotonic() - first >= self.after:
                        pid = self.client.run(os.getpid, workers=[worker])[worker]
                        os.kill(pid, signal.SIGKILL)
                        self.killed = (worker, pid)
                        return
                else:
                    seen.pop(worker, None)
            time.sleep(0.05)


def test_dask_run_is_byte_identical_and_survives_a_killed_worker(slow_pair, cluster, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings
    from prefect_dask import DaskTaskRunner

    from expertbits.flows.quantize import quantize_moe

    address, client = cluster
    single = quantize_moe(_params(slow_pair, tmp_path / "one" / "store", tmp_path / "one" / "cache"))
    killer = Killer(client, "layer_work")
    killer.start()
    try:  # every task computes again (no cache hit from the first run), on the workers
        dask_flow = quantize_moe.with_options(task_runner=DaskTaskRunner(address=address))
        monkeypatch.setenv("EXPERTBITS_CACHE", str(tmp_path / "two" / "cache"))  # the flow's; the workers have theirs
        with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
            spread = dask_flow(_params(slow_pair, tmp_path / "two" / "store", None))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no per-layer task ran long enough on a worker to be killed"
    # every artifact byte for byte (the DuckDB file format itself is not byte-reproducible; its tables are);
    # the run ids differ only because the stores do
    assert {k: v for k, v in spread.files.items() if k != "expertbits.duckdb"} == {
        k: v for k, v in single.files.items() if k != "expertbits.duckdb"}
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker
    # the workers fetched shards into their own cache, never a whole checkpoint
    worker_cache = tmp_path / "worker-cache"
    assert list((worker_cache / "partial").iterdir()) and not (worker_cache / "checkpoints").exists()


def test_league_on_dask_gives_the_same_table(micro_pair, cluster, tmp_path):
    """The league's cells, spread over the workers in chunks, give the single-process table."""
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings
    from prefect_dask import DaskTaskRunner

    from expertbits.flows.league import league_table
    from expertbits.flows.params import LeagueParams
    from expertbits.tasks.store.tables import read_parquet
    from expertbits.zoo import text_path

    address, _ = cluster
    base, ft = micro_pair
    (tmp_path / "eval.txt").write_text(text_path("code-heldout").read_text()[:60_000])

    def params(store: str) -> LeagueParams:
        return LeagueParams(checkpoint=str(ft), reference=str(base), allocators=["uniform", "paper", "random", "pmq"],
                            budgets=[2.5, 3.0], bit_sets=[[2, 3, 4]], random_draws=2, group_size=32,
                            store=str(tmp_path / store), eval_text=str(tmp_path / "eval.txt"),
                            calibration_text=str(tmp_path / "eval.txt"), eval_windows=2, calibration_windows=2,
                            eval_seq_len=64)

    one = league_table(params("one"))
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        two = league_table.with_options(task_runner=DaskTaskRunner(address=address))(params("two"))
    tables = [read_parquet(Path(m.uri) / "league" / "league.parquet").drop(columns="allocation_ms") for m in (one, two)]
    assert len(tables[0]) > 8
    assert tables[0].equals(tables[1])
    allocs = [read_parquet(Path(m.uri) / "league" / "league_allocation.parquet") for m in (one, two)]
    assert allocs[0].equals(allocs[1])


def test_task_runner_choice():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from expertbits.flows.scale import chunks, task_runner

    local = task_runner("")
    assert isinstance(local, ThreadPoolTaskRunner) and local._max_workers == 1  # one layer in memory at a time
    three = task_runner("local:3")
    assert isinstance(three, DaskTaskRunner) and three.cluster_kwargs["n_workers"] == 3
    assert task_runner("tcp://10.0.0.1:8786").address == "tcp://10.0.0.1:8786"
    assert chunks(5, 2) == [[0, 1], [2, 3], [4]] and chunks(3, 3) == [[0, 1, 2]]


def test_local_cuda_gives_each_worker_process_its_own_gpu():
    """--dask local-cuda: one worker process per GPU, each seeing its own first (as dask-cuda does),
    so the flow's `--device auto` (made `cuda`) is each worker's own GPU. Started for real here with two pretend GPU ids
    (the workers only report their environment); without a GPU it is refused before any process."""
    from distributed import Client, SpecCluster

    from expertbits.flows.scale import cuda_cluster, task_runner
    from expertbits.tasks.errors import ExpertbitsError

    if not torch.cuda.is_available():
        for address in ("local-cuda", "local-cuda:2"):
            with pytest.raises(ExpertbitsError, match="--dask local-cuda: this machine has no CUDA device") as e:
                task_runner(address)
            assert "--dask local" in e.value.fix
    with pytest.raises(ExpertbitsError, match="local-cuda:3: this machine has 2 GPUs"):
        cuda_cluster("3", visible=["2", "3"])
    spec = cuda_cluster("", visible=["2", "3"])  # e.g. CUDA_VISIBLE_DEVICES=2,3 from a batch scheduler
    assert [w["options"]["env"]["CUDA_VISIBLE_DEVICES"] for w in spec["workers"].values()] == ["2,3", "3,2"]
    assert cuda_cluster("1", visible=["2", "3"])["workers"].keys() == {"gpu-2"}
    with SpecCluster(**spec, asynchronous=False) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        assert cluster.scheduler.address.startswith("tcp://127.0.0.1:")  # loopback only
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
    assert sorted(seen.values()) == ["2,3", "3,2"]
    # a flow's cuda:N is GPU N for its own stages; its local-cuda workers get cuda, each its own GPU
    from types import SimpleNamespace

    from prefect_dask import DaskTaskRunner

    import expertbits.flows.scale as scale

    runner = DaskTaskRunner(cluster_class="distributed.SpecCluster", cluster_kwargs=spec)
    ctx = SimpleNamespace(task_runner=runner)
    original = scale.FlowRunContext
    try:
        scale.FlowRunContext = SimpleNamespace(get=lambda: ctx)
        assert [scale.on_workers(d) for d in ("cuda:1", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
        ctx.task_runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2})  # a CPU cluster: as given
        assert scale.on_workers("cuda:1") == "cuda:1"
    finally:
        scale.FlowRunContext = original


def test_a_worker_fetches_only_the_shards_of_its_layers(slow_pair, tmp_path):
    from expertbits.tasks.allocation import statistics
    from expertbits.tasks.checkpoints import fetch
    from expertbits.tasks.checkpoints.adapters import block_of, detect
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.quantization.writer import quantize_layer
    from expertbits.tasks.records import CheckpointRecord
    from expertbits.tasks.stages.stage_io import layer_path

    full = fetch.download(str(slow_pair[1]), tmp_path / "flow")
    record = CheckpointRecord(uri=str(slow_pair[1]), digest=full.digest, path=str(full.path),
                              files=fetch.file_digests(full.path))
    shards = sorted(n for n in record.files if n.endswith(".safetensors"))
    part = layer_path(record, [1], tmp_path / "worker", {})
    assert part == tmp_path / "worker" / "partial" / full.digest
    fetched = sorted(p.name for p in part.glob("*.safetensors"))
    with Checkpoint.open(full.path) as c:
        block = block_of(detect(c).layers[1].router_key)
        assert fetched == sorted({i.file for k, i in c.tensors.items() if block_of(k) == block})
    assert 0 < len(fetched) < len(shards) and all((part / (s + ".header.json")).is_file() for s in shards)
    with Checkpoint.open(part) as p, Checkpoint.open(full.path) as f:
        assert p.tensors == f.tensors  # the whole layout, from headers
        assert statistics.collect_layer(p, None, 1) == statistics.collect_layer(f, None, 1)
        alloc = pd.DataFrame([{"layer": m.layer, "expert": m.expert, "bits": 3} for m in detect(f).matrices])
        (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
        a = quantize_layer(p, 1, alloc, 64, False, tmp_path / "a")
        b = quantize_layer(f, 1, alloc, 64, False, tmp_path / "b")
    assert (tmp_path / "a" / a["file"]).read_bytes() == (tmp_path / "b" / b["file"]).read_bytes()
    # a shard changed at the source since the download is refused, by name
    victim = next(s for s in shards if s not in fetched)
    with Checkpoint.open(full.path) as c:
        other = next(i for i, layer in enumerate(detect(c).layers)
                     if any(c.tensors[m.key].file == victim for m in layer.matrices))
    data = bytearray((slow_pair[1] / victim).read_bytes())
    data[-1] ^= 1
    (tmp_path / "src").mkdir()
    for f in slow_pair[1].iterdir():
        (tmp_path / "src" / f.name).write_bytes(data if f.name == victim else f.read_bytes())
    moved = record.model_copy(update={"uri": str(tmp_path / "src")})
    with pytest.raises(fetch.CheckpointError, match=f"{victim} changed since"):
        layer_path(moved, [other], tmp_path / "worker2", {})
    # a shard whose header is damaged at the source is refused when only its header is read, as a local file is
    (tmp_path / "src3").mkdir()
    for f in slow_pair[1].iterdir():
        raw = f.read_bytes()
        (tmp_path / "src3" / f.name).write_bytes((1 << 40).to_bytes(8, "little") + raw[8:] if f.name == victim else raw)
    damaged = record.model_copy(update={"uri": str(tmp_path / "src3")})
    with pytest.raises(fetch.CheckpointError, match=f"{victim}: corrupt: safetensors header length"):
        layer_path(damaged, [1], tmp_path / "worker3", {})


def test_a_worker_that_cannot_see_a_local_store_is_told_the_fix(tmp_path):
    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.records import StageOutput
    from expertbits.tasks.stages.stage_io import local_copy
    from expertbits.tasks.store.storage import Store

    out = StageOutput(stage="routing", key="k", prefix="objects/routing/k", files={"moments.safetensors": "0"}, summary={})
    with pytest.raises(ExpertbitsError, match=r"not on this machine(.|\n)*s3://"):
        local_copy(Store(str(tmp_path / "store")), out, tmp_path)
