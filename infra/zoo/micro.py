"""Micro Mixtral builder: a real (trained, not random) MoE pair in seconds to minutes on a CPU.

Used two ways: tests build a tiny pair on the fly, and `python -m expertbits.zoo.micro` rebuilds
the bundled `zoo://micro-mixtral/{base,finetuned}` pair that the main job runs on by default.
The base is pretrained on Python's reference documentation (prose); the fine-tune continues on
Python source code, a domain shift that moves the routers.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import text_path
from .train import Stream, TrainConfig, train_causal


@dataclass(frozen=True)
class MicroConfig:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    vocab: int = 512
    seq_len: int = 128
    batch: int = 16


def train_tokenizer(text: str, vocab: int):
    """Byte-level BPE trained on the pretraining text; deterministic for a given text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


def _model(cfg: MicroConfig, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        num_local_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.seq_len * 4,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,  # balance is per layer, in train.py
        eos_token_id=0,
        bos_token_id=0,
    )
    return MixtralForCausalLM(config)


def _save(model, tokenizer, out: Path, card: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


def build_pair(
    out: str | Path,
    *,
    pretrain_text: str,
    finetune_text: str,
    cfg: MicroConfig = MicroConfig(),
    pretrain_steps: int = 400,
    finetune_steps: int = 150,
    seed: int = 0,
    log=print,
) -> tuple[Path, Path]:
    """Train a base on `pretrain_text`, fine-tune it on `finetune_text`; write both under `out`."""
    torch.set_num_threads(1)  # 2-core machines: threads oversubscribe and slow torch 50x
    out = Path(out)
    tokenizer = train_tokenizer(pretrain_text, cfg.vocab)
    pre_ids = torch.tensor(tokenizer(pretrain_text)["input_ids"])
    ft_ids = torch.tensor(tokenizer(finetune_text)["input_ids"])
    model = _model(cfg, seed)
    def steps(n: int, lr: float, seed: int) -> TrainConfig:
        return TrainConfig(steps=n, lr=lr, batch=cfg.batch, seq_len=cfg.seq_len, seed=seed)

    base_record = train_causal(model, [Stream(pre_ids)], steps(pretrain_steps, 3e-3, seed), log)
    base = _save(model, tokenizer, out / "base", {"config": asdict(cfg), "pretrain": base_record})
    ft_record = train_causal(model, [Stream(ft_ids)], steps(finetune_steps, 1e-3, seed + 1), log)
    ft = _save(model, tokenizer, out / "finetuned", {"config": asdict(cfg), "pretrain": base_record, "finetune": ft_record})
    return base, ft


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the bundled micro-mixtral base/finetuned pair.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models" / "micro-mixtral")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--finetune-steps", type=int, default=150)
    args = parser.parse_args()
    build_pair(
        args.out,
        pretrain_text=text_path("docs-train").read_text(),
        finetune_text=text_path("code-train").read_text(),
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
    )


if __name__ == "__main__":
    main()
