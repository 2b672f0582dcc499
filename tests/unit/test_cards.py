"""Model-card measurements on small random models of both kinds (decoder-only and Switch)."""

import pytest
import torch

from expertbits.zoo import cards, corpora


@pytest.fixture(scope="module")
def tok():
    from expertbits.zoo.build_zoo import tokenizer

    return tokenizer()


def _mixtral(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, pad_token_id=tok.pad_token_id)).eval()


def _switch(tok):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    torch.manual_seed(0)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1, num_heads=2, num_experts=4, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)).eval()


@pytest.mark.parametrize("build,layers", [(_mixtral, 2), (_switch, 2)], ids=["mixtral", "switch"])
def test_usage_shares_and_accuracy(build, layers, tok, monkeypatch):
    monkeypatch.setattr(cards, "WINDOWS", 2)
    monkeypatch.setattr(cards, "SEQ_LEN", 64)
    model = build(tok)
    ppl, usage = cards.perplexity_and_usage(model, tok, corpora.read("austen", "heldout"))
    assert usage.shape == (layers, 4)
    assert torch.allclose(usage.sum(1), torch.full((layers,), 4.0))  # shares of a fair share sum to E
    assert 100 < ppl < 10 * len(tok)  # an untrained model is near-uniform over the vocabulary
    acc = cards.supersense_accuracy(model, tok, limit=16)
    assert acc * 16 == round(acc * 16)  # a share of the 16 glosses


def test_supersense_accuracy_tells_a_trained_model_from_chance(tok):
    """The WordNet fine-tune scores 59% on the 200-gloss test (its card); chance is 12.5%. A
    broken scorer (labels misaligned, wrong positions, wrong sign) lands near or below chance."""
    from transformers import AutoModelForCausalLM

    from expertbits.zoo import resolve

    trained = AutoModelForCausalLM.from_pretrained(resolve("zoo://mixtral-tiny/wordnet"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve("zoo://mixtral-tiny/base"), dtype=torch.float32).eval()
    acc, chance = cards.supersense_accuracy(trained, tok, limit=48), cards.supersense_accuracy(base, tok, limit=48)
    assert acc >= 0.4 and acc >= chance + 0.2, (acc, chance)


def test_trained_domains_follow_the_parent_chain():
    assert cards.trained_domains("mixtral-tiny", "base") == ["austen", "web"]
    assert cards.trained_domains("mixtral-tiny", "code") == ["austen", "web", "python"]
    assert cards.trained_domains("switch-tiny", "wordnet") == ["austen", "web", "wordnet-supersense"]
    usage = {"austen": [[0.5, 1.5]], "python": [[0.1, 1.9]]}
    assert cards.min_usage(usage, ["austen"]) == 0.5 and cards.min_usage(usage, ["austen", "python"]) == 0.1


def test_experts_off_removes_the_routed_experts_only(tok, tmp_path, monkeypatch):
    """KL > 0 when the routed experts go; 0 on a copy whose routed experts are already off,
    which also shows the shared expert (Qwen2-MoE) is left alone."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    monkeypatch.setattr(cards, "WINDOWS", 2)
    monkeypatch.setattr(cards, "SEQ_LEN", 32)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                               num_experts=4, num_experts_per_tok=2))
    text = corpora.read("austen", "heldout")[:20_000]
    with torch.no_grad():  # random init leaves the experts' output too small to matter
        for name, param in model.named_parameters():
            if ".experts." in name or "shared_expert." in name:
                param.mul_(20)
    model.save_pretrained(tmp_path / "on")
    tok.save_pretrained(tmp_path / "on")
    assert cards.experts_off_kl(tmp_path / "on", text) > 1e-3
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.experts.down_proj"):
                param.zero_()
    model.save_pretrained(tmp_path / "off")
    tok.save_pretrained(tmp_path / "off")
    assert cards.experts_off_kl(tmp_path / "off", text) == pytest.approx(0.0, abs=1e-9)
