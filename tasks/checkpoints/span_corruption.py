"""Span corruption (T5 style): how encoder-decoder MoE models are trained and evaluated on raw text.

A window of tokens loses ~15% of its tokens in spans of 3; each span is replaced in the input by
a sentinel, and the target lists each sentinel followed by the tokens it hid:

    tokens  a b c d e f g h i j          input   a b <s0> f g h <s1> j
    spans   [c d e]       [i]            target  <s0> c d e <s1> i <eos>
"""

from __future__ import annotations

import torch


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, gen: torch.Generator,
                 noise: float = 0.15, span: int = 3) -> tuple[list[int], list[int]]:
    """(encoder input, decoder target) for one window; deterministic for a given generator state."""
    n = len(ids)
    n_spans = max(1, min(len(sentinels), round(n * noise / span)))
    starts = sorted(torch.randperm(max(1, n - span), generator=gen)[: n_spans * 2].tolist())
    chosen, end = [], -1
    for s in starts:  # keep spans apart so each sentinel hides a contiguous run
        if s > end and len(chosen) < n_spans:
            chosen.append(s)
            end = s + span
    inp, tgt, pos = [], [], 0
    for i, s in enumerate(chosen):
        inp += ids[pos:s] + [sentinels[i]]
        tgt += [sentinels[i]] + ids[s : s + span]
        pos = s + span
    return inp + ids[pos:], tgt + [eos]


def sentinel_ids(tokenizer, count: int = 32) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(count)])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("the tokenizer has no <extra_id_N> sentinel tokens; encoder-decoder evaluation needs them")
    return ids


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])
