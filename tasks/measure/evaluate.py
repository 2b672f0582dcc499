"""Stage 6: how far the quantized model is from full precision on held-out text.

Token-level KL(p_fp ‖ p_quant), averaged over every predicted token, plus the perplexity of
both models. The text is cut into `windows` non-overlapping windows of `seq_len` tokens, spread
evenly over the file so a short file is not read twice. Decoder-only models predict each next
token of a window; encoder-decoder models (Switch) predict the spans hidden from each window by
seeded span corruption, the objective they were trained on.

Where they run (tasks/placement.py): on the CPU both models are streamed, one decoder layer at a
time, exactly as always. On a GPU the full-precision model is streamed onto it in its own dtype,
and the quantized one runs as it is served: the shipped folder loaded by `expertbits.load` onto
the GPU, its experts through the fused MoE kernel. Log-probabilities come back to the host in
float32, where KL and perplexity are summed.
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.texts import text_examples
from ..placement import CPU, Placement

Progress = Callable[[float, str], None]


def log_probs(model, inputs: dict) -> torch.Tensor:
    """Log-probabilities of the predictions aligned with the targets of `examples` (one example)."""
    logits = model(**inputs, use_cache=False).logits[0].float()
    return torch.log_softmax(logits if "labels" in inputs else logits[:-1], -1)


def all_log_probs(model, pairs: list[tuple[dict, torch.Tensor]], pad_id: int | None,
                  device: str = "cpu") -> list[torch.Tensor]:
    """`log_probs` of every example, from as few forwards as memory allows (see streaming.batches):
    a streamed model reads each layer's weights once per forward. The model runs on `device`;
    the log-probabilities are float32 on the host."""
    from ..model.streaming import batches, to_device

    out: list[torch.Tensor | None] = [None] * len(pairs)
    with torch.no_grad():
        for inputs, idx in batches(pairs, pad_id if pad_id is not None else 0, model.config.vocab_size):
            logits = model(**to_device(inputs, device)).logits
            for b, i in enumerate(idx):
                n = len(pairs[i][1])
                lp = torch.log_softmax(logits[b, :n].float() if "labels" in inputs else logits[b, :-1].float(), -1)
                out[i] = lp.cpu()
    return out


class Reference:
    """The full-precision model's predictions on the evaluation text, computed once and compared
    against any number of quantized variants (the league table evaluates dozens).

    Both models run streamed (tasks/model/streaming.py): one decoder layer's weights in memory at a time.
    Use as a context manager, or call `close()`, to release the checkpoint's files."""

    def __init__(self, fp_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
                 placement: Placement = CPU):
        from ..model.streaming import is_seq2seq, streamed

        torch.manual_seed(0)
        self.seq_len, self.placement = seq_len, placement
        self.seq2seq = is_seq2seq(fp_path)
        self.tokenizer, self.pairs = text_examples(fp_path, text, seq_len, windows, self.seq2seq)
        self._files = ExitStack()
        try:
            self.model = self._files.enter_context(streamed(fp_path, dtype=placement.torch_dtype, device=placement.device))
            self.log_probs = all_log_probs(self.model, self.pairs, self.tokenizer.pad_token_id, placement.device)
        except BaseException:
            self._files.close()
            raise
        self.nll = -sum(float(lp.gather(1, t[:, None]).sum()) for lp, (_, t) in zip(self.log_probs, self.pairs))
        self.count = sum(len(t) for _, t in self.pairs)

    def task_accuracy(self, task) -> float:
        """The full-precision model's score on a task (see league.task), computed once per task object."""
        if getattr(self, "_task", (None,))[0] is not task:
            self._task = (task, task(self.model, self.tokenizer, device=self.placement.device))
        return self._task[1]

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "Reference":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def quantized(self, path: Path):
        """The shipped artifact as a context manager giving its model: on the CPU streamed, its
        experts running from the packed bytes of `path` (the same modules `from_pretrained` builds;
        tested equal); on a GPU as it is served (`served`)."""
        from ..model.streaming import streamed

        return served(path, self.placement) if self.placement.is_cuda else streamed(path)

    def compare(self, q_model, progress: Progress | None = None) -> dict:
        if progress:
            progress(0.0, f"evaluating {len(self.pairs)} windows")
        kl_sum, nll_q = 0.0, 0.0
        for (_, target), logp, logq in zip(self.pairs, self.log_probs, all_log_probs(
                q_model, self.pairs, self.tokenizer.pad_token_id, self.placement.device)):
            kl_sum += float((logp.exp() * (logp - logq)).sum())
            nll_q -= float(logq.gather(1, target[:, None]).sum())
        if progress:
            progress(1.0, f"evaluated {len(self.pairs)} windows")
        return {"kl": kl_sum / self.count, "ppl_fp": math.exp(self.nll / self.count),
                "ppl_quant": math.exp(nll_q / self.count), "tokens": self.count, "windows": len(self.pairs),
                "seq_len": self.seq_len, "objective": "span-corruption" if self.seq2seq else "next-token"}


@contextmanager
def served(path: Path, placement: Placement):
    """The quantized folder as `expertbits.load` serves it, on the placement's GPU (the fused
    MoE kernel runs its experts), refused first if it would not fit; released on exit."""
    from ..model.load import load
    from ..placement import MARGIN_BYTES, require_free

    need = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))  # packed, and the rest as stored
    torch.cuda.empty_cache()  # the reference's cached activations are free for it
    require_free(placement, need + MARGIN_BYTES, f"the quantized model of {path}")
    model, _ = load(path, dtype=placement.torch_dtype, device=placement.device)
    try:
        yield model
    finally:
        del model
        torch.cuda.empty_cache()


@contextmanager
def evaluated(fp_path: Path, q_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
              progress: Progress | None = None, placement: Placement = CPU):
    """(metrics, the quantized model as evaluated), the model kept until the block exits: the
    evaluation stage times the same served model on a GPU instead of loading it again."""
    with (Reference(fp_path, text, seq_len=seq_len, windows=windows, placement=placement) as ref,
          ref.quantized(q_path) as q_model):
        yield ref.compare(q_model, progress), q_model


def evaluate(fp_path: Path, q_path: Path, text: str, *, seq_len: int = 256, windows: int = 16,
             progress: Progress | None = None, placement: Placement = CPU) -> dict:
    with evaluated(fp_path, q_path, text, seq_len=seq_len, windows=windows, progress=progress,
                   placement=placement) as (metrics, _):
        return metrics
