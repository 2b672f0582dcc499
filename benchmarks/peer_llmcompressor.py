"""llm-compressor's GPTQ on the routed experts of a checkpoint: the peer side of bench_gptq_peer.py.

Runs in llm-compressor's own environment (it pins transformers and compressed-tensors versions
expertbits does not use), so it imports neither expertbits nor anything outside that
environment. Create it once:

    python -m venv peer && peer/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

Input: the checkpoint, the calibration windows (token ids, written by bench_gptq_peer.py so both
tools calibrate on the same tokens), the width and group size. Output, in --out: experts.safetensors,
every quantized module's weight as llm-compressor left it (quantized, then dequantized in place),
and modules.json naming them. Only the routed experts' linear layers are targeted; attention,
routers, shared experts and the head are ignored, as in expertbits. The recipe is llm-compressor's
GPTQModifier with its defaults (dampening 0.01, static activation ordering, calibrate all experts)
and a W{bits}A16 asymmetric group-wise scheme.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True, help="JSON list of token-id windows")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--routed-only", action="store_true",
                    help="calibrate each expert on its routed tokens only (moe_calibrate_all_experts=False)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    windows = json.loads(Path(args.calibration).read_text())
    # transformers 5.17 applies llm-compressor's expert patch by listing every transformers module
    # registered so far, which imports lazy ones; those that need packages this environment lacks
    # (torchvision for image processors) fail. They hold nothing a causal LM uses: unregister them.
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and module is not None:
            try:
                dir(module)
            except ImportError:
                del sys.modules[name]
    with load_quantizable_moe(AutoModelForCausalLM):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * len(w) for w in windows]})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=False, strategy="group", group_size=args.group_size))
    recipe = GPTQModifier(config_groups={"experts": scheme}, dampening_frac=0.01,
                          ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$",
                                  "re:.*shared_expert.*"])
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(windows),
            max_seq_length=max(len(w) for w in windows), shuffle_calibration_samples=False,
            moe_calibrate_all_experts=not args.routed_only)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {name: m.weight.detach().float().contiguous() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")}
    from safetensors.torch import save_file

    save_file(weights, out / "experts.safetensors")
    (out / "modules.json").write_text(json.dumps({"modules": sorted(weights), "seconds": seconds, "bits": args.bits,
                                                  "group_size": args.group_size, "routed_only": args.routed_only}, indent=1))
    print(f"peer: {len(weights)} modules quantized in {seconds:.1f} s")


if __name__ == "__main__":
    main()
