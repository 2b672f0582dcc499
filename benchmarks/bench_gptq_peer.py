"""expertbits' GPTQ beside llm-compressor's GPTQ and round-to-nearest, on the zoo's WordNet fine-tunes.

For each pair and width (uniform over every routed expert, group 64, asymmetric):
  * expertbits RTN and expertbits GPTQ: `quantize_moe` (the flow `expertbits quantize` runs),
    KL from its evaluation stage, i.e. of the shipped folder loaded the way a user loads it;
  * llm-compressor GPTQ: benchmarks/peer_llmcompressor.py in the peer's own environment
    (--peer-python), on the same expert matrices and the same calibration token windows; its
    dequantized experts are put into a copy of the full-precision checkpoint and evaluated by the
    same code on the same held-out windows. Each peer matrix is checked to be quantized (at most
    2**bits values per group row) and not zeroed;
and at --budget average bits, expertbits GPTQ under each solver allocator (per-expert widths
from {2, 3, 4}), against llm-compressor at uniform 3 bits. Last, a starved calibration (one
window of 8 tokens, so some experts get none): how many expert matrices each tool sets to zero
(llm-compressor calibrating routed tokens only; expertbits' GPTQ).

This script installs nothing. The peer's environment, once:

    python -m venv peer && peer/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

    python benchmarks/bench_gptq_peer.py --peer-python peer/bin/python [--json out.json]

`--frontier` runs the quality issue's side-by-side instead, on all four zoo fine-tunes (each on its
own calibration and held-out text): the peer at uniform 4/3/2 bits in both of its modes, and
expertbits' GPTQ variants (plain, --rotate, --rotate with 5% dampening) at those widths and at
2.25/2.5/2.75 average bits:

    python benchmarks/bench_gptq_peer.py --peer-python peer/bin/python --frontier --json frontier.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PAIRS = ("mixtral-tiny/wordnet", "qwen-moe-tiny/wordnet")
CAL_TEXT, EVAL_TEXT = "zoo://text/wordnet-supersense-train", "zoo://text/wordnet-supersense-test"
# each zoo fine-tune's own calibration and held-out text (as its league: infra/zoo/leagues.py)
TEXTS = {"mixtral-tiny/wordnet": (CAL_TEXT, EVAL_TEXT), "qwen-moe-tiny/wordnet": (CAL_TEXT, EVAL_TEXT),
         "mixtral-tiny/code": ("zoo://text/python-train", "zoo://text/python-heldout"),
         "mixtral-tiny/control": ("zoo://text/web-train", "zoo://text/web-heldout")}
FRONTIER_PAIRS = tuple(TEXTS)
# the quality issue's levers as quantize options: each row of the frontier table
PLAIN = {"rotate": False, "allocator": "routed-error", "budget_scope": "layer"}  # the defaults before the levers
VARIANTS = {"gptq": PLAIN, "gptq+rot": dict(PLAIN, rotate=True), "gptq+rot+damp.05": dict(PLAIN, rotate=True, gptq_damp=0.05),
            "gptq+rot+output-error+model": {"rotate": True, "allocator": "output-error", "budget_scope": "model"}}
ALLOCATION = ("allocator", "budget_scope")  # a variant's allocation options, which a uniform width has no use for
ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
SOLVERS = ("routed-error", "pmq", "weight-error")


def expertbits_run(pair: str, store: Path, **params) -> dict:
    from expertbits.flows.params import QuantizeParams
    from expertbits.flows.quantize import quantize_moe

    family = pair.split("/")[0]
    cal, held_out = TEXTS.get(pair, (CAL_TEXT, EVAL_TEXT))
    p = QuantizeParams(checkpoint=f"zoo://{pair}", reference=f"zoo://{family}/base", store=str(store),
                       calibration_text=cal, eval_text=held_out, group_size=64, **params)
    measures = store / "measure.jsonl"
    os.environ["EXPERTBITS_MEASURE_FILE"] = str(measures)
    measures.unlink(missing_ok=True)
    manifest = quantize_moe(p)
    stages = [json.loads(line) for line in measures.read_text().splitlines()] if measures.exists() else []
    gptq_s = sum(r["seconds"] for r in stages if r["stage"] == "quantization (gptq)")
    q = manifest.summary["quantization"]
    return {"kl": manifest.summary["evaluation"]["kl"], "gptq_seconds": gptq_s, "moe_layers": q["moe_layers"],
            "least_covered": q.get("least_covered"), "fallback_experts": q.get("fallback_experts")}


def peer_run(peer_python: str, ft: Path, windows: Path, bits: int, tmp: Path, routed_only: bool = False,
             eval_text: str = EVAL_TEXT) -> dict:
    """llm-compressor's GPTQ of the routed experts, evaluated by expertbits' evaluation code."""
    from safetensors.torch import load_file, save_file

    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.measure.evaluate import evaluate
    from expertbits.tasks.checkpoints.texts import read_text

    out = tmp / f"peer-{bits}{'-routed' if routed_only else ''}"
    cmd = [peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", str(ft), "--calibration",
           str(windows), "--bits", str(bits), "--group-size", "64", "--out", str(out)] + (["--routed-only"] if routed_only else [])
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    wall = time.perf_counter() - start
    peer = load_file(out / "experts.safetensors")
    by_matrix = {}
    for name, w in peer.items():
        m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.(\w+)$", name)
        if not m or m.group(3) not in ROLE:
            raise SystemExit(f"llm-compressor quantized {name}, which is not a routed expert matrix")
        by_matrix[int(m.group(1)), int(m.group(2)), ROLE[m.group(3)]] = w
    dense = tmp / f"dense-{out.name}"
    shutil.copytree(ft, dense)
    zeroed = 0
    with Checkpoint.open(ft) as ckpt:
        matrices = detect(ckpt).matrices
        tensors = {k: ckpt.read(k) for k in ckpt.tensors}
    if len(matrices) != len(by_matrix):
        raise SystemExit(f"llm-compressor quantized {len(by_matrix)} matrices, the checkpoint has {len(matrices)} expert matrices")
    for m in matrices:
        if m.index is not None or m.rows is not None:
            raise SystemExit("this comparison handles per-expert 2-D expert tensors only")
        w = by_matrix[m.layer, m.expert, m.role]
        ordered = w.reshape(w.shape[0], -1, 64).sort(-1).values
        distinct = int((1 + (ordered.diff(dim=-1) != 0).sum(-1)).max())  # values per (row, group)
        if distinct > 2**bits:
            raise SystemExit(f"{m.name}: {distinct} distinct values in a group, so llm-compressor did not quantize it")
        zeroed += int((w == 0).all())
        tensors[m.key] = w  # fp32, as llm-compressor computed it
    for f in dense.glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, dense / "model.safetensors", metadata={"format": "pt"})
    (dense / "expertbits-manifest.json").unlink(missing_ok=True)
    metrics = evaluate(ft, dense, read_text(eval_text, {}), seq_len=256, windows=16)
    shutil.rmtree(dense)
    return {"kl": metrics["kl"], "seconds": json.loads((out / "modules.json").read_text())["seconds"], "wall": wall,
            "zeroed_matrices": zeroed}


def starved(peer_python: str, ft: Path, tmp: Path) -> dict:
    """One 8-token window at 3 bits: zeroed expert matrices from llm-compressor (routed tokens only)
    and from expertbits' GPTQ, with expertbits' fallback count."""
    import pandas as pd
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.checkpoints.texts import token_windows
    from expertbits.tasks.quantization.gptq_sequential import sequential_gptq
    from expertbits.tasks.quantization.method import QuantizerConfig
    from expertbits.tasks.checkpoints.texts import read_text

    text = read_text(CAL_TEXT, {})
    windows = tmp / "starved.json"
    windows.write_text(json.dumps(token_windows(text, AutoTokenizer.from_pretrained(ft), 8, 1).tolist()))
    out = tmp / "peer-starved"
    subprocess.run([peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", str(ft),
                    "--calibration", str(windows), "--bits", "3", "--group-size", "64", "--routed-only", "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peer_zeroed = sum(int((w == 0).all()) for w in load_file(out / "experts.safetensors").values())
    with Checkpoint.open(ft) as ckpt:
        experts = sorted({(m.layer, m.expert) for m in detect(ckpt).matrices})
    alloc = pd.DataFrame([{"layer": layer, "expert": e, "bits": 3} for layer, e in experts])
    packed, coverage, _ = sequential_gptq(ft, text, alloc, 64, QuantizerConfig("gptq"), seq_len=8, windows=1)
    return {"peer_zeroed_matrices": peer_zeroed, "matrices": len(packed),
            "expertbits_zeroed_matrices": sum(int((q.dequantize() == 0).all()) for q in packed.values()),
            "expertbits_fallback_experts": int((coverage.calibration_tokens < 16).sum()),
            "experts_without_tokens": int((coverage.calibration_tokens == 0).sum())}


def frontier(peer_python: str | None, pairs: list[str], budgets: list[float], bits: list[int], tmp: Path,
             variants: dict[str, dict] = VARIANTS) -> dict:
    """The quality issue's side-by-side: per pair, the peer at uniform `bits` in both of its modes
    (all experts calibrated, and routed tokens only: its better one is the bar), expertbits' GPTQ
    variants at uniform `bits`, and at each of `budgets` average bits over {2, 3, 4}."""
    from transformers import AutoTokenizer

    from expertbits.tasks.checkpoints import fetch
    from expertbits.tasks.checkpoints.texts import read_text, token_windows

    results = {}
    for pair in pairs:
        cal, held_out = TEXTS[pair]
        ft = fetch.download(f"zoo://{pair}", None, {}).path
        windows = tmp / f"{pair.replace('/', '-')}-windows.json"
        windows.write_text(json.dumps(token_windows(read_text(cal, {}), AutoTokenizer.from_pretrained(ft), 256, 16).tolist()))
        store = tmp / f"store-{pair.replace('/', '-')}"
        row = results[pair] = {}
        for b in bits:
            for routed in (False, True) if peer_python else ():
                row[f"peer{'-routed' if routed else ''}-{b}"] = peer_run(peer_python, ft, windows, b, tmp, routed, held_out)
            for name, options in variants.items():
                quantizing = {k: v for k, v in options.items() if k not in ALLOCATION}
                row[f"{name}-{b}"] = expertbits_run(pair, store, quantizer="gptq", allocator="uniform", avg_bits=b,
                                                    bit_widths=[b], **quantizing)
            print(pair, b, {k: round(v["kl"], 5) for k, v in row.items() if k.endswith(f"-{b}")}, flush=True)
        for budget in budgets:
            for name, options in variants.items():
                row[f"{name}-{budget:g}"] = expertbits_run(pair, store, quantizer="gptq", avg_bits=budget,
                                                           bit_widths=[2, 3, 4], **options)
            print(pair, budget, {k: round(v["kl"], 5) for k, v in row.items() if k.endswith(f"-{budget:g}")}, flush=True)
    return results


def frontier_table(results: dict, budgets: list[float], bits: list[int], variants=VARIANTS) -> str:
    """Markdown: one row per (pair, width or budget), the peer's two modes beside each variant."""
    lines = ["| pair | bits | llm-compressor (all / routed-only) | " + " | ".join(variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for pair, row in results.items():
        for b in [*bits, *budgets]:
            key = f"{b:g}"
            peer = (f"{row[f'peer-{key}']['kl']:.4f} / {row[f'peer-routed-{key}']['kl']:.4f}"
                    if f"peer-{key}" in row else "")
            lines.append(f"| {pair} | {key} | {peer} | " + " | ".join(
                f"{row[f'{n}-{key}']['kl']:.4f}" if f"{n}-{key}" in row else "" for n in variants) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", help="python of llm-compressor's environment (see above)")
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS))
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--budget", type=float, default=2.5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--frontier", action="store_true",
                    help="the quality issue's table instead: --pairs (default all four zoo fine-tunes) at uniform --bits "
                         "and at --budgets, the peer's two modes beside expertbits' GPTQ variants")
    ap.add_argument("--budgets", default="2.25,2.5,2.75")
    ap.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)} (default all)")
    ap.add_argument("--skip-peer", action="store_true", help="--frontier without the peer's runs (no --peer-python needed)")
    args = ap.parse_args(argv)
    if not args.peer_python and not (args.frontier and args.skip_peer):
        ap.error("--peer-python is required (only --frontier --skip-peer runs without the peer)")
    if args.frontier:
        from expertbits.flows.cli import _prefect_defaults

        _prefect_defaults()
        pairs = FRONTIER_PAIRS if args.pairs == list(PAIRS) else args.pairs
        budgets, bits = [float(b) for b in args.budgets.split(",")], [int(b) for b in args.bits.split(",")]
        variants = {n: VARIANTS[n] for n in args.variants.split(",")} if args.variants else VARIANTS
        with tempfile.TemporaryDirectory(prefix="bench-frontier-") as tmp:
            results = frontier(None if args.skip_peer else args.peer_python, list(pairs), budgets, bits, Path(tmp),
                               variants)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print(frontier_table(results, budgets, bits, variants))
        return
    from transformers import AutoTokenizer

    from expertbits.flows.cli import _prefect_defaults
    from expertbits.tasks.checkpoints import fetch
    from expertbits.tasks.checkpoints.texts import token_windows
    from expertbits.tasks.checkpoints.texts import read_text

    _prefect_defaults()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-gptq-") as tmp:
        tmp = Path(tmp)
        for pair in args.pairs:
            ft = fetch.download(f"zoo://{pair}", None, {}).path
            windows = tmp / f"{pair.replace('/', '-')}-windows.json"
            ids = token_windows(read_text(CAL_TEXT, {}), AutoTokenizer.from_pretrained(ft), 256, 16)
            windows.write_text(json.dumps(ids.tolist()))
            store = tmp / f"store-{pair.replace('/', '-')}"
            row = results[pair] = {}
            for bits in (int(b) for b in args.bits.split(",")):
                uniform = dict(allocator="uniform", avg_bits=bits, bit_widths=[bits])
                row[f"rtn-{bits}"] = expertbits_run(pair, store, quantizer="rtn", **uniform)
                row[f"gptq-{bits}"] = expertbits_run(pair, store, quantizer="gptq", rotate=False, **uniform)
                row[f"peer-{bits}"] = peer_run(args.peer_python, ft, windows, bits, tmp)
                print(pair, bits, {k: round(v["kl"], 5) for k, v in row.items() if k.endswith(f"-{bits}")}, flush=True)
            row["peer-routed-only-2"] = peer_run(args.peer_python, ft, windows, 2, tmp, routed_only=True)
            for allocator in SOLVERS:
                row[f"gptq-{args.budget:g}-{allocator}"] = expertbits_run(
                    pair, store, quantizer="gptq", rotate=False, budget_scope="layer", allocator=allocator,
                    avg_bits=args.budget, bit_widths=[2, 3, 4])
                row[f"rtn-{args.budget:g}-{allocator}"] = expertbits_run(
                    pair, store, quantizer="rtn", allocator=allocator, avg_bits=args.budget, bit_widths=[2, 3, 4])
            print(pair, {k: round(v["kl"], 5) for k, v in row.items()}, flush=True)
            row["starved"] = starved(args.peer_python, ft, tmp)
            print(pair, "starved calibration:", row["starved"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for pair, row in results.items():
        print(f"\n{pair}\n| bits | expertbits RTN | expertbits GPTQ | llm-compressor GPTQ |\n|---|---|---|---|")
        for bits in args.bits.split(","):
            print(f"| {bits} | {row[f'rtn-{bits}']['kl']:.4f} | {row[f'gptq-{bits}']['kl']:.4f} | {row[f'peer-{bits}']['kl']:.4f} |")
        for allocator in SOLVERS:
            print(f"| {args.budget:g} ({allocator}) | {row[f'rtn-{args.budget:g}-{allocator}']['kl']:.4f} | "
                  f"{row[f'gptq-{args.budget:g}-{allocator}']['kl']:.4f} | |")
        print(f"starved calibration (one 8-token window, 3 bits): {row['starved']}")


if __name__ == "__main__":
    main()
