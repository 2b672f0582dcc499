"""The whole-model budget (--dense-bits) on the four zoo fine-tunes: KL and whole-model size.

For each pair, the default configuration at --avg-bits (rotated GPTQ, output-error, one model-wide
budget) with the dense linear layers kept as stored, then packed at each of --dense-widths; every
run through the flow `expertbits quantize` runs, its KL from the evaluation stage (the shipped
folder, loaded as a user loads it) and its size from the quantization stage (the folder's shards
against the same parameters in bf16):

    OMP_NUM_THREADS=1 python benchmarks/bench_dense.py [--pairs ...] [--json dense.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_gptq_peer import FRONTIER_PAIRS, TEXTS


def run(pair: str, store: Path, avg_bits: float, dense_bits: int | None, overrides: list[str]) -> dict:
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    cal, held_out = TEXTS[pair]
    p = QuantizeParams(checkpoint=f"zoo://{pair}", reference=f"zoo://{pair.split('/')[0]}/base", store=str(store),
                       calibration_text=cal, eval_text=held_out, avg_bits=avg_bits, dense_bits=dense_bits,
                       dense_override=overrides)
    s = quantize_moe(p).summary
    q = s["quantization"]
    return {"kl": s["evaluation"]["kl"], "bytes": q["bytes"], "fraction_of_bf16": q["fraction_of_bf16"],
            "model_bits_per_parameter": q["model_bits_per_parameter"], "dense_matrices": q.get("dense_matrices", 0)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=list(FRONTIER_PAIRS))
    ap.add_argument("--avg-bits", type=float, default=2.5)
    ap.add_argument("--dense-widths", default="8,4", help="comma-separated --dense-bits values to try")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    widths = [None] + [int(b) for b in args.dense_widths.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs:
            results[pair] = {}
            for b in widths:
                name = "experts only" if b is None else f"dense {b}"
                r = results[pair][name] = run(pair, Path(tmp) / "store", args.avg_bits, b, [])
                print(f"{pair:24s} {name:13s} KL {r['kl']:.5f}  {100 * r['fraction_of_bf16']:5.1f}% of bf16  "
                      f"{r['model_bits_per_parameter']:.2f} bits/param  ({r['dense_matrices']} dense layers)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
