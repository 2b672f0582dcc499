"""Time one MoE layer's routed experts: the fused mixed-width kernel against bf16, in one run.

For each real layer shape (Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3) and token count, four
versions of the same layer on the same random routing:

* ``bf16``   the unquantized experts in bf16, the faster of torch's grouped GEMM
             (`torch.nn.functional.grouped_mm` / `torch._grouped_mm`, what transformers' grouped
             experts implementation dispatches to) and the per-expert loop (its eager path)
* ``4bit``, ``2bit``   every expert at that width, through `fused_moe` (two launches)
* ``mixed``  a 2/3/4-bit allocation at 2.5 average bits (5/8 of the experts at 2, 1/4 at 3,
             1/8 at 4, shuffled), through the same two launches

Reported per row: median time, effective GB/s (bytes of the weights the routed experts hold,
packed + scales + zero points, over the time), % of the device's peak memory bandwidth, and the
speed-up over bf16. Weights are random codes and scales: speed does not depend on their values,
and the kernel's correctness is the test suite's job (a spot check against the float64 reference
runs here too).

Needs only torch and triton, and a CUDA GPU for figures. Without one, `--smoke` runs tiny shapes
through the Triton interpreter to show the script works; its times say nothing about the kernel.

    python benchmarks/bench_fused_moe.py --json benchmarks/results/fused_moe.json
    python benchmarks/bench_fused_moe.py --sweep      # also time launches near the chosen one (mixed rows)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from expertbits.kernels.bank import ExpertBank
from expertbits.kernels.fused_moe import Launch, choose_launch, fused_moe, fused_moe_reference, interpreted
from expertbits.kernels.packing import QuantizedTensor, packed_width

# (hidden, ffn per expert, experts, top-k)
SHAPES = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8),
          "deepseek-v3": (7168, 2048, 256, 8)}
SMOKE_SHAPES = {"smoke": (64, 48, 8, 2)}
TOKENS = (1, 4, 16, 64, 256)
# peak HBM bandwidth, GB/s, by a substring of torch.cuda.get_device_name()
PEAK_GBPS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
             "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "RTX 4090": 1008}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--peak-gbps", type=float, help="the device's peak memory bandwidth (default: by device name)")
    p.add_argument("--sweep", action="store_true", help="also time launches near the chosen one, on the mixed rows")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; runs without a GPU (interpreter), no figures")
    p.add_argument("--json", help="write the rows here")
    return p.parse_args(argv)


def random_expert(n: int, k: int, bits: int, group_size: int, gen: torch.Generator, device: str) -> QuantizedTensor:
    """A packed matrix of random codes (every bit of every word random: unused top bits are never read)
    with scales around 0.01 and mid-range zero points, made on the device (DeepSeek-V3's layer
    would take minutes on the host)."""
    g = -(-k // group_size)
    packed = torch.randint(-(2**31), 2**31 - 1, (n, packed_width(k, bits)), dtype=torch.int32, generator=gen,
                           device=device)
    scales = (torch.rand(n, g, generator=gen, device=device) * 0.02 + 0.001).half()
    zeros = torch.full((n, g), 1 << (bits - 1), dtype=torch.uint8, device=device)
    return QuantizedTensor(packed, scales, zeros, bits, group_size, (n, k))


def widths(config: str, experts: int, gen: torch.Generator) -> list[int]:
    if config == "mixed":  # 2.5 average bits: 5/8 at 2, 2/8 at 3, 1/8 at 4
        plan = [2] * (experts * 5 // 8) + [3] * (experts * 2 // 8)
        plan += [4] * (experts - len(plan))
        return [plan[i] for i in torch.randperm(experts, generator=gen, device=gen.device).tolist()]
    return [int(config.removesuffix("bit"))] * experts


def routing(tokens: int, experts: int, top_k: int, gen: torch.Generator, device: str):
    weights, index = torch.rand(tokens, experts, generator=gen, device=device).softmax(-1).topk(top_k, dim=-1)
    return index, weights


class Bf16Layer:
    """The same layer unquantized: gate_up [E, 2F, H] and down [E, H, F] in bf16."""

    def __init__(self, hidden: int, ffn: int, experts: int, device: str, gen: torch.Generator):
        def weights(*shape):  # in bf16 on the device: DeepSeek-V3's layer is 22.5 GB
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(0.02)
        self.gate_up, self.down = weights(experts, 2 * ffn, hidden), weights(experts, hidden, ffn)
        self.ffn = ffn
        self.grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

    def loop(self, x, index, weights):
        out = torch.zeros_like(x)
        for e in torch.unique(index).tolist():
            token, slot = torch.where(index == e)
            gate, up = (x[token] @ self.gate_up[e].T).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ self.down[e].T
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out

    def grouped_mm(self, x, index, weights):
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0])
        offs = counts.cumsum(0).to(torch.int32)
        a = x[order // index.shape[1]]
        gate, up = self.grouped(a, self.gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        y = self.grouped(torch.nn.functional.silu(gate) * up, self.down.transpose(1, 2), offs=offs)
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, order // index.shape[1], y.to(x.dtype))

    def bytes_read(self, index) -> int:
        return int(torch.unique(index).numel()) * 3 * self.ffn * self.gate_up.shape[2] * 2


def bench(fn, smoke: bool) -> float:
    """Median milliseconds of fn()."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def sweep_candidates(chosen: Launch) -> list[Launch]:
    """Launches near the wrapper's choice: half, the same and double BLOCK_M, three tile shapes,
    4 or 8 warps, split-K off or as chosen (up to 36; each compiles once, a second or two)."""
    out = []
    for bm in sorted({max(1, chosen.block_m // 2), chosen.block_m, min(64, chosen.block_m * 2)}):
        for tile in ((32, 32), (32, 64), (64, 32)):
            for warps in (4, 8):
                for split in sorted({1, chosen.split_k if bm < 16 else 1}):
                    out.append(Launch(bm, tile, tile, split, warps, 2 if bm < 16 else 3))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: timings need a GPU. `--smoke` runs tiny shapes through the Triton interpreter to "
              "check the script, without figures.", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None) if cuda else None
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    tokens = [t for t in args.tokens if t <= 8] if args.smoke else args.tokens
    rows = []
    for shape, (hidden, ffn, experts, top_k) in shapes.items():
        gen = torch.Generator(device).manual_seed(0)
        dense = Bf16Layer(hidden, ffn, experts, device, gen)
        banks = {}
        for config in ("4bit", "2bit", "mixed"):
            bits = widths(config, experts, gen)
            banks[config] = tuple(ExpertBank.stack([random_expert(n, k, b, args.group_size, gen, device) for b in bits])
                                  for n, k in ((ffn, hidden), (ffn, hidden), (hidden, ffn)))
        for t in tokens:
            index, weights = routing(t, experts, top_k, gen, device)
            x = torch.randn(t, hidden, generator=gen, device=device).to(torch.bfloat16)
            hit = torch.unique(index)
            baselines = {"loop": bench(lambda: dense.loop(x, index, weights), args.smoke)}
            if dense.grouped is not None and cuda:
                baselines["grouped_mm"] = bench(lambda: dense.grouped_mm(x, index, weights), args.smoke)
            impl, bf16_ms = min(baselines.items(), key=lambda kv: kv[1])
            row = {"shape": shape, "tokens": t, "config": "bf16", "impl": impl, "ms": bf16_ms,
                   "bytes": dense.bytes_read(index), "experts_hit": int(hit.numel())}
            rows.append(row)
            for config, (gate, up, down) in banks.items():
                bytes_read = sum(b.expert(e).nbytes for b in (gate, up, down) for e in hit.tolist())
                launch = choose_launch(t * top_k, experts, (gate.shape, down.shape))
                if t == tokens[0]:  # spot check: the layer against the float64 reference
                    ref = fused_moe_reference(x.float(), index, weights, gate, up, down)
                    got = fused_moe(x.float(), index, weights, gate, up, down).double()
                    rel = float((got - ref).abs().max() / ref.abs().max())
                    assert rel < 1e-4, f"{shape} {config}: fused kernel off the reference by {rel:.2e}"
                ms = bench(lambda: fused_moe(x, index, weights, gate, up, down, launch=launch), args.smoke)
                best = None
                if args.sweep and cuda and config == "mixed":
                    tried = {}
                    for cand in sweep_candidates(launch):
                        try:
                            tried[cand] = bench(lambda: fused_moe(x, index, weights, gate, up, down, launch=cand), False)
                        except Exception as e:  # a tile that does not fit the device's shared memory or registers
                            print(f"  skip {cand}: {type(e).__name__}", file=sys.stderr)
                    best = min(tried.items(), key=lambda kv: kv[1]) if tried else None
                rows.append({"shape": shape, "tokens": t, "config": config, "impl": "fused", "ms": ms, "bytes": bytes_read,
                             "experts_hit": int(hit.numel()), "launch": str(launch),
                             **({"best_ms": best[1], "best_launch": str(best[0])} if best else {})})
            print(f"{shape} tokens={t} done", file=sys.stderr)
    by = {(r["shape"], r["tokens"], r["config"]): r for r in rows}
    for r in rows:
        r["gbps"] = r["bytes"] / r["ms"] / 1e6
        r["pct_peak"] = 100 * r["gbps"] / peak if peak else None
        r["speedup_vs_bf16"] = by[r["shape"], r["tokens"], "bf16"]["ms"] / r["ms"]
    print(table(rows, name, peak, interpreted()))
    if not args.smoke:
        print(targets(by, shapes, tokens))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_gbps": peak, "interpreter": interpreted(), "group_size": args.group_size,
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


def table(rows: list[dict], device: str, peak: float | None, interp: bool) -> str:
    head = f"device: {device}" + (f", peak {peak:g} GB/s" if peak else "") + (
        "  (Triton interpreter: times are NOT kernel figures)" if interp else "")
    lines = [head, "", "| layer | tokens | weights | time (µs) | GB/s | % of peak | × bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"bf16 ({r['impl']})" if r["config"] == "bf16" else r["config"]
        pct = f"{r['pct_peak']:.0f}%" if r["pct_peak"] is not None else "n/a"
        lines.append(f"| {r['shape']} | {r['tokens']} | {label} | {r['ms'] * 1e3:.1f} | {r['gbps']:.0f} | {pct} | "
                     f"{r['speedup_vs_bf16']:.2f} |")
    return "\n".join(lines)


def targets(by: dict, shapes: dict, tokens: list[int]) -> str:
    """The issue's targets at 1 token, per shape: met or not, with the figures."""
    if 1 not in tokens:
        return ""
    out = ["", "targets at 1 token:"]
    for s in shapes:
        b, q4, q2, mx = (by[s, 1, c] for c in ("bf16", "4bit", "2bit", "mixed"))
        checks = [("4-bit >= 3x bf16", b["ms"] / q4["ms"], 3.0), ("2-bit >= 1.5x 4-bit", q4["ms"] / q2["ms"], 1.5),
                  ("mixed 2.5-bit faster than 4-bit", q4["ms"] / mx["ms"], 1.0)]
        if q4["pct_peak"] is not None:
            checks.append(("4-bit >= 60% of peak bandwidth", q4["pct_peak"] / 100, 0.6))
        out += [f"  {s}: {what}: {got:.2f} ({'met' if got >= want else 'NOT met'})" for what, got, want in checks]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
