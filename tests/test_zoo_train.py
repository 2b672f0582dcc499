"""The zoo trainer's losses against hand-computed values, and its task stream weighting."""

import math

import pytest
import torch

from expertbits.zoo.train import TrainConfig, lr_at, per_layer_balance


def test_balance_is_per_layer_not_pooled():
    balanced = torch.tensor([[10.0, 0], [0, 10], [10, 0], [0, 10]])  # f = P ≈ [.5, .5] -> 2·(.25+.25) = 1
    starved = torch.tensor([[10.0, 0]] * 4)  # f = P ≈ [1, 0] -> 2·1 = 2
    balance, z = per_layer_balance((balanced, starved), top_k=1)
    assert balance.item() == pytest.approx(1.5, abs=1e-3)
    # pooling both layers would see f = P = [.75, .25] -> 2·(.5625+.0625) = 1.25 and hide the starved layer
    pooled, _ = per_layer_balance((torch.cat([balanced, starved]),), top_k=1)
    assert pooled.item() == pytest.approx(1.25, abs=1e-3)
    assert z.item() == pytest.approx((10 + math.log1p(math.exp(-10))) ** 2, rel=1e-6)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=0.1, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_supersense_stream_weights_only_the_label_tokens():
    from expertbits.zoo.build_zoo import stream, tokenizer

    tok = tokenizer()
    s = stream("wordnet-supersense", tok, share=3.0, label_weight=5.0)
    assert s.weights is not None and len(s.weights) == len(s.ids)
    first_eos = (s.ids == tok.eos_token_id).nonzero()[0].item()
    heavy = (s.weights[: first_eos + 1] == 5.0).nonzero().flatten().tolist()
    label = tok.decode(s.ids[heavy[0] : first_eos])
    assert heavy[-1] == first_eos and label.strip() in {"animal", "artifact", "body", "food", "location", "person", "plant", "substance"}


def test_span_corruption_hides_spans_behind_sentinels():
    from expertbits.tasks.seq2seq import span_corrupt

    ids = list(range(100, 140))
    inp, tgt = span_corrupt(ids, sentinels=[1, 2, 3, 4], eos=0, gen=torch.Generator().manual_seed(0))
    assert tgt[-1] == 0 and tgt[0] == 1
    # every original token is either kept in order in the input or hidden in the target, never both
    kept = [t for t in inp if t >= 100]
    hidden = [t for t in tgt if t >= 100]
    assert sorted(kept + hidden) == ids and kept == sorted(kept)
    assert len(hidden) == 3 * sum(1 for t in inp if t < 100)  # spans of 3, one sentinel each
    again = span_corrupt(ids, [1, 2, 3, 4], 0, torch.Generator().manual_seed(0))
    assert again == (inp, tgt)
