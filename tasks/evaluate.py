"""Stage 6: how far the quantized model is from full precision on held-out text.

Token-level KL(p_fp ‖ p_quant), averaged over every predicted token, plus the perplexity of
both models. The text is cut into `windows` non-overlapping windows of `seq_len` tokens, spread
evenly over the file so a short file is not read twice.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError
from .quantized import dequantize_checkpoint

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


def _load(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the flow reports its own progress

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        raise CheckpointError(f"{path}: transformers cannot load it as a causal LM ({e})",
                              "evaluation supports decoder-only models for now") from e
    return model.eval()


def evaluate(fp_path: Path, q_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
             progress: Progress | None = None) -> dict:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(fp_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{fp_path}: no usable tokenizer ({e})", "save the tokenizer with the checkpoint") from e
    ids = token_windows(text, tokenizer, seq_len, windows)
    fp_model = _load(fp_path)
    with tempfile.TemporaryDirectory(prefix="expertbits-deq-") as tmp:
        q_model = _load(dequantize_checkpoint(q_path, fp_path, Path(tmp)))
    kl_sum, nll_fp, nll_q, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for i, window in enumerate(ids):
            x = window[None]
            logp = torch.log_softmax(fp_model(x).logits[0, :-1].float(), -1)
            logq = torch.log_softmax(q_model(x).logits[0, :-1].float(), -1)
            target = window[1:]
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            nll_fp -= float(logp.gather(1, target[:, None]).sum())
            nll_q -= float(logq.gather(1, target[:, None]).sum())
            count += len(target)
            if progress:
                progress((i + 1) / len(ids), f"evaluated window {i + 1}/{len(ids)}")
    return {"kl": kl_sum / count, "ppl_fp": math.exp(nll_fp / count), "ppl_quant": math.exp(nll_q / count),
            "tokens": count, "windows": len(ids), "seq_len": seq_len}
