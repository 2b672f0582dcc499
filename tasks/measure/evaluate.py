"""Stage 6: how far the quantized model is from full precision on held-out text.

Token-level KL(p_fp ‖ p_quant), averaged over every predicted token, plus the perplexity of
both models. The text is cut into `windows` non-overlapping windows of `seq_len` tokens, spread
evenly over the file so a short file is not read twice. Decoder-only models predict each next
token of a window; encoder-decoder models (Switch) predict the spans hidden from each window by
seeded span corruption, the objective they were trained on.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.texts import text_examples

Progress = Callable[[float, str], None]


def log_probs(model, inputs: dict) -> torch.Tensor:
    """Log-probabilities of the predictions aligned with the targets of `examples` (one example)."""
    logits = model(**inputs, use_cache=False).logits[0].float()
    return torch.log_softmax(logits if "labels" in inputs else logits[:-1], -1)


def all_log_probs(model, pairs: list[tuple[dict, torch.Tensor]], pad_id: int | None) -> list[torch.Tensor]:
    """`log_probs` of every example, from as few forwards as memory allows (see streaming.batches):
    a streamed model reads each layer's weights once per forward."""
    from ..model.streaming import batches

    out: list[torch.Tensor | None] = [None] * len(pairs)
    with torch.no_grad():
        for inputs, idx in batches(pairs, pad_id if pad_id is not None else 0, model.config.vocab_size):
            logits = model(**inputs).logits
            for b, i in enumerate(idx):
                n = len(pairs[i][1])
                out[i] = torch.log_softmax(logits[b, :n].float() if "labels" in inputs else logits[b, :-1].float(), -1)
    return out


class Reference:
    """The full-precision model's predictions on the evaluation text, computed once and compared
    against any number of quantized variants (the league table evaluates dozens).

    Both models run streamed (tasks/model/streaming.py): one decoder layer's weights in memory at a time.
    Use as a context manager, or call `close()`, to release the checkpoint's files."""

    def __init__(self, fp_path: Path, text: str, *, seq_len: int = 256, windows: int = 16):
        from ..model.streaming import is_seq2seq, streamed

        torch.manual_seed(0)
        self.seq_len = seq_len
        self.seq2seq = is_seq2seq(fp_path)
        self.tokenizer, self.pairs = text_examples(fp_path, text, seq_len, windows, self.seq2seq)
        self._files = ExitStack()
        try:
            self.model = self._files.enter_context(streamed(fp_path))
            self.log_probs = all_log_probs(self.model, self.pairs, self.tokenizer.pad_token_id)
        except BaseException:
            self._files.close()
            raise
        self.nll = -sum(float(lp.gather(1, t[:, None]).sum()) for lp, (_, t) in zip(self.log_probs, self.pairs))
        self.count = sum(len(t) for _, t in self.pairs)

    def task_accuracy(self, task) -> float:
        """The full-precision model's score on a task (see league.task), computed once per task object."""
        if getattr(self, "_task", (None,))[0] is not task:
            self._task = (task, task(self.model, self.tokenizer))
        return self._task[1]

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def quantized(path: Path):
        """The shipped artifact, streamed: a context manager giving the model whose experts run
        from the packed bytes of `path` (the same modules `from_pretrained` builds; tested equal)."""
        from ..model.streaming import streamed

        return streamed(path)

    def compare(self, q_model, progress: Progress | None = None) -> dict:
        if progress:
            progress(0.0, f"evaluating {len(self.pairs)} windows")
        kl_sum, nll_q = 0.0, 0.0
        for (_, target), logp, logq in zip(self.pairs, self.log_probs, all_log_probs(q_model, self.pairs,
                                                                                      self.tokenizer.pad_token_id)):
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            nll_q -= float(logq.gather(1, target[:, None]).sum())
        if progress:
            progress(1.0, f"evaluated {len(self.pairs)} windows")
        return {"kl": kl_sum / self.count, "ppl_fp": math.exp(self.nll / self.count),
                "ppl_quant": math.exp(nll_q / self.count), "tokens": self.count, "windows": len(self.pairs),
                "seq_len": self.seq_len, "objective": "span-corruption" if self.seq2seq else "next-token"}


def evaluate(fp_path: Path, q_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
             progress: Progress | None = None) -> dict:
    with Reference(fp_path, text, seq_len=seq_len, windows=windows) as ref, ref.quantized(q_path) as q_model:
        return ref.compare(q_model, progress)
