"""compressed-tensors export: lossless both ways, checked by compressed-tensors' own decompressor
and by a transformers that never imports expertbits, and refused where no consumer is right."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from support.archs import build

from expertbits.flows.cli import main
from expertbits.tasks.checkpoints.adapters import detect
from expertbits.tasks.checkpoints.reader import Checkpoint
from expertbits.tasks.errors import CheckpointError
from expertbits.tasks.model.export import export, export_name, read_export
from expertbits.tasks.model.load import load, read_packed
from expertbits.tasks.model.packed_folder import quantization_config
from expertbits.tasks.quantization.writer import quantize_checkpoint

pytest.importorskip("compressed_tensors")


def quantized(tmp_path: Path, arch: str, bits, *, fused: bool = False, symmetric: bool = True) -> Path:
    """`bits(layer, expert)` per expert, written by the quantization stage."""
    src = build(arch, tmp_path / f"{arch}-src", fused=fused)
    with Checkpoint.open(src) as c:
        layers = detect(c).layers
    alloc = pd.DataFrame([{"layer": layer.layer, "expert": e, "bits": bits(i, e)}
                          for i, layer in enumerate(layers) for e in range(layer.num_experts)])
    quantize_checkpoint(src, alloc, 32, tmp_path / f"{arch}-q", symmetric=symmetric)
    return tmp_path / f"{arch}-q"


def assert_lossless(qdir: Path, out: Path) -> None:
    """Round trip byte for byte, and compressed-tensors' decompressor gives exactly our fp32 weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    qc = quantization_config(qdir)
    ours, back = read_packed(qdir, qc), read_export(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == qc["base_model_type"]
    schemes = [QuantizationScheme(**g) for g in config["quantization_config"]["config_groups"].values()]
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(back) == len(ours)
    for name, q in ours.items():
        target = export_name(qc["base_model_type"], name)
        b = back[target]
        assert torch.equal(q.packed, b.packed) and torch.equal(q.scales, b.scales) and torch.equal(q.zeros, b.zeros)
        scheme = next(s for s in schemes if s.weights.num_bits == q.bits)
        with safe_open(out / weight_map[f"{target}.weight_packed"], framework="pt") as f:
            tensors = {k.rsplit(".", 1)[1]: f.get_tensor(k) for k in weight_map if k.startswith(target + ".weight")}
        assert torch.equal(PackedQuantizationCompressor.decompress(tensors, scheme)["weight"], q.dequantize()), name


def plain_transformers_logits(folders: list[Path]) -> list:
    """Logits of each folder loaded by a transformers that never imports expertbits (one process)."""
    code = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
out = []
for path in json.loads(sys.argv[1]):
    try:
        c = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if c.is_encoder_decoder else AutoModelForCausalLM
        m = auto.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.arange(2, 42)[None]
        extra = {"decoder_input_ids": ids[:, :8]} if c.is_encoder_decoder else {}
        with torch.no_grad():
            out.append(m(ids, **extra).logits.tolist())
    except Exception as e:
        out.append(f"{type(e).__name__}: {e}"[:300])
assert not any(k.startswith("expertbits") for k in sys.modules)
print(json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", code, json.dumps([str(f) for f in folders])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.tensor(x) if isinstance(x, list) else x for x in json.loads(r.stdout.strip().splitlines()[-1])]


def ours(qdir: Path) -> torch.Tensor:
    model, _ = load(qdir, dtype=torch.float32)
    ids = torch.arange(2, 42)[None]
    extra = {"decoder_input_ids": ids[:, :8]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(ids, **extra).logits


@pytest.mark.slow
def test_what_the_export_says_is_what_transformers_does(tmp_path):
    """Uniform symmetric loads with our logits; across-layer widths load wrong (said beside it);
    zero points fail to load; Switch fails to load. Each export is lossless."""
    cases = {
        "mixtral-uniform": quantized(tmp_path / "a", "mixtral", lambda layer, e: 4),
        "mixtral-fused-uniform": quantized(tmp_path / "b", "mixtral", lambda layer, e: 3, fused=True),
        "qwen2-uniform": quantized(tmp_path / "c", "qwen2_moe", lambda layer, e: 4),
        "deepseek-v3-uniform": quantized(tmp_path / "d", "deepseek_v3", lambda layer, e: 4, fused=True),
        "olmoe-layerwise": quantized(tmp_path / "e", "olmoe", lambda layer, e: 2 if layer == 0 else 4),
        "qwen3-asymmetric": quantized(tmp_path / "f", "qwen3_moe", lambda layer, e: 4, symmetric=False),
        "switch-uniform": quantized(tmp_path / "g", "switch_transformers", lambda layer, e: 4),
    }
    reports = {}
    for name, qdir in cases.items():
        reports[name] = export(qdir, tmp_path / f"{name}-ct")["consumers"]["transformers"]
        assert_lossless(qdir, tmp_path / f"{name}-ct")
    logits = dict(zip(cases, plain_transformers_logits([tmp_path / f"{n}-ct" for n in cases])))
    for name, qdir in cases.items():
        verdict, got = reports[name], logits[name]
        if verdict == "loads correctly":
            assert isinstance(got, torch.Tensor), (name, got)
            assert torch.allclose(got, ours(qdir), atol=1e-5, rtol=1e-5), name
        elif verdict.startswith("loads WRONG"):
            assert isinstance(got, torch.Tensor) and (got - ours(qdir)).abs().max() > 1e-3, name
        else:
            assert verdict.startswith("fails to load") and isinstance(got, str), (name, got)
    assert {n for n, v in reports.items() if v == "loads correctly"} == {
        "mixtral-uniform", "mixtral-fused-uniform", "qwen2-uniform", "deepseek-v3-uniform"}


def test_mixed_widths_within_a_layer_are_refused_and_nothing_is_written(tmp_path, capsys):
    qdir = quantized(tmp_path, "mixtral", lambda layer, e: 2 + e % 2)
    with pytest.raises(CheckpointError, match="(?s)mix expert widths.*--granularity layer"):
        export(qdir, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixtral-q", "mixtral-src"]  # no temporary left
    assert main(["export", str(qdir), "--out", str(tmp_path / "ct")]) == 1
    assert "mix expert widths" in capsys.readouterr().err and not (tmp_path / "ct").exists()


def test_cli_exports_a_run_folder_and_warns_where_transformers_is_wrong(tmp_path, capsys):
    qdir = quantized(tmp_path, "olmoe", lambda layer, e: 2 if layer == 0 else 4)
    run = tmp_path / "run"
    run.mkdir()
    qdir.rename(run / "quantization")
    assert main(["export", str(run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    out = capsys.readouterr()
    assert "exported 24 expert matrices" in out.out and "warning: transformers loads WRONG" in out.err
    assert "loads WRONG" in (tmp_path / "ct" / "README.md").read_text()
    assert main(["export", str(run), "--out", str(tmp_path / "ct")]) == 1  # never overwrites


CASES = [(a, False) for a in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                              "switch_transformers")] + [(a, True) for a in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                                                                            "deepseek_v2", "deepseek_v3")]


@pytest.mark.parametrize("arch,fused", CASES, ids=[f"{a}-{'fused' if f else 'per-expert'}" for a, f in CASES])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_every_architecture_exports_losslessly(arch, fused, symmetric, tmp_path):
    qdir = quantized(tmp_path, arch, lambda layer, e: (3, 4)[layer % 2], fused=fused, symmetric=symmetric)
    report = export(qdir, tmp_path / "ct")
    assert report["modules"] == len(quantization_config(qdir)["modules"])
    assert_lossless(qdir, tmp_path / "ct")
