"""The fused MoE kernel's largest error against the float64 reference, per width and for mixed layers.

Every width 1-8 alone and two mixes, group sizes 32/64/128, 1/4/37 tokens, top-1/2/3, with the
launch the wrapper picks and with forced tl.dot tiles and split-K; hidden 200 and ffn 136 (no
multiple of a block or a group). Runs in the Triton interpreter without a GPU (about 1 minute).

    python benchmarks/fused_moe_errors.py [--json out.json]
"""

import argparse
import json

import torch

from expertbits.kernels.bank import ExpertBank
from expertbits.kernels.fused_moe import Launch, fused_moe, fused_moe_reference
from expertbits.kernels.packing import quantize_rtn

H, F, E = 200, 136, 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)

    def banks(bits, gs):
        def make(n, k):
            return ExpertBank.stack([quantize_rtn(torch.randn(n, k, generator=gen) * 0.05, b, gs) for b in bits]).to(device)
        return make(F, H), make(F, H), make(H, F)

    out = {}
    cases = [*[(f"{b}-bit", [b] * E) for b in range(1, 9)], ("mixed 1-8", [1, 2, 3, 4, 5, 6, 7, 8]),
             ("mixed 2/3/4", [2, 3, 4, 2, 2, 3, 2, 4])]
    print("| widths | largest relative error |\n|---|---|")
    for name, bits in cases:
        worst = 0.0
        for gs in (32, 64, 128):
            b = banks(bits, gs)
            for tokens, top_k in ((1, 2), (4, 2), (37, 2), (37, 1), (37, 3)):
                x = torch.randn(tokens, H, generator=gen).to(device)
                w, idx = torch.rand(tokens, E, generator=gen).softmax(-1).topk(top_k, -1)
                w, idx = w.to(device), idx.to(device)
                ref = fused_moe_reference(x, idx, w, *b)
                for launch in (None, Launch(16, (32, 64), (32, 64), 2)):
                    got = fused_moe(x, idx, w, *b, launch=launch).double()
                    worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        out[name] = worst
        print(f"| {name} | {worst:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "max_rel_error": out}, f, indent=1)


if __name__ == "__main__":
    main()
