"""Compile the fused MoE kernels for a GPU without one: every launch the wrapper picks on a GPU.

Triton compiles to PTX and cubin offline (its bundled ptxas); no driver is needed. For each
(kernel, activation dtype, launch) this prints the registers per thread and the bytes spilled,
from `ptxas -v`: a spill means local-memory traffic in a kernel that should be bound by the
weight stream alone. It also proves the kernels compile (the Triton interpreter accepts code
that compiled Triton refuses); tests/unit/test_fused_moe.py runs it with `--quick`.

    python benchmarks/compile_fused_moe.py [--arch 90] [--quick] [--json out.json]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # before any kernel module is imported: compile, do not interpret

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from expertbits.kernels import fused_moe_triton as kernels  # noqa: E402
from expertbits.kernels.fused_moe import GPU_LAUNCHES  # noqa: E402

DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _types(name: str, x_type: str) -> str:
    if name in ("x_ptr", "h_ptr"):
        return x_type
    if name in ("out_ptr", "weights_ptr"):
        return "*fp32"
    if name in ("sorted_ptr", "block_expert_ptr", "post_pad_ptr") or name.endswith("bits_ptr"):
        return "*i32"
    if name.endswith(("word_ptr", "group_ptr")):
        return "*i64"
    if name.endswith("q_ptr"):
        return "*i32"
    if name.endswith("s_ptr"):
        return "*fp16"
    if name.endswith("z_ptr"):
        return "*u8"
    return "i32"


def compile_one(kernel, x_type: str, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    signature = {n: "constexpr" if n in constexprs else _types(n, x_type) for n in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, bytes of spill stores) from ptxas -v."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run([str(ptxas), "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    return regs, spill


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    p.add_argument("--quick", action="store_true", help="the smallest decode and the largest prefill launch, bf16 and fp32")
    p.add_argument("--json")
    args = p.parse_args(argv)
    launches = list(GPU_LAUNCHES.values())
    launches = [launches[0], launches[-1]] if args.quick else launches
    dtypes = ("bf16", "fp32") if args.quick else tuple(DTYPES)
    rows = []
    print("| kernel | x | BLOCK_M | BLOCK_N×BLOCK_K | split-K | registers | spill bytes |\n|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        for launch in launches:
            bm, up, down, warps, stages, use_dot = (launch.block_m, launch.up_blocks, launch.down_blocks,
                                                    launch.num_warps, launch.num_stages, launch.use_dot)
            precision = "ieee" if dtype == "fp32" else None
            cases = [("up", kernels.expert_up_kernel, up, dict(TOP_K=2, GROUP_SIZE=128, GATED=True, ACT=0)),
                     ("up-relu", kernels.expert_up_kernel, up, dict(TOP_K=1, GROUP_SIZE=128, GATED=False, ACT=1)),
                     ("down", kernels.expert_down_kernel, down, dict(GROUP_SIZE=128, SPLIT_K=1 if use_dot else 2))]
            for name, kernel, (bn, bk), extra in cases:
                if name == "up-relu" and args.quick:
                    continue
                consts = dict(extra, USE_DOT=use_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=precision)
                compiled = compile_one(kernel, DTYPES[dtype], consts, args.arch, warps, stages)
                regs, spill = ptxas_usage(compiled.asm["ptx"], args.arch)
                rows.append({"kernel": name, "x": dtype, "block_m": bm, "block_n": bn, "block_k": bk,
                             "split_k": extra.get("SPLIT_K", 1), "registers": regs, "spill_bytes": spill})
                print(f"| {name} | {dtype} | {bm} | {bn}×{bk} | {extra.get('SPLIT_K', 1)} | {regs} | {spill} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
