"""The layer-by-layer runner: the same numbers as transformers' own model, with one layer in memory."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.archs import ARCHS, FUSED_ON_DISK, build

from expertbits.kernels.modules import LazyExperts, LazyLinear
from expertbits.tasks.checkpoints.texts import examples
from expertbits.tasks.errors import CheckpointError
from expertbits.tasks.measure.evaluate import all_log_probs, log_probs
from expertbits.tasks.model.streaming import batches, streamed
from expertbits.tasks.quantization.writer import quantize_checkpoint

CASES = [(a, False) for a in ARCHS] + [(a, True) for a in FUSED_ON_DISK]


def _inputs(arch: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(2, 4096, (3, 24), generator=gen)}
    if arch == "switch_transformers":
        inputs["labels"] = torch.randint(2, 4096, (3, 9), generator=gen)
    return inputs


def _auto(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if arch == "switch_transformers" else AutoModelForCausalLM


@pytest.mark.parametrize("arch,fused", CASES)
def test_streamed_model_equals_the_model_transformers_loads(arch, fused, tmp_path):
    path = build(arch, tmp_path / "m", fused=fused)
    inputs = _inputs(arch)
    with torch.no_grad():
        want = _auto(arch).from_pretrained(path, dtype=torch.float32).eval()(**inputs).logits
        with streamed(path, keep_bytes=0) as model:
            assert any(isinstance(m, (LazyExperts, LazyLinear)) for m in model.modules())
            assert all(p.is_meta for p in model.parameters())  # nothing is held between forwards
            got = model(**inputs).logits
            assert all(p.is_meta for p in model.parameters())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "switch_transformers"])
def test_streamed_packed_model_equals_from_pretrained(arch, tmp_path):
    import expertbits.tasks.model.load as loader

    path = build(arch, tmp_path / "m", fused=arch != "switch_transformers")
    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint

    with Checkpoint.open(path) as ckpt:
        keys = sorted({(m.layer, m.expert) for m in detect(ckpt).matrices})
    alloc = pd.DataFrame([{"layer": layer, "expert": e, "bits": (2, 3, 4, 8)[i % 4]} for i, (layer, e) in enumerate(keys)])
    quantize_checkpoint(path, alloc, 16, tmp_path / "q")
    inputs = _inputs(arch)
    with torch.no_grad():
        want = loader.load(tmp_path / "q", dtype=torch.float32)[0](**inputs).logits
        with streamed(tmp_path / "q") as model:
            got = model(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_only_the_running_layer_is_in_memory(tmp_path):
    """While decoder layer i runs, the model holds exactly layer i's non-expert weights."""
    path = build("qwen2_moe", tmp_path / "m", fused=True)
    seen = []
    with streamed(path, keep_bytes=0) as model:
        layers = model.model.layers

        def probe(module, args, kwargs):
            loaded = {n for n, p in model.named_parameters() if not p.is_meta}
            seen.append((module, loaded))

        for layer in layers:
            layer.register_forward_pre_hook(probe, with_kwargs=True)  # runs after the onloading hook
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    assert len(seen) == len(layers)
    for i, (module, loaded) in enumerate(seen):
        assert module is layers[i]
        assert loaded and all(n.startswith(f"model.layers.{i}.") for n in loaded)
        assert loaded == {n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")}


def test_experts_are_read_one_at_a_time(tmp_path):
    """Each routed expert is read once per forward, and its weights are gone before the next is read."""
    import gc
    import weakref

    path = build("mixtral", tmp_path / "m", fused=True)
    with streamed(path, keep_bytes=0) as model:
        experts = model.model.layers[0].mlp.experts
        held, alive_at_read = [], []
        read = experts._read

        def watched(e):
            gc.collect()
            alive_at_read.append(sum(r() is not None for _, r in held))
            weights = read(e)
            held.extend((e, weakref.ref(w)) for w in weights)
            return weights

        experts._read = watched
        with torch.no_grad():
            out = model(input_ids=torch.randint(2, 4096, (2, 16)), use_cache=False)
    assert out.past_key_values is None  # nothing of earlier layers is kept
    order = [e for e, _ in held[::3]]
    assert len(order) > 1 and sorted(order) == sorted(set(order))
    assert alive_at_read == [0] * len(order)


def test_a_small_model_keeps_its_layers_a_large_one_drops_them(tmp_path):
    path = build("qwen3_moe", tmp_path / "m", fused=True)
    ids = torch.randint(2, 4096, (1, 8))
    with streamed(path) as small, torch.no_grad():
        small(input_ids=ids, use_cache=False)
        assert not any(p.is_meta for p in small.parameters())
    with streamed(path, keep_bytes=0) as large, torch.no_grad():
        large(input_ids=ids, use_cache=False)
        assert all(p.is_meta for p in large.parameters())


def test_batched_log_probs_equal_one_example_at_a_time(tmp_path):
    """Encoder-decoder examples of different lengths are padded into one forward."""
    from transformers import AutoTokenizer

    path = build("switch_transformers", tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(path)
    gen = torch.Generator().manual_seed(0)
    pairs = [p for n in (24, 40, 57) for p in examples(torch.randint(5, 4000, (1, n), generator=gen), tok, seq2seq=True)]
    assert len({len(t) for _, t in pairs}) == 3 and len({p["input_ids"].shape[1] for p, _ in pairs}) == 3  # the lengths differ, so padding is exercised
    assert len(list(batches(pairs, tok.pad_token_id, 4096))) == 1
    with streamed(path) as model, torch.no_grad():
        one = [log_probs(model, inputs) for inputs, _ in pairs]
        together = all_log_probs(model, pairs, tok.pad_token_id)
    for a, b in zip(one, together):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_batches_split_to_bound_the_logits():
    pairs = [({"input_ids": torch.zeros(1, 100, dtype=torch.long)}, torch.zeros(99)) for _ in range(10)]
    chunks = list(batches(pairs, 0, vocab=1000, logits_bytes=4 * 1000 * 100 * 3))
    assert [idx for _, idx in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert chunks[0][0]["input_ids"].shape == (3, 100)


def test_a_stored_tensor_no_module_uses_is_an_error(tmp_path):
    path = build("olmoe", tmp_path / "m", fused=True)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.mystery.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"belong to no module.*mystery"):
        with streamed(path):
            pass


def test_a_weight_with_no_stored_tensor_is_an_error(tmp_path):
    path = build("olmoe", tmp_path / "m", fused=True)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"].pop("model.layers.1.self_attn.q_proj.weight", None)
        index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"no stored tensor.*layers\.1\.self_attn\.q_proj"):
        with streamed(path):
            pass


def test_switch_calibration_counts_no_padding(tmp_path, monkeypatch):
    """Routing statistics from padded encoder-decoder batches equal those of one example per forward."""
    import expertbits.tasks.checkpoints.texts as texts
    import expertbits.tasks.model.streaming as stream
    from expertbits.tasks.allocation.calibrate import route
    from expertbits.zoo import text_path

    path = build("switch_transformers", tmp_path / "m")
    text = text_path("code-heldout").read_text()[:20_000]
    examples_ = texts.examples

    def ragged(ids, tokenizer, seq2seq):  # windows of one length give examples of one length: vary them
        out = examples_(ids, tokenizer, seq2seq)
        return [({"input_ids": x["input_ids"][:, : x["input_ids"].shape[1] - 5 * i],
                  "labels": x["labels"][:, : x["labels"].shape[1] - i]}, t[: len(t) - i]) for i, (x, t) in enumerate(out)]

    monkeypatch.setattr(texts, "examples", ragged)
    together = route(path, text, seq_len=48, windows=5)
    batches = stream.batches
    monkeypatch.setattr(stream, "batches", lambda pairs, pad, vocab: batches(pairs, pad, vocab, logits_bytes=1))
    alone = route(path, text, seq_len=48, windows=5)
    pd.testing.assert_frame_equal(together[0], alone[0], check_exact=False, rtol=1e-6)
    assert together[2]["calibration_tokens"] == alone[2]["calibration_tokens"]
    for layer, per in alone[1].items():
        for e, m in per.items():
            if m is None:
                assert together[1][layer][e] is None
            else:
                for a, b in zip(together[1][layer][e], m):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_layer_beyond_the_config_is_kept_as_stored(tmp_path):
    """DeepSeek-V3 ships a multi-token-prediction layer after the last one (model.layers.61, which
    transformers never builds): it is neither quantized nor an error, and is kept as stored."""
    import expertbits.tasks.model.load as loader
    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint

    path = build("deepseek_v3", tmp_path / "m", fused=True)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    extra = {k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in tensors.items()
             if k.startswith("model.layers.1.")}
    save_file(dict(tensors, **extra), shard, metadata={"format": "pt"})
    with Checkpoint.open(path) as ckpt:
        model = detect(ckpt)
        assert [layer.layer for layer in model.layers] == [1] and model.kept_as_stored == ("model.layers.2",)
        alloc = pd.DataFrame([{"layer": 1, "expert": e, "bits": 4} for e in range(model.layers[0].num_experts)])
    summary = quantize_checkpoint(path, alloc, 16, tmp_path / "q")
    with Checkpoint.open(tmp_path / "q") as q:
        for k, v in extra.items():
            assert torch.equal(q.read(k), v)
    # the whole model's size counts the model transformers builds; the extra layer is reported apart
    extra_bytes = sum(v.numel() * v.element_size() for v in extra.values())
    assert summary["kept_as_stored_bytes"] == extra_bytes
    assert summary["model_parameters"] == sum(v.numel() for k, v in tensors.items())
    shipped = sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors"))
    assert summary["fraction_of_bf16"] == round((shipped - extra_bytes) / (2 * summary["model_parameters"]), 6)
    inputs = _inputs("deepseek_v3")
    with torch.no_grad():
        want = loader.load(tmp_path / "q", dtype=torch.float32)[0](**inputs).logits
        with streamed(tmp_path / "q") as m:
            torch.testing.assert_close(m(**inputs).logits, want, rtol=0, atol=1e-5)
        with streamed(path) as m:
            m(**inputs)
