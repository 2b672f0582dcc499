"""The GPU check's report: DIR/gpu_check.json and a markdown summary, from what gpu_check.sh wrote.

    python benchmarks/gpu_report.py DIR [--dry-run]

It reads DIR/steps.jsonl (each step's exit status and seconds), DIR/pytest.xml, DIR/fused_moe.json
and DIR/{gptq,rtn}.json, and judges the issue's targets, each with its figure and how far it is
from the target:

* GPTQ on a Mixtral-8x7B-shaped layer in at most 30 s (the calibration stage's GPTQ errors and the
  quantization stage's GPTQ, per MoE layer);
* a whole-model RTN run projected under 15 minutes (every stage scaled to 32 layers);
* the fused kernel at 1 token: 4-bit at least 3× bf16, 2-bit at least 1.5× 4-bit, the 2.5-bit mix
  faster than 4-bit, 4-bit at least 60 % of the device's peak memory bandwidth.

With --dry-run (CUDA hidden, tiny shapes) the targets are reported as not judged: the figures of a
dry run mean nothing. Exit status 1 if a step failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

GPTQ_LAYER_SECONDS, RTN_MODEL_MINUTES = 30.0, 15.0
FULL_LAYERS = 32


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def pytest_counts(path: Path) -> dict | None:
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def _target(what: str, got: float | None, want: float, judged: bool, at_most: bool = False) -> dict:
    met = None if got is None or not judged else (got <= want if at_most else got >= want)
    return {"target": what, "value": got, "wanted": want, "met": met,
            "off_by": None if met is None or met else round(abs(got - want) / want, 3)}


def stages(run: dict | None) -> dict[str, dict]:
    """{stage: summed seconds, max peak GPU bytes} of one bench_realsize model."""
    out: dict[str, dict] = {}
    for model in (run or {}).values():
        for r in model["stages"]:
            s = out.setdefault(r["stage"], {"seconds": 0.0, "peak_gpu_bytes": None})
            s["seconds"] += r["seconds"]
            if r.get("peak_gpu_bytes") is not None:
                s["peak_gpu_bytes"] = max(s["peak_gpu_bytes"] or 0, r["peak_gpu_bytes"])
    return out


def report(out: Path, dry: bool) -> dict:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    fused, gptq, rtn = (_read(out / f) for f in ("fused_moe.json", "gptq.json", "rtn.json"))
    judged = not dry
    targets = []
    layers = next(iter((gptq or {}).values()), {}).get("layers", 2)
    g = stages(gptq)
    gptq_s = sum(g.get(s, {}).get("seconds", 0.0) for s in ("calibration (gptq)", "quantization (gptq)")) or None
    quant_s = g.get("quantization (gptq)", {}).get("seconds")
    targets.append(_target("GPTQ quantization, seconds per Mixtral-8x7B-shaped layer",
                           None if quant_s is None else round(quant_s / layers, 2), GPTQ_LAYER_SECONDS, judged, True))
    r = stages(rtn)
    rtn_layers = next(iter((rtn or {}).values()), {}).get("layers", 2)
    rtn_total = sum(s["seconds"] for s in r.values()) or None
    targets.append(_target("whole-model RTN run, projected minutes for 32 layers",
                           None if rtn_total is None else round(rtn_total * FULL_LAYERS / rtn_layers / 60, 2),
                           RTN_MODEL_MINUTES, judged, True))
    if fused:
        by = {(row["shape"], row["tokens"], row["config"]): row for row in fused["rows"]}
        for shape in dict.fromkeys(row["shape"] for row in fused["rows"]):
            if (shape, 1, "bf16") not in by:
                continue
            b, q4, q2, mx = (by[shape, 1, c] for c in ("bf16", "4bit", "2bit", "mixed"))
            targets += [_target(f"{shape}, 1 token: 4-bit speed-up over bf16", round(b["ms"] / q4["ms"], 2), 3.0, judged),
                        _target(f"{shape}, 1 token: 2-bit speed-up over 4-bit", round(q4["ms"] / q2["ms"], 2), 1.5, judged),
                        _target(f"{shape}, 1 token: 2.5-bit mix speed-up over 4-bit", round(q4["ms"] / mx["ms"], 2), 1.0,
                                judged),
                        _target(f"{shape}, 1 token: 4-bit share of peak memory bandwidth",
                                None if q4.get("pct_peak") is None else round(q4["pct_peak"] / 100, 3), 0.6, judged)]
    return {"dry_run": dry, "device": (fused or {}).get("device"), "steps": steps,
            "pytest": pytest_counts(out / "pytest.xml"), "fused_moe": fused, "gptq_stages": g, "rtn_stages": r,
            "gptq_seconds_per_layer_with_errors": None if gptq_s is None else round(gptq_s / layers, 2),
            "targets": targets}


def markdown(rep: dict) -> str:
    lines = [f"GPU check{' (dry run: figures mean nothing)' if rep['dry_run'] else ''} on {rep['device']}", "",
             "| step | exit status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in rep["steps"]]
    lines += ["", "| target | value | wanted | met |", "|---|---|---|---|"]
    for t in rep["targets"]:
        met = "not judged" if t["met"] is None else "met" if t["met"] else f"missed by {100 * t['off_by']:.0f}%"
        lines.append(f"| {t['target']} | {t['value']} | {t['wanted']} | {met} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    rep = report(args.out, args.dry_run)
    (args.out / "gpu_check.json").write_text(json.dumps(rep, indent=1))
    md = markdown(rep)
    (args.out / "gpu_check.md").write_text(md + "\n")
    print(md)
    return 1 if any(s["rc"] != 0 for s in rep["steps"]) else 0


if __name__ == "__main__":
    sys.exit(main())
