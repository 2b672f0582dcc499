"""Self-generated calibration text (MoEQuant's self-sampling) against each pair's own calibration
text, for the default quantize run at 2.5 bits on the four decoder-only zoo pairs.

The full-precision fine-tune samples its own calibration text (temperature 1, from the EOS token,
16 samples of 320 tokens, enough for the default calibration's 16 windows of 256), and `expertbits quantize` is
run with it as `--calibration-text`; KL is measured on each pair's held-out text as always.

    OMP_NUM_THREADS=1 python benchmarks/bench_self_calibration.py [--out benchmarks/results/self_calibration.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from expertbits.zoo import resolve
from expertbits.zoo.leagues import PAIRS

DECODER_PAIRS = ("mixtral-wordnet", "mixtral-code", "mixtral-control", "qwen-moe-wordnet")
WINDOWS, SEQ_LEN = 16, 256


def self_sampled(checkpoint: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    start = torch.full((WINDOWS, 1), tok.eos_token_id)
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=SEQ_LEN + 64, min_new_tokens=SEQ_LEN + 64, pad_token_id=tok.eos_token_id)
    return "\n\n".join(tok.decode(row[1:], skip_special_tokens=True) for row in out)


def kl_of(pair: str, store: Path, calibration: str | None) -> dict:
    p = PAIRS[pair]
    cmd = [sys.executable, "-m", "expertbits.flows.cli", "quantize", "--checkpoint", p["checkpoint"], "--reference", p["reference"], "--eval-text",
           p["eval_text"], "--calibration-text", calibration or p["calibration_text"], "--store", str(store)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    m = re.search(r"run (\S+): .* KL ([0-9.]+)", done.stdout)
    return {"run": m.group(1), "kl": float(m.group(2)), "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/self_calibration.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in DECODER_PAIRS:
            text = Path(tmp) / f"{pair}-self.txt"
            text.write_text(self_sampled(PAIRS[pair]["checkpoint"]))
            own, self_ = kl_of(pair, Path(tmp) / "store", None), kl_of(pair, Path(tmp) / "store", str(text))
            rows.append({"pair": pair, "own_text_kl": own["kl"], "self_sampled_kl": self_["kl"],
                         "change": round(self_["kl"] / own["kl"] - 1, 4), "self_text_chars": len(text.read_text())})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"windows": WINDOWS, "seq_len": SEQ_LEN, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
