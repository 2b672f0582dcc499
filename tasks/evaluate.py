"""Stage 6: how far the quantized model is from full precision on held-out text.

Token-level KL(p_fp ‖ p_quant), averaged over every predicted token, plus the perplexity of
both models. The text is cut into `windows` non-overlapping windows of `seq_len` tokens, spread
evenly over the file so a short file is not read twice. Decoder-only models predict each next
token of a window; encoder-decoder models (Switch) predict the spans hidden from each window by
seeded span corruption, the objective they were trained on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError

Progress = Callable[[float, str], None]


def token_windows(text: str, tokenizer, seq_len: int, windows: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        raise CheckpointError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}",
                              "give a longer --eval-text or a smaller --eval-seq-len")
    n = min(windows, available)
    starts = [round(i * (available - 1) / max(1, n - 1)) * seq_len for i in range(n)] if n > 1 else [0]
    return torch.tensor([ids[s : s + seq_len] for s in starts])


def _load(path: Path, seq2seq: bool):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the flow reports its own progress
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        raise CheckpointError(f"{path}: transformers cannot load it as a {'seq2seq' if seq2seq else 'causal'} LM ({e})",
                              "evaluation supports decoder-only and encoder-decoder language models") from e
    return model.eval()


def examples(ids: torch.Tensor, tokenizer, seq2seq: bool) -> list[tuple[dict, torch.Tensor]]:
    """(model inputs, target tokens) per window: next tokens, or span-corruption targets."""
    if not seq2seq:
        return [({"input_ids": w[None]}, w[1:]) for w in ids]
    from .seq2seq import sentinel_ids, span_corrupt

    gen, sentinels = torch.Generator().manual_seed(0), sentinel_ids(tokenizer)
    out = []
    for w in ids:
        x, y = span_corrupt(w.tolist(), sentinels, tokenizer.eos_token_id, gen)
        out.append(({"input_ids": torch.tensor([x]), "labels": torch.tensor([y])}, torch.tensor(y)))
    return out


def log_probs(model, inputs: dict) -> torch.Tensor:
    """Log-probabilities of the predictions aligned with the targets of `examples`."""
    logits = model(**inputs).logits[0].float()
    return torch.log_softmax(logits if "labels" in inputs else logits[:-1], -1)


class Reference:
    """The full-precision model's predictions on the evaluation text, computed once and compared
    against any number of quantized variants (the league table evaluates dozens)."""

    def __init__(self, fp_path: Path, text: str, *, seq_len: int = 256, windows: int = 16):
        from transformers import AutoConfig, AutoTokenizer

        torch.manual_seed(0)
        self.seq_len = seq_len
        self.seq2seq = bool(getattr(AutoConfig.from_pretrained(fp_path), "is_encoder_decoder", False))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(fp_path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{fp_path}: no usable tokenizer ({e})", "save the tokenizer with the checkpoint") from e
        self.pairs = examples(token_windows(text, self.tokenizer, seq_len, windows), self.tokenizer, self.seq2seq)
        self.model = _load(fp_path, self.seq2seq)
        with torch.no_grad():
            self.log_probs = [log_probs(self.model, inputs) for inputs, _ in self.pairs]
        self.nll = -sum(float(lp.gather(1, t[:, None]).sum()) for lp, (_, t) in zip(self.log_probs, self.pairs))
        self.count = sum(len(t) for _, t in self.pairs)

    def load(self, path: Path):
        return _load(path, self.seq2seq)

    @staticmethod
    def load_quantized(path: Path):
        """The shipped artifact, loaded the way a user loads it (experts run from the packed weights)."""
        from .loader import load

        return load(path, dtype=torch.float32)[0]

    def compare(self, q_model, progress: Progress | None = None) -> dict:
        kl_sum, nll_q = 0.0, 0.0
        with torch.no_grad():
            for i, ((inputs, target), logp) in enumerate(zip(self.pairs, self.log_probs)):
                logq = log_probs(q_model, inputs)
                kl_sum += float((logp.exp() * (logp - logq)).sum())
                nll_q -= float(logq.gather(1, target[:, None]).sum())
                if progress:
                    progress((i + 1) / len(self.pairs), f"evaluated window {i + 1}/{len(self.pairs)}")
        return {"kl": kl_sum / self.count, "ppl_fp": math.exp(self.nll / self.count),
                "ppl_quant": math.exp(nll_q / self.count), "tokens": self.count, "windows": len(self.pairs),
                "seq_len": self.seq_len, "objective": "span-corruption" if self.seq2seq else "next-token"}


def evaluate(fp_path: Path, q_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
             progress: Progress | None = None) -> dict:
    ref = Reference(fp_path, text, seq_len=seq_len, windows=windows)
    return ref.compare(ref.load_quantized(q_path), progress)
