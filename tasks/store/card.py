"""The model card of a run's quantized folder: `quantization/README.md`, in the hub's format.

    ---
    base_model: org/name            the checkpoint quantized, when it came from the hub (hf://)
    base_model_relation: quantized
    library_name: expertbits
    license: apache-2.0             carried over from the source checkpoint's card, when it has one
    tags: [moe, quantized, expertbits, mixed-precision, 2-bit, 3-bit, 4-bit, mixtral]
    pipeline_tag: text-generation
    ---
    # <checkpoint name>, <average> expert bits
    what it is, the allocation summary, a per-layer width table, KL and perplexity, lm-eval
    results when the run has them, how to load it, how it was made

Written when a run is published (publish.py), from the run's own records, and listed in the
manifest like every other file, so `expertbits verify` and every loader's check cover it.
Rendering only: the caller reads the files.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

# run parameters that say where, not what: left out of the card's command
PLACE = ("store", "storage_options", "cache_dir", "event_id", "device")
CARRIED = ("license", "license_name", "license_link")
HUB_URI = re.compile(r"^hf://([A-Za-z0-9][\w.-]*/[\w.-]+)")


def source_license(card_text: str | None) -> dict[str, str]:
    """The license fields of the source checkpoint's card front matter (YAML, read safely)."""
    if not card_text or not card_text.lstrip("\ufeff").startswith("---"):
        return {}
    body = card_text.lstrip("\ufeff").split("\n", 1)[-1]
    end = re.search(r"^(---|\.\.\.)\s*$", body, re.M)
    try:
        meta = yaml.safe_load(body[: end.start()] if end else "") or {}
    except yaml.YAMLError:
        return {}
    # a string each, as the hub's metadata wants; anything else (a list, a mapping) is not carried
    return {k: meta[k] for k in CARRIED if isinstance(meta, dict) and isinstance(meta.get(k), str) and meta[k].strip()}


def base_model(checkpoint_uri: str) -> str | None:
    """The hub id of an hf:// checkpoint (revision dropped), else None: the hub reads `base_model`
    as a model of the hub, so a folder, s3:// or zoo:// source is named in the card's text only."""
    m = HUB_URI.match(checkpoint_uri)
    return m.group(1) if m else None


def _command(parameters: dict) -> str:
    def value(v: Any) -> str:  # quoted for a POSIX shell: '*.o_proj=8' must not be globbed when pasted
        return shlex.quote(",".join(map(str, v)) if isinstance(v, list) else str(v))

    parts = ["expertbits quantize"]
    for name, v in parameters.items():
        if name in PLACE or v is None or v == [] or v == {}:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            parts.append(flag if v else f"--no-{name.replace('_', '-')}")
        else:
            parts.append(f"{flag} {value(v)}")
    return " \\\n    ".join(parts)


def widths_table(expert_bits: dict[str, list[int]]) -> str:
    widths = sorted({b for per in expert_bits.values() for b in per})
    lines = ["| MoE layer | experts | " + " | ".join(f"{b}-bit" for b in widths) + " | mean bits |",
             "|---|---|" + "---|" * len(widths) + "---|"]
    for layer in sorted(expert_bits, key=int):
        per = expert_bits[layer]
        lines.append(f"| {layer} | {len(per)} | " + " | ".join(str(per.count(b)) for b in widths)
                     + f" | {sum(per) / len(per):.3f} |")
    return "\n".join(lines)


def render(*, parameters: dict, quantization_config: dict, summaries: dict[str, dict],
           evaluation: dict, lm_eval: str | None = None, source_card: str | None = None,
           encoder_decoder: bool = False, model_type: str = "", version: str = "") -> str:
    """The card's text. `summaries`: the stage summaries the manifest holds (allocation, quantization)."""
    qc, al, q = quantization_config, summaries.get("allocation", {}), summaries.get("quantization", {})
    expert_bits = qc.get("expert_bits", {})
    widths = sorted({b for per in expert_bits.values() for b in per})
    dense = {name: spec.get("bits") for name, spec in (qc.get("dense_modules") or {}).items()}
    head_packed = any(name == "lm_head" or name.endswith(".lm_head") for name in dense)
    hub_id = base_model(parameters["checkpoint"])
    front = {**({"base_model": hub_id, "base_model_relation": "quantized"} if hub_id else {}),
             "library_name": "expertbits", **source_license(source_card),
             "tags": ["moe", "quantized", "expertbits", "mixed-precision", *[f"{b}-bit" for b in widths],
                      *([model_type] if model_type else [])],
             "pipeline_tag": "text2text-generation" if encoder_decoder else "text-generation"}
    ev = evaluation
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---",
        # not the run id: it names the store too, and a run's files are the same bytes in any store
        f"# {parameters['checkpoint'].rstrip('/').rsplit('/', 1)[-1]}, "
        f"{al.get('achieved_avg_bits', parameters.get('avg_bits'))} expert bits", "",
        f"`{parameters['checkpoint']}` with every routed expert at its own bit-width "
        f"({', '.join(f'{b}' for b in widths)} bits, {al.get('achieved_avg_bits', parameters.get('avg_bits'))} on average), "
        f"made by expertbits{f' {version}' if version else ''}. "
        f"Only expertbits' loader (and its vLLM plugin) runs these packed weights."
        + ("" if hub_id else " The source is not a hub model, so the metadata names no `base_model`."), "",
        "## Allocation", "",
        "| | |", "|---|---|",
        f"| allocator | {al.get('allocator', parameters.get('allocator'))} ({al.get('scope', '')} budget, "
        f"{al.get('granularity', parameters.get('granularity', 'expert'))} granularity) |",
        f"| average expert bits requested / achieved | {al.get('requested_avg_bits')} / {al.get('achieved_avg_bits')} |",
        f"| effective bits per expert weight (with scales and zero points) | {q.get('effective_bits')} |",
        f"| quantizer | {q.get('quantizer', 'rtn')}, group size {qc.get('group_size')}, "
        f"{'symmetric' if qc.get('symmetric') else 'asymmetric'} |",
        f"| experts per width | {', '.join(f'{b} bits: {n}' for b, n in sorted((al.get('experts_per_bits') or {}).items()))} |",
        f"| dense layers | {f'{len(dense)} packed ({sorted(set(dense.values()))} bits)' if dense else 'as stored'} |",
        f"| whole model against bf16 | {100 * q.get('fraction_of_bf16', 0):.1f}% of the bytes, "
        f"{q.get('model_bits_per_parameter', 0):.2f} bits per parameter |", "",
        "### Widths per layer", "", widths_table(expert_bits), "",
        "## Quality", "",
        f"Against the full-precision checkpoint on `{ev.get('text')}` ({ev.get('tokens')} tokens, {ev.get('windows')} "
        f"windows of {ev.get('seq_len')}, {ev.get('objective', 'next-token')}):", "",
        "| metric | value |", "|---|---|",
        f"| KL(fp ‖ quantized) per token | {ev.get('kl', float('nan')):.5f} |",
        f"| perplexity, full precision | {ev.get('ppl_fp', float('nan')):.3f} |",
        f"| perplexity, quantized | {ev.get('ppl_quant', float('nan')):.3f} |", "",
    ]
    if lm_eval:  # the lm-eval stage's side-by-side table (markdown)
        lines += ["### lm-evaluation-harness", "", lm_eval.rstrip(), ""]
    lines += [
        "## How to load it", "",
        "With expertbits installed, from this folder or a download of it:", "",
        "```python", "import expertbits", "", 'model, tokenizer = expertbits.load("path/to/this/folder")', "```", "",
        "Or with transformers: `import expertbits.tasks.model.load` (it registers the format), then "
        "`AutoModelForCausalLM.from_pretrained(folder)`. `expertbits generate --model <folder> --prompt ...` continues "
        "a prompt.", "",
    ]
    if encoder_decoder:
        lines += ["vLLM does not run this encoder-decoder MoE.", ""]
    elif head_packed:
        lines += ["vLLM refuses this folder: its head is packed (`--dense-override lm_head=...`), and vLLM's head takes "
                  "no quantization method.", ""]
    else:
        lines += ["With vLLM and expertbits in its environment (the plugin registers itself; see expertbits' "
                  "docs/serving.md): `LLM(model=\"path/to/this/folder\")`, no quantization flag.", ""]
    lines += ["## How it was made", "", "```", _command(parameters), "```", ""]
    return "\n".join(lines)
