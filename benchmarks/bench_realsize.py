"""The full quantize flow on real-shaped checkpoints: time, peak memory and GB/s of every stage.

For each model it generates (once, kept under --workdir) a real-shaped base checkpoint and its
fine-tuned twin with `python -m expertbits.zoo.realshape` (random weights, real shapes, 5 GB
shards), then runs `expertbits quantize` on the pair exactly as a user would, in a subprocess
with EXPERTBITS_MEASURE_FILE set so every stage appends its own figures (tasks/meter.py):

* seconds: the stage's work (not Prefect's bookkeeping around it)
* peak anon: anonymous resident memory the stage allocated (sampled at 20 Hz) — the figure the
  memory target is about; peak RSS additionally counts mapped safetensors pages the kernel may
  drop at any time
* expert GB/s: stored bytes of the expert matrices the stage goes through (statistics: the gate
  matrices only, all it reads) over its seconds; a stage reported twice (two downloads; the
  quantization's per-layer shards and its gathering step) is summed

and a plain read of the statistics stage's tensors (safetensors slice + copy, warm page cache,
fresh file mapping as in the stage's process, one thread), the yardstick the statistics stage is
measured against. The 32-layer projection scales
each stage linearly with the number of MoE layers (every stage's work is per layer).

    python benchmarks/bench_realsize.py [--model mixtral-8x7b] [--model qwen3-30b-a3b] [--layers 2]
        [--workdir DIR] [--json results.json] [--windows 16] [--quantizer gptq] [--device cuda]

`--device` is the flow's (auto, cpu, cuda, cuda:N); on a GPU each stage's peak GPU memory
(torch.cuda.max_memory_allocated) is reported beside the host's. `--model mixtral-smoke` is
Mixtral's layout at a tiny size (benchmarks/gpu_check.sh --dry-run): its figures mean nothing.

Needs ~12 GB of disk per 2-layer Mixtral-8x7B-shaped pair plus its cached copies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint

FULL_LAYERS = {"mixtral-8x7b": 32, "qwen3-30b-a3b": 48, "deepseek-v3": 61, "mixtral-smoke": 32}
STAGES = ("download", "statistics", "routing", "calibration (gptq)", "calibration", "quantization (gptq)", "quantization",
          "validation", "validation (fused kernel)", "evaluation")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", choices=sorted(FULL_LAYERS), help="repeatable (default: mixtral-8x7b, qwen3-30b-a3b)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--windows", type=int, default=16, help="calibration and evaluation windows of 256 tokens")
    p.add_argument("--workdir", type=Path, default=Path("bench-realsize"))
    p.add_argument("--quantizer", default="rtn", help="rtn or gptq (routed, sequential GPTQ)")
    p.add_argument("--device", default="auto", help="the flow's --device: auto, cpu, cuda or cuda:N")
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def generate(name: str, layers: int, root: Path) -> tuple[Path, Path]:
    base, ft = root / "base", root / "ft"
    if not (ft / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "expertbits.zoo.realshape", name, "--layers", str(layers),
                        "--out", str(base), "--twin", str(ft)], check=True)
    return base, ft


def plain_read(ft: Path) -> dict:
    """GB/s of reading the statistics stage's tensors (gate matrices) into memory: page cache warm,
    file mapping fresh (a new open, as the stage's process has), one thread."""
    torch.set_num_threads(1)
    with Checkpoint.open(ft) as ckpt:  # warm-up pass: the page cache holds the bytes, as for the stage
        gates = [m for m in detect(ckpt).matrices if m.role == "gate"]
        for m in gates:
            ckpt.read(m.key, m.index, m.rows).clone()
    with Checkpoint.open(ft) as ckpt:
        start, nbytes = time.perf_counter(), 0
        for m in gates:
            t = ckpt.read(m.key, m.index, m.rows).clone()
            nbytes += t.numel() * t.element_size()
        seconds = time.perf_counter() - start
    return {"bytes": nbytes, "seconds": seconds, "gb_per_s": nbytes / 1e9 / seconds}


def layer_fp32_bytes(ft: Path) -> int:
    """fp32 bytes of the largest decoder layer (every tensor under one `layers.N.` prefix)."""
    sizes: dict[str, int] = {}
    with Checkpoint.open(ft) as ckpt:
        for key, info in ckpt.tensors.items():
            if ".layers." in key:
                layer = key.split(".layers.", 1)[1].split(".", 1)[0]
                sizes[layer] = sizes.get(layer, 0) + 4 * int(torch.tensor(info.shape).prod())
    return max(sizes.values())


def run_flow(base: Path, ft: Path, root: Path, windows: int, quantizer: str = "rtn",
             device: str = "auto") -> tuple[list[dict], float]:
    measure = root / "measure.jsonl"
    measure.unlink(missing_ok=True)
    store = root / f"store-{int(time.time())}"  # a fresh store: every stage computes
    env = dict(os.environ, EXPERTBITS_MEASURE_FILE=str(measure), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = ["expertbits", "quantize", "--checkpoint", str(ft), "--reference", str(base), "--store", str(store),
           "--cache-dir", str(root / "cache"), "--calibration-windows", str(windows), "--eval-windows", str(windows),
           "--quantizer", quantizer, "--device", device]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    return [json.loads(line) for line in measure.read_text().splitlines()], wall


def table(name: str, layers: int, rows: list[dict], read: dict, bound: int, wall: float) -> str:
    full = FULL_LAYERS[name]
    lines = [f"**{name}-shaped, {layers} MoE layers** (bound: one decoder layer in fp32 + 1 GiB = "
             f"{(bound + 2**30) / 2**30:.1f} GiB; whole flow {wall:.0f} s including Prefect and downloads)", "",
             "| stage | seconds | peak anon GiB | peak RSS GiB | peak GPU GiB | expert GB/s | projected seconds, all "
             f"{full} layers |", "|---|---|---|---|---|---|---|"]
    by_stage = {}
    for r in rows:  # the reference checkpoint's download is a second `download` line: add them up
        s = by_stage.setdefault(r["stage"], dict(r, seconds=0.0, weight_bytes=0))
        s["seconds"] += r["seconds"]
        s["weight_bytes"] += r.get("weight_bytes") or 0
        s["peak_anon_bytes"] = max(s["peak_anon_bytes"] or 0, r["peak_anon_bytes"] or 0)
        s["peak_rss_bytes"] = max(s["peak_rss_bytes"] or 0, r["peak_rss_bytes"] or 0)
        if r.get("peak_gpu_bytes") is not None:
            s["peak_gpu_bytes"] = max(s.get("peak_gpu_bytes") or 0, r["peak_gpu_bytes"])
    for stage in STAGES:
        if stage not in by_stage:
            continue
        r = by_stage[stage]
        gbs = (r["weight_bytes"] / 1e9 / r["seconds"]) if r.get("weight_bytes") and r["seconds"] else None
        gpu = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r.get("peak_gpu_bytes") is not None else ""
        lines.append(f"| {stage} | {r['seconds']:.1f} | {(r['peak_anon_bytes'] or 0) / 2**30:.2f} | "
                     f"{(r['peak_rss_bytes'] or 0) / 2**30:.2f} | {gpu} | {'' if gbs is None else f'{gbs:.2f}'} | "
                     f"{r['seconds'] * full / layers:.0f} |")
    stats = by_stage.get("statistics")
    if stats:
        ratio = stats["weight_bytes"] / 1e9 / stats["seconds"] / read["gb_per_s"]
        lines += ["", f"statistics vs a plain read of the same tensors ({read['gb_per_s']:.2f} GB/s): {ratio:.2f}×"]
    total = sum(by_stage[s]["seconds"] for s in by_stage)
    lines += [f"stage work total {total:.0f} s; projected for all {full} layers: {total * full / layers / 60:.0f} min"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = {}
    for name in args.model or ["mixtral-8x7b", "qwen3-30b-a3b"]:
        root = args.workdir / f"{name}-{args.layers}"
        base, ft = generate(name, args.layers, root)
        read = plain_read(ft)
        rows, wall = run_flow(base, ft, root, args.windows, args.quantizer, args.device)
        bound = layer_fp32_bytes(ft)
        md = table(name, args.layers, rows, read, bound, wall)
        print(md, flush=True)
        results[name] = {"layers": args.layers, "quantizer": args.quantizer, "device": args.device, "stages": rows, "plain_read": read, "layer_fp32_bytes": bound,
                         "wall_seconds": wall, "markdown": md}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
