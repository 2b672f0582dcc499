"""The whole-model budget: dense linear layers packed by GPTQ beside the routed experts, loaded,
run layer by layer, validated and generated from, against the fp model with the dequantized
weights put back (an independent reference: plain transformers, no packed module)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import expertbits
from expertbits.kernels.modules import PackedLinear
from expertbits.tasks.errors import CheckpointError, ExpertbitsError
from expertbits.tasks.measure import kernel_check
from expertbits.tasks.model.export import consumers
from expertbits.tasks.model.packed_folder import iter_quantized, quantization_config
from expertbits.tasks.model.streaming import streamed
from expertbits.tasks.quantization.dense import DenseWidths
from expertbits.zoo import read_text, resolve, text_path

CAL = read_text("zoo://text/wordnet-supersense-train")[:30_000]
MICRO_CAL = text_path("code-train").read_text()[:20_000]


def uniform(ckpt: Path, bits: int) -> pd.DataFrame:
    from expertbits.tasks.checkpoints.adapters import detect
    from expertbits.tasks.checkpoints.reader import Checkpoint

    with Checkpoint.open(ckpt) as c:
        layers = detect(c).layers
    return pd.DataFrame([{"layer": layer.layer, "expert": e, "bits": bits} for layer in layers
                         for e in range(layer.num_experts)])


def reference_model(ft: Path, out: Path) -> torch.nn.Module:
    """The fp model with every packed weight of `out` put back dequantized, by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    qc = quantization_config(out)
    for name, _, q in iter_quantized(out, dense=True):
        model.get_submodule(name).weight.data = q.dequantize()
    for name, info, q in iter_quantized(out):
        experts = model.get_submodule(qc["experts_modules"][str(info["layer"])])
        w, e = q.dequantize(), info["expert"]
        f = experts.down_proj.shape[-1]
        if info["role"] == "down":
            experts.down_proj.data[e] = w
        else:
            rows = slice(0, f) if info["role"] == "gate" else slice(f, 2 * f)
            experts.gate_up_proj.data[e, rows] = w
    return model


@pytest.fixture(scope="module")
def qwen_whole(tmp_path_factory):
    """qwen-moe-tiny (attention with q/k/v biases, shared experts) with every dense layer at 4 bits."""
    ft = resolve("zoo://qwen-moe-tiny/wordnet")
    out = tmp_path_factory.mktemp("dense") / "q"
    summary = expertbits.quantize(ft, uniform(ft, 3), out, text=CAL, group_size=64, windows=8, seq_len=128,
                                  dense_bits=4)
    return ft, out, summary


def test_a_whole_model_run_loads_and_generates_as_its_dequantized_weights_do(qwen_whole):
    ft, out, summary = qwen_whole
    qc = quantization_config(out)
    dense = qc["dense_modules"]
    # q, k, v, o and the shared expert's gate, up and down of each of the 4 layers; the gates (routers,
    # the shared expert's gate) stay as stored
    assert summary["dense_matrices"] == len(dense) == 28 and summary["dense_bits"] == [4]
    assert not any(name.endswith("gate") for name in dense) and qc["version"] == 3
    assert all(info["bits"] == 4 and info["rotation"] == "hadamard" for info in dense.values())

    model, tok = expertbits.load(out, dtype=torch.float32)
    q_proj = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj, PackedLinear) and q_proj.bias is not None  # Qwen's q/k/v biases, loaded as stored
    stored_bias = load_file(next(ft.glob("*.safetensors")))["model.layers.0.self_attn.q_proj.bias"]
    assert torch.equal(q_proj.bias.data, stored_bias.float())

    ids = tok(read_text("zoo://text/wordnet-supersense-test")[:400], return_tensors="pt").input_ids[:, :64]
    ref = reference_model(ft, out)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
        with streamed(out) as runner:  # the layer-by-layer runner reads the same folder alike
            streamed_logits = runner(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(streamed_logits, got, atol=1e-4, rtol=1e-4)
    prompt = ids[:, :8]
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False),
                       ref.generate(prompt, max_new_tokens=12, do_sample=False))


def test_dense_layers_shrink_the_model_are_validated_and_are_not_exported(qwen_whole):
    ft, out, summary = qwen_whole
    alone = out.parent / "experts-only"
    experts_only = expertbits.quantize(ft, uniform(ft, 3), alone, text=CAL, group_size=64, windows=8, seq_len=128)
    assert summary["bytes"] < experts_only["bytes"] and summary["fraction_of_bf16"] < experts_only["fraction_of_bf16"]
    assert "dense_modules" not in quantization_config(alone) and quantization_config(alone)["version"] == 3  # rotated

    report, result = kernel_check.validate(out, ft)
    checked = set(report.name)
    assert set(quantization_config(out)["dense_modules"]) <= checked and result["failed"] == 0
    with pytest.raises(CheckpointError, match="--dense-bits"):
        consumers(quantization_config(out))


def test_a_folder_whose_dense_layer_was_edited_is_refused(qwen_whole, tmp_path):
    _, out, _ = qwen_whole
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    config = json.loads((edited / "config.json").read_text())
    config["quantization_config"]["dense_modules"]["model.layers.0.self_attn.q_proj"]["shape"] = [64, 128]
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="q_proj"):
        with streamed(edited):
            pass


def test_a_dense_layer_is_gptq_of_its_own_inputs_as_a_plain_model_computes_them(micro_pair, tmp_path):
    """Layer 0's q_proj sees the embeddings through the first norm, which nothing quantized
    changes: its packed codes equal GPTQ run by hand on the inputs a plain transformers model gives
    it (its own hook), and o_proj, after the quantized q/k/v, differs from GPTQ on the fp inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.tasks.checkpoints.texts import token_windows
    from expertbits.tasks.quantization.method import QuantizerConfig

    _, ft = micro_pair
    out = tmp_path / "q"
    expertbits.quantize(ft, uniform(ft, 4), out, text=MICRO_CAL, group_size=32, windows=4, seq_len=64, dense_bits=3)
    packed = {name: q for name, _, q in iter_quantized(out, dense=True)}
    model = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)
    seen = {}
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "o_proj"):
        getattr(attn, name).register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: args[0]}))
    with torch.no_grad():
        model(input_ids=token_windows(MICRO_CAL, AutoTokenizer.from_pretrained(ft), 64, 4))
    cfg = QuantizerConfig("gptq", rotate=True)
    for name, same in (("q_proj", True), ("o_proj", False)):
        x = seen[name].reshape(-1, seen[name].shape[-1])
        want = cfg.gptq_matrix(getattr(attn, name).weight.detach(), x.T @ x, 3, 32)
        got = packed[f"model.layers.0.self_attn.{name}"]
        assert torch.equal(got.packed, want.packed) == same and torch.equal(got.signs, want.signs)


def untied(ft: Path, out: Path) -> Path:
    """A copy of `ft` whose head is its own tensor (a copy of the embeddings), not tied to them."""
    shutil.copytree(ft, out)
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    return out


def test_the_head_is_quantized_only_when_named_and_never_when_tied(micro_pair, tmp_path):
    _, ft = micro_pair
    alloc = uniform(ft, 4)
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        expertbits.quantize(ft, alloc, tmp_path / "tied", text=MICRO_CAL, group_size=32, windows=4, seq_len=64,
                            dense_override=("lm_head=8",))
    assert not (tmp_path / "tied").exists()  # nothing half-written

    own = untied(ft, tmp_path / "untied")
    out = tmp_path / "head"
    summary = expertbits.quantize(own, alloc, out, text=MICRO_CAL, group_size=32, windows=4, seq_len=64,
                                  dense_override=("lm_head=8", "*.o_proj=keep"), dense_bits=3)
    dense = quantization_config(out)["dense_modules"]
    assert dense["lm_head"]["bits"] == 8 and not any(n.endswith("o_proj") for n in dense)
    assert {dense[n]["bits"] for n in dense if n != "lm_head"} == {3} and summary["dense_matrices"] == len(dense) == 7
    model, tok = expertbits.load(out, dtype=torch.float32)
    assert isinstance(model.lm_head, PackedLinear)
    ids = tok(MICRO_CAL[:300], return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference_model(own, out)(ids).logits, atol=1e-4, rtol=1e-4)


def test_widths_parse_and_bad_options_are_refused_before_any_work(micro_pair, tmp_path):
    w = DenseWidths.parse(4, ["*.o_proj=8", "model.layers.1.*=keep"])
    assert w.width("model.layers.0.self_attn.q_proj") == 4 and w.width("model.layers.0.self_attn.o_proj") == 8
    assert w.width("model.layers.1.self_attn.o_proj") is None  # the last match wins
    assert w.width("lm_head", head=True) is None and DenseWidths.parse(None, ["lm_head=6"]).width("lm_head", head=True) == 6
    assert not DenseWidths().active and not DenseWidths.parse(None, ["*=keep"]).active
    assert DenseWidths.from_dict(w.as_dict()) == w
    for bad in ("o_proj", "=4", "*.o_proj=four"):
        with pytest.raises(ExpertbitsError, match="GLOB=BITS"):
            DenseWidths.parse(None, [bad])
    with pytest.raises(ExpertbitsError, match="dense width 9"):
        DenseWidths.parse(9)

    from expertbits.flows.params import QuantizeParams

    with pytest.raises(ValueError, match="--quantizer gptq"):
        QuantizeParams(quantizer="rtn", dense_bits=4)
    for widths in ({"dense_bits": 1}, {"dense_override": ["*.o_proj=1"]}):  # symmetric 1-bit rounds every weight to 0
        with pytest.raises(ValueError, match="symmetric quantization cannot use 1 bit"):
            QuantizeParams(symmetric=True, **widths)
    assert QuantizeParams(dense_bits=4).dense_config() == {"bits": 4, "overrides": []}
    assert QuantizeParams().dense_config() is None  # the key and the files of an experts-only run are unchanged

    _, ft = micro_pair
    with pytest.raises(CheckpointError, match="matches no linear layer"):
        expertbits.quantize(ft, uniform(ft, 4), tmp_path / "x", text=MICRO_CAL, group_size=32, windows=2, seq_len=64,
                            dense_override=("*.qkv_proj=4",))
    with pytest.raises(ExpertbitsError, match="GPTQ"):
        expertbits.quantize(ft, uniform(ft, 4), tmp_path / "y", quantizer="rtn", dense_bits=4)


def test_the_gpu_memory_estimate_counts_the_dense_layers_and_a_quantized_head(micro_pair):
    from expertbits.tasks.model.streaming import device_bytes

    _, ft = micro_pair
    base = device_bytes(ft, torch.float32, 4, 64, head=False, hessians=True)
    dense = device_bytes(ft, torch.float32, 4, 64, head=False, hessians=True, dense=True)
    head = device_bytes(ft, torch.float32, 4, 64, head=False, hessians=True, dense=True, dense_head=True)
    assert base <= dense < head
