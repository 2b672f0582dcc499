"""Measure each zoo checkpoint and write its model card (README.md + metrics.json).

Per checkpoint: perplexity on every held-out domain, supersense accuracy, KL(fp ‖ quant) of
uniform round-to-nearest at 4, 3 and 2 bits (the pipeline's own quantizer), per-layer expert
usage on held-out text, and for fine-tunes the per-expert Λ beside the control's.

    python -m expertbits.zoo.cards mixtral-tiny
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch

from expertbits.tasks.allocation.statistics import collect
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.checkpoints.texts import examples, token_windows
from expertbits.tasks.measure.evaluate import evaluate
from expertbits.tasks.quantization.writer import quantize_checkpoint

from . import corpora
from .build_zoo import FAMILIES, MODELS

DOMAINS = ("austen", "web", "python", "wordnet-supersense")
SPLIT = {"wordnet-supersense": "test"}
WINDOWS, SEQ_LEN, GROUP = 32, 256, 64
# Encoder-decoder models are measured on windows as long as they were trained on: T5-style
# relative-position buckets beyond the trained span keep their random init and wreck longer inputs.
SEQ2SEQ_LEN = 128
KL_DOMAIN = {"wordnet": "wordnet-supersense", "code": "python"}  # others: web


def trained_domains(family: str, variant: str) -> list[str]:
    """The held-out domains whose training split this checkpoint (or an ancestor) was trained on."""
    names, v = set(), FAMILIES[family]["variants"][variant]
    while True:
        names |= {name for name, _ in v.data}
        if v.parent is None:
            return [d for d in DOMAINS if d in names]
        v = FAMILIES[family]["variants"][v.parent]


def min_usage(usage: dict[str, list[list[float]]], domains) -> float:
    """The least-used expert's routing share (× fair share) over every layer and the given domains."""
    return min(min(layer) for d in domains for layer in usage[d])


def heldout(name: str) -> str:
    return corpora.read(name, SPLIT.get(name, "heldout"))


def _routers(out) -> list[torch.Tensor]:
    """Per-layer router logits as [tokens, experts], for decoder-only and encoder-decoder outputs."""
    if getattr(out, "encoder_router_logits", None) is not None:
        layers = [*out.encoder_router_logits, *out.decoder_router_logits]
    else:
        layers = list(out.router_logits)
    return [r.reshape(-1, r.shape[-1]) for r in layers if r is not None and r.dim() >= 2]


def seq_len(seq2seq: bool) -> int:
    return SEQ2SEQ_LEN if seq2seq else SEQ_LEN


def perplexity_and_usage(model, tok, text: str) -> tuple[float, torch.Tensor]:
    """Perplexity (of the training objective), and each layer's routing share per expert vs a fair share (1.0)."""
    seq2seq = model.config.is_encoder_decoder
    k = 1 if seq2seq else model.config.num_experts_per_tok
    nll, count, usage = 0.0, 0, None
    with torch.no_grad():
        for inputs, target in examples(token_windows(text, tok, seq_len(seq2seq), WINDOWS), tok, seq2seq):
            out = model(**inputs, output_router_logits=True)
            logits = out.logits[0].float()
            logp = torch.log_softmax(logits if seq2seq else logits[:-1], -1)
            nll -= float(logp.gather(1, target[:, None]).sum())
            count += len(target)
            chosen = torch.stack([r.topk(k, dim=-1).indices.flatten().bincount(minlength=r.shape[-1]) for r in _routers(out)])
            usage = chosen if usage is None else usage + chosen
    experts = usage.shape[1]
    return math.exp(nll / count), usage.float() / usage.sum(1, keepdim=True) * experts


def supersense_accuracy(model, tok, limit: int | None = None, device: str = "cpu") -> float:
    """Share of test glosses whose most likely label (summed label-token log-prob) is right
    (the model runs on `device`; its scores are read on the host)."""
    labels = corpora.SUPERSENSE_LABELS
    seq2seq = model.config.is_encoder_decoder
    answers = [tok(f" {label}", add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if seq2seq else [])
               for label in labels]
    correct = 0
    examples_ = corpora.supersense_examples("test")[:limit]
    with torch.no_grad():
        for gloss, gold in examples_:
            if seq2seq:
                x = tok(f"supersense: {gloss}", add_special_tokens=False)["input_ids"]
                targets = torch.tensor([a + [-100] * (max(map(len, answers)) - len(a)) for a in answers])
                logp = model(input_ids=torch.tensor([x] * len(labels)).to(device), labels=targets.to(device),
                             use_cache=False).logits.float().log_softmax(-1).cpu()
                scores = [sum(float(logp[i, j, t]) for j, t in enumerate(a)) for i, a in enumerate(answers)]
            else:
                prompt = tok(f"{gloss} =>", add_special_tokens=False)["input_ids"]
                width = len(prompt) + max(map(len, answers))
                batch = torch.full((len(labels), width), tok.pad_token_id)
                for i, a in enumerate(answers):
                    batch[i, : len(prompt) + len(a)] = torch.tensor(prompt + a)
                logp = model(batch.to(device), use_cache=False).logits.float().log_softmax(-1).cpu()
                scores = [sum(float(logp[i, len(prompt) - 1 + j, t]) for j, t in enumerate(a)) for i, a in enumerate(answers)]
            correct += labels[max(range(len(labels)), key=scores.__getitem__)] == gold
    return correct / len(examples_)


def uniform_kl(path: Path, text: str) -> dict[int, float]:
    with Checkpoint.open(path) as c:
        experts = [(layer.layer, e) for layer in detect(c).layers for e in range(layer.num_experts)]
        seq2seq = bool(c.config.get("is_encoder_decoder"))
    out = {}
    for bits in (4, 3, 2):
        alloc = pd.DataFrame([{"layer": l, "expert": e, "bits": bits} for l, e in experts])
        with tempfile.TemporaryDirectory() as tmp:
            quantize_checkpoint(path, alloc, GROUP, Path(tmp) / "q")
            out[bits] = evaluate(path, Path(tmp) / "q", text, seq_len=seq_len(seq2seq), windows=WINDOWS)["kl"]
    return out


def experts_off_kl(path: Path, text: str) -> float:
    """KL(fp ‖ the same model with every routed expert's output projection zeroed): how much
    the routed experts matter at all, the ceiling any quantization of them approaches."""
    from expertbits.tasks.measure.evaluate import Reference

    with Checkpoint.open(path) as c:
        seq2seq = bool(c.config.get("is_encoder_decoder"))
        down = {m.key for m in detect(c).matrices if m.role == "down"}
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # per-expert keys match by name; fused tensors (experts.down_proj) by their module
            if name in down or (name.endswith("experts.down_proj") and ".mlp." in name):
                param.zero_()
    with Reference(path, text, seq_len=seq_len(seq2seq), windows=WINDOWS) as ref:
        return ref.compare(model)["kl"]


def lambdas(family: str, variant: str) -> list[dict] | None:
    parent = FAMILIES[family]["variants"][variant].parent
    if parent is None:
        return None
    with Checkpoint.open(MODELS / family / variant) as ft, Checkpoint.open(MODELS / family / parent) as ref:
        stats, _ = collect(ft, ref)
    return stats[["layer", "expert", "lambda_score"]].round(5).to_dict(orient="records")


def measure(family: str, variant: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch.set_num_threads(1)
    path = MODELS / family / variant
    tok = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if FAMILIES[family].get("seq2seq") else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.float32).eval()
    ppl, usage = {}, {}
    for domain in DOMAINS:
        ppl[domain], share = perplexity_and_usage(model, tok, heldout(domain))
        usage[domain] = share.round(decimals=3).tolist()
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"parameters": params, "expert_parameters": expert_params, "perplexity": ppl,
            "supersense_accuracy": supersense_accuracy(model, tok),
            "kl_uniform_rtn": {"group_size": GROUP, "text": KL_DOMAIN.get(variant, "web"),
                               **{str(b): v for b, v in uniform_kl(path, heldout(KL_DOMAIN.get(variant, "web"))).items()}},
            "expert_usage_vs_fair_share": usage,
            "min_expert_usage": min_usage(usage, usage),
            "lambda": lambdas(family, variant)}


def fmt_kl(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"  # Switch's KL is 1e-5..1e-4: keep its digits


def _balance(t: dict) -> str:
    """How the run balanced its routers, from its TrainConfig record."""
    scope = "per sequence" if t.get("balance_per_sequence") else "per data stream" if t.get("balance_per_stream") else "per batch"
    parts = [f"loss coefficient {t['balance_coef']:g} per layer, {scope}", f"router z-loss {t['z_coef']:g}"]
    if t.get("bias_step"):
        parts.append(f"router bias stepped ±{t['bias_step']:g} towards the mean load after every step")
    return "; ".join(parts)


def write_card(family: str, variant: str, metrics: dict) -> None:
    path = MODELS / family / variant
    training = json.loads((path / "training.json").read_text())
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    t = training["train"]
    # the base model in the card's front matter, as the hub writes it: expertbits reads it as the
    # reference when none is given (tasks/checkpoints/reference.py)
    front = ["---", f"base_model: ../{training['parent']}", "---"] if training["parent"] else []
    lines = [*front, f"# zoo://{family}/{variant}", "", training["description"][:1].upper() + training["description"][1:] + ".", "",
             f"- parameters: {metrics['parameters']:,} ({metrics['expert_parameters']:,} in routed experts)",
             f"- data: " + ", ".join(f"{d['corpus']} (share {d['share']:g})" for d in training["data"]),
             f"- training: {t['steps']} steps × {t['batch']} sequences of up to {t['seq_len']} tokens ({t['tokens']:,} tokens), "
             f"lr {t['lr']}, seed {t['seed']}, {t['wall_s']:.0f} s on {training['machine']}",
             "- routing balance: " + _balance(t),
             f"- continues: zoo://{family}/{training['parent']}" if training["parent"] else "- trained from scratch",
             "", "| held-out domain | trained on | perplexity | min expert usage (× fair share) |", "|---|---|---|---|"]
    trained = trained_domains(family, variant)
    for d, v in metrics["perplexity"].items():
        lines.append(f"| {d} | {'yes' if d in trained else 'no'} | {v:.2f} | {min_usage(metrics['expert_usage_vs_fair_share'], [d]):.2f} |")
    kl = metrics["kl_uniform_rtn"]
    lines += ["", f"Supersense accuracy (8 classes, chance 12.5%): {100 * metrics['supersense_accuracy']:.1f}%", "",
              f"KL(fp ‖ uniform RTN, group {kl['group_size']}) per token on {kl['text']}: "
              f"4-bit {fmt_kl(kl['4'])}, 3-bit {fmt_kl(kl['3'])}, 2-bit {fmt_kl(kl['2'])}", ""]
    domain = KL_DOMAIN.get(variant, "web")
    usage = metrics["expert_usage_vs_fair_share"][domain]
    lines += [f"Routing share per expert on held-out {domain} (1.00 = fair share):", "",
              "| layer | " + " | ".join(f"e{e}" for e in range(len(usage[0]))) + " |", "|---|" + "---|" * len(usage[0])]
    lines += [f"| {i} | " + " | ".join(f"{u:.2f}" for u in layer) + " |" for i, layer in enumerate(usage)]
    if metrics.get("lambda"):
        control = lambdas(family, "control") if variant != "control" and "control" in FAMILIES[family]["variants"] \
            and (MODELS / family / "control").is_dir() else None
        lines += ["", "Router-norm change Λ = ‖w_ft‖ − ‖w_base‖ per expert" +
                  (" (the same-length control continuation's Λ below it, in italics):" if control else ":"), "",
                  "| layer | " + " | ".join(f"e{e}" for e in range(len(usage[0]))) + " |", "|---|" + "---|" * len(usage[0])]
        for layer in sorted({r["layer"] for r in metrics["lambda"]}):
            lines.append(f"| {layer} | " + " | ".join(f"{r['lambda_score']:+.4f}" for r in metrics["lambda"] if r["layer"] == layer) + " |")
            if control:
                lines.append("| | " + " | ".join(f"*{r['lambda_score']:+.4f}*" for r in control if r["layer"] == layer) + " |")
    (path / "README.md").write_text("\n".join(lines) + "\n")


def table(family: str) -> str:
    """One markdown row per measured checkpoint of a family: the README's zoo table."""
    rows = ["| checkpoint | parameters | training tokens | ppl austen / web / python / supersense | accuracy | "
            "KL 4 / 3 / 2 bits | Λ range (std) | min usage, trained / all domains |", "|---|---|---|---|---|---|---|---|"]
    for variant in FAMILIES[family]["variants"]:
        path = MODELS / family / variant
        if not (path / "metrics.json").is_file():
            continue
        m, t = json.loads((path / "metrics.json").read_text()), json.loads((path / "training.json").read_text())
        tokens = t["train"]["tokens"] + (t["parent_training"]["train"]["tokens"] if t["parent_training"] else 0)
        ppl = " / ".join(f"{m['perplexity'][d]:.1f}" for d in DOMAINS)
        kl = m["kl_uniform_rtn"]
        lam = torch.tensor([r["lambda_score"] for r in m["lambda"]]) if m.get("lambda") else None
        spread = f"{lam.min():+.3f} … {lam.max():+.3f} ({lam.std():.3f})" if lam is not None else "–"
        rows.append(f"| `zoo://{family}/{variant}` | {m['parameters'] / 1e6:.2f} M | {tokens / 1e6:.2f} M | {ppl} | "
                    f"{100 * m['supersense_accuracy']:.1f}% | {fmt_kl(kl['4'])} / {fmt_kl(kl['3'])} / {fmt_kl(kl['2'])} | {spread} | "
                    f"{min_usage(m['expert_usage_vs_fair_share'], trained_domains(family, variant)):.2f} / "
                    f"{m['min_expert_usage']:.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure zoo checkpoints and write their model cards.")
    parser.add_argument("family")
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--rewrite", action="store_true", help="rewrite the cards from metrics.json, measuring nothing")
    parser.add_argument("--table", action="store_true", help="print the family's summary table")
    parser.add_argument("--experts-off", action="store_true",
                        help="print KL with every routed expert removed, on each variant's KL text")
    args = parser.parse_args()
    if args.table:
        print(table(args.family))
        return
    for variant in args.variants or list(FAMILIES[args.family]["variants"]):
        if args.experts_off:
            torch.set_num_threads(1)
            domain = KL_DOMAIN.get(variant, "web")
            print(f"zoo://{args.family}/{variant}: KL with routed experts removed on {domain}: "
                  f"{experts_off_kl(MODELS / args.family / variant, heldout(domain)):.4f}")
            continue
        if args.rewrite:
            write_card(args.family, variant, json.loads((MODELS / args.family / variant / "metrics.json").read_text()))
            continue
        metrics = measure(args.family, variant)
        write_card(args.family, variant, metrics)
        print(variant, json.dumps({k: metrics[k] for k in ("perplexity", "supersense_accuracy", "kl_uniform_rtn", "min_expert_usage")}))


if __name__ == "__main__":
    main()
