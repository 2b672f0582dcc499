"""Time the statistics stage reading per-expert statistics from a Mixtral-8x7B-shaped checkpoint.

Builds a synthetic sharded Hugging Face Mixtral checkpoint (fine-tuned) and a reference with
8x7B expert shapes (hidden 4096, intermediate 14336, 8 experts, per-expert w1/w2/w3 keys) and
random weights, then reads what ``statistics.collect`` reads (both routers of every layer and
every expert's w1, the gate role) by four routes:

* ``statistics.collect``  collect(Checkpoint.open(ft), Checkpoint.open(ref)): the stage itself
* ``get_tensor only``     safe_open(...).get_tensor(key), untouched; safetensors 0.8 returns an
                          mmap-backed tensor, so this times the lookups, not the bytes
* ``get_tensor + clone``  the same, copied once: the plain read the ratios are taken against
* ``raw file read``       Python file reads of the same byte ranges into a bytearray

Each route runs in a fresh subprocess: one warm-up pass, then --repeats timed passes; GB/s is
tensor bytes (1 GB = 1e9 B) over the median. The page cache is not dropped (that needs root),
so the default figures are warm-cache ones, the CPU cost of the read path; --cold asks the
kernel to evict the shards before every pass (posix_fadvise, best effort). Peak RSS includes
mapped file pages, which the kernel can reclaim; peak anon is what the route allocates, to set
beside the largest tensor read and an import-only subprocess.

Routers live in a small last shard of their own, so the reference hard-links the fine-tuned
expert shards (collect never reads its experts) and differs only in its routers: the pair
takes ~2.8 GB of disk per layer.

    python benchmarks/bench_statistics.py [--layers 2] [--repeats 3] [--dtype bf16] [--cold]
        [--workdir DIR] [--keep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics as stats
import struct
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertbits.tasks.allocation import statistics
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint

HIDDEN, INTER, EXPERTS = 4096, 14336, 8
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROUTES = {"statistics": "statistics.collect", "get_tensor": "get_tensor only (lazy)",
          "clone": "get_tensor + clone", "raw": "raw file read"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="MoE layers (~2.8 GB of disk each)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes after one warm-up")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--cold", action="store_true", help="evict the shards from the page cache before each pass")
    p.add_argument("--workdir", type=Path, help="where to build the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints; a rerun with the same --workdir reuses them")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--measure", choices=[*ROUTES, "import"], help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(root: Path, layers: int, dtype: torch.dtype) -> None:
    config = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_local_experts": EXPERTS,
              "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
              "vocab_size": 32000, "torch_dtype": str(dtype).removeprefix("torch.")}
    ft, ref = root / "ft", root / "ref"
    # config.json is written last, so a matching one means a complete earlier build.
    if all((p / "config.json").is_file() and json.loads((p / "config.json").read_text()) == config for p in (ft, ref)):
        print(f"reusing the checkpoints in {root}")
        return
    shutil.rmtree(root, ignore_errors=True)
    ft.mkdir(parents=True)
    ref.mkdir()
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    def shard(i):
        return f"model-{i:05d}-of-{layers + 1:05d}.safetensors"

    shapes, weight_map, total = {"w1": (INTER, HIDDEN), "w2": (HIDDEN, INTER), "w3": (INTER, HIDDEN)}, {}, 0
    for i in range(layers):
        # One layer in memory at a time (~2.6 GiB in fp16), written as its own shard.
        tensors = {f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight": randn(*s)
                   for e in range(EXPERTS) for w, s in shapes.items()}
        save_file(tensors, ft / shard(i + 1), metadata={"format": "pt"})
        os.link(ft / shard(i + 1), ref / shard(i + 1))
        weight_map |= dict.fromkeys(tensors, shard(i + 1))
        total += sum(t.nbytes for t in tensors.values())
        del tensors
        print(f"built layer {i}", flush=True)
    for path in (ft, ref):  # a different random router each, so Λ is not all zeros
        routers = {f"model.layers.{i}.block_sparse_moe.gate.weight": randn(EXPERTS, HIDDEN) for i in range(layers)}
        save_file(routers, path / shard(layers + 1), metadata={"format": "pt"})
        index = {"metadata": {"total_size": total + sum(t.nbytes for t in routers.values())},
                 "weight_map": weight_map | dict.fromkeys(routers, shard(layers + 1))}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (path / "config.json").write_text(json.dumps(config, indent=1))
    os.sync()  # dirty pages cannot be evicted, so --cold needs the shards on disk


def read_plan(root: Path) -> list[tuple[Path, str, int, int]]:
    """(file, key, byte offset, bytes) of every tensor collect() reads, in its order: per layer
    the fine-tuned router, the reference router, then each expert's gate-role (w1) matrix."""
    with Checkpoint.open(root / "ft") as ft, Checkpoint.open(root / "ref") as ref:
        keys = []
        for lf, lr in zip(detect(ft).layers, detect(ref).layers):
            keys += [(ft, lf.router_key), (ref, lr.router_key)] + [(ft, m.key) for m in lf.matrices if m.role == "gate"]
    plan, headers = [], {}
    for ckpt, key in keys:
        file = ckpt.path / ckpt.tensors[key].file
        if file not in headers:  # safetensors layout: u64 header length, JSON header, data
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                headers[file] = (8 + size, json.loads(f.read(size)))
        start, end = headers[file][1][key]["data_offsets"]
        plan.append((file, key, headers[file][0] + start, end - start))
    return plan


def one_pass(route: str, root: Path, plan) -> None:
    if route == "statistics":
        with Checkpoint.open(root / "ft") as ft, Checkpoint.open(root / "ref") as ref:
            statistics.collect(ft, ref)
    elif route in ("get_tensor", "clone"):
        with ExitStack() as stack:  # one handle per file for the whole pass, as Checkpoint keeps them
            handles = {}
            for file, key, _, _ in plan:
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                t = handles[file].get_tensor(key)
                if route == "clone":
                    t.clone()
    else:
        for file, key, offset, nbytes in plan:
            buf = bytearray(nbytes)
            with open(file, "rb", buffering=0) as f:
                if os.preadv(f.fileno(), [buf], offset) != nbytes:
                    raise OSError(f"{file}: short read of {key}")
            del buf  # else the next tensor's buffer is allocated while this one is alive


def proc_status() -> dict[str, float]:
    """VmHWM (peak RSS) and RssAnon of this process, in MiB."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in f) if k in ("VmHWM", "RssAnon")}


def measure(route: str, root: Path, repeats: int, cold: bool) -> dict:
    # Tensors are mmap-backed, so RSS mixes reclaimable file pages with real allocations; a
    # sampler tracks the peak of the anonymous part alone.
    peak_anon, stop = [proc_status()["RssAnon"]], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak_anon[0] = max(peak_anon[0], proc_status()["RssAnon"])
    threading.Thread(target=sample, daemon=True).start()
    plan = read_plan(root) if route != "import" else []
    times = []
    for _ in range(repeats + 1 if plan else 0):
        for file in sorted({p[0] for p in plan}) if cold else []:
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0 = time.perf_counter()
        one_pass(route, root, plan)
        times.append(time.perf_counter() - t0)
    stop.set()
    # VmHWM rather than ru_maxrss: ru_maxrss carries the spawning parent's peak (the builder's
    # ~3 GiB) through fork+exec; VmHWM belongs to this process's own address space. Both kept.
    return {"warmup_s": times[0] if times else None, "times_s": times[1:], "peak_rss_mib": proc_status()["VmHWM"],
            "peak_anon_mib": peak_anon[0], "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def bench(args: argparse.Namespace) -> int:
    root = args.workdir / "bench_statistics" if args.workdir else Path(tempfile.mkdtemp(prefix="bench_statistics_"))
    results = {}
    try:
        build(root, args.layers, DTYPES[args.dtype])
        plan = read_plan(root)
        nbytes, largest = sum(p[3] for p in plan), max(p[3] for p in plan)
        for route in [*ROUTES, "import"]:  # a fresh interpreter each, so the peaks are the route's own
            cmd = [sys.executable, __file__, "--measure", route, "--root", str(root), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd + ["--cold"] * args.cold, stdout=subprocess.PIPE, text=True, check=True).stdout
            results[route] = json.loads(out.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base, plain = results["import"], results["clone"]
    machine = {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
               "torch_threads": base["torch_threads"], "safetensors": safetensors.__version__,
               "load_average_1min": round(os.getloadavg()[0], 1), "platform": platform.platform()}
    print("\n" + ", ".join(f"{k} {v}" for k, v in machine.items()))
    print(f"{args.layers} layers, {args.dtype}, {'cold (fadvise-evicted)' if args.cold else 'warm'} page cache, "
          f"{len(plan)} tensors, {nbytes / 1e9:.2f} GB per pass, largest tensor {largest / 2**20:.0f} MiB, "
          f"median of {args.repeats} after 1 warm-up\n")
    print("| route | median s | min-max s | GB/s | time / clone | peak RSS MiB | peak anon MiB | anon over import |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for route, label in ROUTES.items():
        r = results[route]
        r["median_s"] = stats.median(r["times_s"])
        r["gb_per_s"] = nbytes / r["median_s"] / 1e9
        print(f"| {label} | {r['median_s']:.3f} | {min(r['times_s']):.3f}-{max(r['times_s']):.3f} | "
              f"{r['gb_per_s']:.2f} | {r['median_s'] / stats.median(plain['times_s']):.2f}x | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_anon_mib']:.0f} | {r['peak_anon_mib'] - base['peak_anon_mib']:.0f} |")
    print(f"| import only (torch + expertbits) | - | - | - | - | {base['peak_rss_mib']:.0f} | {base['peak_anon_mib']:.0f} | 0 |")
    if args.keep:
        print(f"\ncheckpoints kept in {root}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "bytes_read": nbytes, "largest_tensor_bytes": largest,
                                         "results": results}, indent=1))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.root, args.repeats, args.cold)))
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
