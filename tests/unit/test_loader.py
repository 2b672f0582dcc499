"""The shipped artifact: load, run and generate from the packed output of every architecture.

The independent reference is transformers' own expert implementation on a folder whose experts
hold our dequantized weights (`dequantize_checkpoint`): the packed runtime must give its logits.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from support.archs import ARCHS, FUSED_ON_DISK, build
from support.quantized import quantize_mixed
from support.reference import dequantize_checkpoint

from expertbits.kernels.modules import PackedExperts, PackedLinear
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.errors import CheckpointError
from expertbits.tasks.model.load import load

CASES = [(a, False) for a in ARCHS] + [(a, True) for a in FUSED_ON_DISK]




def forward(model, ids):
    extra = {"decoder_input_ids": ids[:, :8]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(ids, **extra).logits


@pytest.mark.parametrize("arch,fused", CASES, ids=[f"{a}-{'fused' if f else 'per-expert'}" for a, f in CASES])
def test_every_architecture_loads_runs_packed_and_generates(arch, fused, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from expertbits.flows.cli import main

    src = build(arch, tmp_path / "src", fused=fused)
    with Checkpoint.open(src) as c:
        assert detect(c).layout == ("fused" if fused else "per-expert")
    alloc = quantize_mixed(src, tmp_path / "q")
    auto = AutoModelForSeq2SeqLM if arch == "switch_transformers" else AutoModelForCausalLM
    reference = auto.from_pretrained(dequantize_checkpoint(tmp_path / "q", src, tmp_path / "deq"), dtype=torch.float32)
    shutil.rmtree(src)  # the output must not need the original checkpoint

    model, tokenizer = load(tmp_path / "q", dtype=torch.float32)
    packed = [m for m in model.modules() if isinstance(m, (PackedExperts, PackedLinear))]
    assert packed, "no expert runs from packed weights"
    routed = [n for n, _ in model.named_parameters() if ".experts." in n or n.endswith(("gate_up_proj", "down_proj"))
              and "shared" not in n]
    assert routed == [], f"fp expert weights were built: {routed[:3]}"
    bits = sorted(b for m in packed for b in (m.bits if isinstance(m, PackedExperts) else [m.bits]))
    assert set(bits) == set(alloc.bits)

    ids = torch.arange(2, 42)[None]
    got, want = forward(model, ids), forward(reference.eval(), ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())

    assert main(["generate", "--model", str(tmp_path / "q"), "--prompt", "a small dog", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_default_dtype_follows_the_config_like_transformers(micro_pair, tmp_path):
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    model, _ = load(tmp_path / "q")
    want = json.loads((ft / "config.json").read_text())["dtype"]
    assert str(model.dtype) == f"torch.{want}"


def test_from_pretrained_after_import_is_the_documented_load(micro_pair, tmp_path):
    """`import expertbits.tasks.model.load` then the usual call, in a fresh interpreter."""
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    code = f"""
import expertbits.tasks.model.load, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
print(type(m.model.layers[0].mlp.experts).__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["PackedExperts"]


def test_plain_transformers_refuses_the_folder_loudly(micro_pair, tmp_path):
    """Without expertbits, transformers must raise and say what the folder is, never build random experts."""
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    code = f"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3)
print("LOADED")
assert not any(m.startswith("expertbits") for m in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3, out.stdout + out.stderr[-2000:]
    assert "LOADED" not in out.stdout
    # the folder's text (part of every published folder) names the import path users were told
    assert "expertbits" in out.stdout and "import expertbits.tasks.loader" in out.stdout


def test_the_old_loader_path_still_loads_with_a_deprecation_warning(micro_pair, tmp_path):
    """`import expertbits.tasks.loader`, as published folders tell users, still works, and warns."""
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    code = f"""
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import expertbits.tasks.loader
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})
print(type(m.model.layers[0].mlp.experts).__name__, expertbits.tasks.loader.load.__module__)
print([str(w.message) for w in caught if w.category is DeprecationWarning])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.splitlines()
    assert first == "PackedExperts expertbits.tasks.model.load"
    assert "expertbits.tasks.loader is deprecated: import expertbits.tasks.model.load instead" in second


def test_a_folder_missing_a_packed_shard_is_an_error_not_random_experts(micro_pair, tmp_path):
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    weight_map = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    victim = next(k for k in weight_map if k.endswith(".qweight"))
    index = tmp_path / "q" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: v for k, v in weight_map.items() if k != victim}}))
    with pytest.raises(CheckpointError, match=f"no shard holds {victim}"):
        load(tmp_path / "q")


def test_load_refuses_an_unquantized_folder(micro_pair):
    with pytest.raises(CheckpointError, match="not an expertbits-quantized config"):
        load(micro_pair[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu_experts_run_through_the_fused_kernel(micro_pair, tmp_path, monkeypatch):
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    cpu, _ = load(tmp_path / "q", dtype=torch.float32)
    gpu, _ = load(tmp_path / "q", dtype=torch.float32, device="cuda")
    import expertbits.kernels.fused_moe as fused

    launches, real = [], fused.fused_moe
    monkeypatch.setattr(fused, "fused_moe", lambda *a, **k: launches.append(1) or real(*a, **k))  # counts, runs the real one
    ids = torch.arange(2, 42)[None]
    got = forward(gpu, ids.cuda()).cpu()
    assert len(launches) == sum(isinstance(m, PackedExperts) for m in gpu.modules())  # one fused call per MoE layer
    assert torch.allclose(got, forward(cpu, ids), atol=1e-3, rtol=1e-3)


def test_evaluation_numbers_are_those_of_from_pretrained_and_a_forward_pass(micro_pair, tmp_path):
    """The evaluation stage measures the shipped folder as a user runs it: KL and perplexity
    recomputed here from `from_pretrained` + forward on the same windows must match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expertbits.tasks.checkpoints.texts import token_windows
    from expertbits.tasks.measure.evaluate import evaluate
    from expertbits.zoo import text_path

    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    text = text_path("code-heldout").read_text()[:30_000]
    got = evaluate(ft, tmp_path / "q", text, seq_len=64, windows=3)
    fp = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    quant = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    ids = token_windows(text, AutoTokenizer.from_pretrained(ft), 64, 3)
    with torch.no_grad():
        p = torch.log_softmax(fp(ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(quant(ids).logits[:, :-1].float(), -1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") / (ids.shape[0] * (ids.shape[1] - 1))
    nll = -q.gather(-1, ids[:, 1:, None]).mean()
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4)
    assert got["ppl_quant"] == pytest.approx(float(nll.exp()), rel=1e-4)


@pytest.mark.parametrize("arch", ["mixtral", "switch_transformers"])
def test_an_expert_missing_from_the_config_is_an_error_not_a_silent_zero(arch, tmp_path):
    """Dropping one expert's entries must not load a model whose expert 3 outputs zeros (fused)
    or keeps uninitialised memory (per-expert Linear)."""
    quantize_mixed(build(arch, tmp_path / "src"), tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    modules = config["quantization_config"]["modules"]
    for name in [n for n, info in modules.items() if info["expert"] == 3 and info["layer"] == min(
            v["layer"] for v in modules.values())]:
        del modules[name]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="(?s)lacks \\(expert, matrix\\).*quantize again"):
        load(tmp_path / "q")


def test_converting_the_model_dtype_keeps_the_packed_format(micro_pair, tmp_path):
    """`model.bfloat16()` / `.float()` convert floating buffers; the packed scales must stay fp16
    (bf16 would round them, and the kernels take fp16)."""
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    model, _ = load(tmp_path / "q", dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    before = [m.bank("gate").expert(0).dequantize() for m in experts]
    for convert in (model.bfloat16, model.float):
        convert()
        for m, want in zip(experts, before):
            banks = [m.bank(r) for r in m.ROLES]
            assert all(b.scales.dtype == torch.float16 and b.zeros.dtype == torch.uint8 for b in banks)
            assert torch.equal(banks[0].expert(0).dequantize(), want)
