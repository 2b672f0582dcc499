"""Time the dequantize-matmul kernel on Mixtral-8x7B expert shapes.

Compares, per (N, K, M, bits):

* ``kernel``  dequant_matmul(x, q): packed weights dequantized inside the Triton kernel
* ``dense``   x @ W^T in fp16 with the unquantized weight (what quantization must beat)
* ``torch``   dequantize to fp16 in torch, then the fp16 matmul (the naive route)

GB/s is the weight bytes each route reads from its stored form (packed + scales + zeros
for kernel and torch, N*K*2 for dense) divided by its time.  Speedups are the other
route's time over the kernel's.  Timings need a CUDA GPU; without one the script only runs
a tiny shape through the interpreter as a smoke check and prints no figures.

    python benchmarks/bench_dequant_matmul.py [--bits 2 3 4] [--m 1 16 64] [--precision tf32]
"""

from __future__ import annotations

import argparse
import sys

import torch

from expertbits.kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference, interpreted
from expertbits.kernels.packing import quantize_rtn

# Mixtral-8x7B expert projections as y = x @ W^T with W [N, K]: w1/w3 (up) and w2 (down).
EXPERT_SHAPES = [(14336, 4096), (4096, 14336)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="tokens per expert")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--precision", choices=["ieee", "tf32"], default="ieee",
                   help="tl.dot input precision for the kernel's fp32 dot")
    p.add_argument("--no-check", action="store_true", help="skip the per-shape correctness check")
    return p.parse_args(argv)


def smoke_check() -> int:
    print("No CUDA GPU: timing figures need one. Running one tiny shape through the "
          f"Triton interpreter (interpreted={interpreted()}) as a smoke check.")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen) * 0.02
    x = torch.randn(2, 256, generator=gen)
    q = quantize_rtn(w, 3, 128)
    err = (dequant_matmul(x, q) - dequant_matmul_reference(x, q)).abs().max().item()
    print(f"M=2 N=64 K=256 bits=3 group=128: max |kernel - reference| = {err:.3g}")
    return 0 if err < 1e-4 else 1


def bench(args: argparse.Namespace) -> int:
    from triton.testing import do_bench

    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, group {args.group_size}, kernel dot precision {args.precision}")
    header = (f"{'N':>6} {'K':>6} {'M':>3} {'bits':>4} | {'kernel us':>9} {'GB/s':>6} | {'dense us':>8} "
              f"{'GB/s':>6} | {'torch us':>8} {'GB/s':>6} | {'vs dense':>8} {'vs torch':>8}"
              + ("" if args.no_check else f" | {'max err':>8}"))
    print(header)
    print("-" * len(header))
    gen = torch.Generator(device=dev).manual_seed(0)
    for n, k in EXPERT_SHAPES:
        w = torch.randn(n, k, generator=gen, device=dev, dtype=torch.float16) * 0.02
        dense_bytes = w.numel() * w.element_size()
        for bits in args.bits:
            q = quantize_rtn(w, bits, args.group_size)
            for m in args.m:
                x = torch.randn(m, k, generator=gen, device=dev, dtype=torch.float16)
                t_kernel = do_bench(lambda: dequant_matmul(x, q, input_precision=args.precision)) * 1e3
                t_dense = do_bench(lambda: x @ w.T) * 1e3
                t_torch = do_bench(lambda: x @ q.dequantize().to(torch.float16).T) * 1e3

                def gbps(nbytes, us):
                    return nbytes / (us * 1e-6) / 1e9
                row = (f"{n:>6} {k:>6} {m:>3} {bits:>4} | {t_kernel:>9.1f} {gbps(q.nbytes, t_kernel):>6.0f} | "
                       f"{t_dense:>8.1f} {gbps(dense_bytes, t_dense):>6.0f} | {t_torch:>8.1f} "
                       f"{gbps(q.nbytes, t_torch):>6.0f} | {t_dense / t_kernel:>7.2f}x {t_torch / t_kernel:>7.2f}x")
                if not args.no_check:
                    y = dequant_matmul(x, q, input_precision=args.precision)
                    row += f" | {(y - dequant_matmul_reference(x, q)).abs().max().item():>8.2g}"
                print(row, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() or interpreted():
        return smoke_check()
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
