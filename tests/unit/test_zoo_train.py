"""The zoo trainer's losses against hand-computed values, and its task stream weighting."""

import math

import pytest
import torch

from expertbits.zoo.train import TrainConfig, lr_at, per_layer_balance, update_biases


def test_balance_is_per_layer_not_pooled():
    balanced = torch.tensor([[10.0, 0], [0, 10], [10, 0], [0, 10]])  # f = P ≈ [.5, .5] -> 2·(.25+.25) = 1
    starved = torch.tensor([[10.0, 0]] * 4)  # f = P ≈ [1, 0] -> 2·1 = 2
    balance, z = per_layer_balance((balanced, starved), top_k=1)
    assert balance.item() == pytest.approx(1.5, abs=1e-3)
    # pooling both layers would see f = P = [.75, .25] -> 2·(.5625+.0625) = 1.25 and hide the starved layer
    pooled, _ = per_layer_balance((torch.cat([balanced, starved]),), top_k=1)
    assert pooled.item() == pytest.approx(1.25, abs=1e-3)
    assert z.item() == pytest.approx((10 + math.log1p(math.exp(-10))) ** 2, rel=1e-6)


def test_balance_per_stream_sees_a_starved_domain():
    # tokens 0-3 (one stream) all pick expert 0, tokens 4-7 (another) all pick expert 1
    logits = torch.tensor([[10.0, 0]] * 4 + [[0, 10.0]] * 4)
    pooled, _ = per_layer_balance((logits,), top_k=1)
    assert pooled.item() == pytest.approx(1.0, abs=1e-3)  # f = P = [.5, .5]: looks balanced
    split, _ = per_layer_balance(([logits[:4], logits[4:]],), top_k=1)
    assert split.item() == pytest.approx(2.0, abs=1e-3)  # each stream alone is fully starved


def test_bias_update_moves_towards_the_mean_load():
    bias = torch.zeros(4)
    logits = torch.tensor([[5.0, 0, 0, 0]] * 3 + [[0, 5.0, 0, 0]])  # loads 3, 1, 0, 0; mean 1
    update_biases([bias], [logits], top_k=1, step=0.1)
    assert bias.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    with pytest.raises(ValueError):  # one bias per router, never silently zipped short
        update_biases([bias], [logits, logits], top_k=1, step=0.1)


def test_switch_router_biases_are_stepped_not_optimised(monkeypatch):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    from expertbits.zoo import train
    from expertbits.zoo.train import router_biases, train_seq2seq

    groups, real = [], train.per_layer_balance
    monkeypatch.setattr(train, "per_layer_balance", lambda logits, k: groups.append(
        [[g.shape[0] for g in layer] for layer in logits]) or real(logits, k))
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=4, num_decoder_layers=4,
                                   num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_heads=2, num_experts=4,
                                   router_bias=True, pad_token_id=1, eos_token_id=0, decoder_start_token_id=1)
    model = SwitchTransformersForConditionalGeneration(cfg)
    biases = router_biases(model)
    assert len(biases) == 4  # two encoder and two decoder routers
    with torch.no_grad():  # router r sends every token to expert r, so only bias r may go down
        for r, b in enumerate(biases):
            b.zero_()[r] = 100.0

    def make_batch(gen):  # padded rows: pads must not count as load
        ids = torch.randint(2, 64, (4, 16), generator=gen)
        mask = torch.ones_like(ids)
        ids[:2, 10:], mask[:2, 10:] = 1, 0
        labels = torch.randint(2, 64, (4, 8), generator=gen)
        labels[1:, 5:] = -100
        return ids, mask, labels

    step = 0.25
    record = train_seq2seq(model, make_batch, TrainConfig(steps=1, lr=1e-2, bias_step=step, weight_decay=0.5,
                                                          balance_per_sequence=True), log=None)
    for r, b in enumerate(biases):
        assert not b.requires_grad
        assert b.tolist() == pytest.approx([100.0 - step if e == r else step for e in range(4)]), r
    assert record["tokens"] == 4 * 16 - 2 * 6 + 8 + 3 * 5  # pads and ignored labels are not tokens
    # one group per sequence, without its padding: encoder inputs, then decoder targets
    assert groups == [[[10, 10, 16, 16]] * 2 + [[8, 5, 5, 5]] * 2]
    assert record["final_balance"] == pytest.approx(4.0, rel=1e-3)  # every sequence on one expert: E · 1


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
    from expertbits.tasks.checkpoints.span_corruption import span_corrupt

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


def test_causal_training_balances_each_stream_on_its_own(monkeypatch):
    """train_causal hands per_layer_balance one token group per stream, cut at the stream's rows."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertbits.zoo import train
    from expertbits.zoo.train import Stream, train_causal

    seen = []
    real = train.per_layer_balance

    def spy(router_logits, top_k):
        seen.append([[g.shape[0] for g in layer] if isinstance(layer, list) else layer.shape[0] for layer in router_logits])
        return real(router_logits, top_k)

    monkeypatch.setattr(train, "per_layer_balance", spy)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    streams = [Stream(torch.randint(0, 50, (400,)), share=3.0), Stream(torch.randint(0, 50, (400,)), share=1.0)]
    cfg = TrainConfig(steps=1, lr=1e-3, batch=4, seq_len=8, balance_per_stream=True)
    record = train_causal(model, streams, cfg, log=None)
    assert seen == [[[3 * 8, 1 * 8], [3 * 8, 1 * 8]]]  # 3 rows of the first stream, 1 of the second, per layer
    assert record["tokens"] == 4 * 8
    seen.clear()
    train_causal(model, streams, TrainConfig(steps=1, lr=1e-3, batch=4, seq_len=8), log=None)
    assert seen == [[4 * 8, 4 * 8]]  # pooled: one group of all tokens per layer


def test_training_options_the_model_cannot_honour_are_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    from expertbits.zoo.train import Stream, train_causal, train_seq2seq

    model = MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2))
    streams = [Stream(torch.randint(0, 50, (200,)))]
    with pytest.raises(ValueError, match="routers with a bias"):  # Mixtral's router has no bias to step
        train_causal(model, streams, TrainConfig(steps=1, lr=1e-3, batch=2, seq_len=8, bias_step=0.01), log=None)
    with pytest.raises(ValueError, match="balance_per_sequence is for seq2seq"):
        train_causal(model, streams, TrainConfig(steps=1, lr=1e-3, batch=2, seq_len=8, balance_per_sequence=True), log=None)
    with pytest.raises(ValueError, match="balance_per_stream is for causal"):
        train_seq2seq(model, None, TrainConfig(steps=1, lr=1e-3, balance_per_stream=True), log=None)
