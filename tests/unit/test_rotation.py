"""Incoherence rotation (--rotate): the transform against scipy's Hadamard matrices, the rotated
codes through every reader of the format (loader, streaming, both kernels, validation), and the
refusals (export, mixed rotations in one bank, unknown rotations and versions)."""

import json

import pytest
import scipy.linalg
import torch
from support.archs import build
from support.quantized import quantize_mixed
from support.reference import dequantize_checkpoint

from expertbits.kernels import hadamard
from expertbits.kernels.bank import ExpertBank
from expertbits.kernels.dequant_matmul import dequant_matmul
from expertbits.kernels.fused_moe import fused_moe, fused_moe_reference
from expertbits.kernels.gptq import output_error
from expertbits.kernels.modules import PackedExperts, packed_linear
from expertbits.tasks.errors import CheckpointError
from expertbits.tasks.quantization.method import QuantizerConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dense_r(s: torch.Tensor) -> torch.Tensor:
    """R = diag(s) · blockdiag(H_b / √b) in float64, from scipy's Sylvester construction."""
    k = len(s)
    b = hadamard.block(k)
    h = torch.tensor(scipy.linalg.hadamard(b), dtype=torch.float64) / b ** 0.5
    return torch.diag(s.double()) @ torch.block_diag(*[h] * (k // b))


@pytest.mark.parametrize("k", [16, 96, 128, 256, 14336 // 64])
def test_rotate_is_x_times_a_signed_block_hadamard(k):
    s = hadamard.signs(k)
    r = dense_r(s)
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-12)  # orthogonal
    x = torch.randn(7, k, dtype=torch.float64)
    assert torch.allclose(hadamard.rotate(x, s), x @ r, atol=1e-12)
    assert torch.allclose(hadamard.unrotate(x, s), x @ r.T, atol=1e-12)
    h = x.T @ x + torch.eye(k, dtype=torch.float64)
    assert torch.allclose(hadamard.rotate_hessian(h.float(), s).double(), r.T @ h @ r, atol=1e-4 * float(h.abs().max()))
    x32 = x.float()
    assert hadamard.rotate(x32, s).dtype == torch.float32
    assert torch.allclose(hadamard.unrotate(hadamard.rotate(x32, s), s), x32, atol=1e-5)


def test_signs_and_blocks():
    s = hadamard.signs(128)
    assert s.dtype == torch.int8 and set(s.tolist()) == {-1, 1}
    assert torch.equal(s, hadamard.signs(128)) and not torch.equal(s, hadamard.signs(128, seed=1))
    assert [hadamard.block(k) for k in (128, 14336, 72, 40)] == [128, 2048, 8, 8]
    assert QuantizerConfig(rotate=True).signs(72) is None  # blocks of 8 mix too little: left as is
    assert QuantizerConfig(rotate=False).signs(128) is None
    assert QuantizerConfig(rotate=True).label == "rtn+rot"
    assert "rotate" not in QuantizerConfig().as_dict() and QuantizerConfig(rotate=True).as_dict()["rotate"] is True


def _outlier_matrix(n=64, k=128, seed=0):
    """Rows of small weights with a few large input columns."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[:, [5, 70]] *= 40
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the zoo stores fp16: W R is taken in fp32
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rotated_codes_are_of_w_r_and_dequantize_to_w(method, dtype):
    w = _outlier_matrix().to(dtype)
    h = torch.eye(w.shape[1]) * 512
    rotated = QuantizerConfig(method, rotate=True)
    qr = rotated.gptq_matrix(w, h, 3, 32) if method == "gptq" else rotated.round_matrix(w, 3, 32)
    assert torch.equal(qr.signs, hadamard.signs(w.shape[1]))
    r = dense_r(qr.signs)
    assert torch.allclose(qr.dequantize().double(), qr.stored().dequantize().double() @ r.T, atol=1e-5)
    # RTN of W R: every stored weight within half a step of W R's
    if method == "rtn":
        step = qr.scales.float().repeat_interleave(32, dim=1)
        assert bool(((qr.stored().dequantize() - (w.double() @ r).float()).abs() <= step * (0.5 + 1e-5) + 1e-6).all())


def test_gptq_in_the_rotated_basis_spreads_outlier_inputs():
    """A few input channels 20× the others (the expert hidden activations' shape on the zoo):
    GPTQ of W R against Rᵀ H R loses several times less output than GPTQ of W against H."""
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(64, 128, generator=gen) * 0.02
        x = torch.randn(512, 128, generator=gen)
        x[:, [5, 70, 99]] *= 20
        h = x.T @ x
        plain = QuantizerConfig("gptq").gptq_matrix(w, h, 2, 32)
        rotated = QuantizerConfig("gptq", rotate=True).gptq_matrix(w, h, 2, 32)
        assert plain.signs is None
        assert output_error(w, rotated, h) < 0.3 * output_error(w, plain, h)  # measured 0.13-0.15


def test_packed_linear_and_the_kernel_rotate_the_input():
    w = _outlier_matrix(n=40, k=96)
    q = QuantizerConfig(rotate=True).round_matrix(w, 3, 32)
    x = torch.randn(5, 96)
    want = x.double() @ q.dequantize().double().T
    assert torch.allclose(packed_linear(x, q).double(), want, atol=1e-4)
    assert torch.allclose(dequant_matmul(x.to(DEVICE), q.to(DEVICE)).cpu().double(), want, atol=1e-4)
    # without the rotation the same codes give another product: the check above is not vacuous
    assert not torch.allclose(packed_linear(x, q.stored()).double(), want, atol=1e-2)


def _rotated_banks(bits=(2, 3, 4, 3), hidden=64, ffn=32, group_size=32):
    c = QuantizerConfig(rotate=True)
    gen = torch.Generator().manual_seed(0)

    def bank(n, k):
        return ExpertBank.stack([c.round_matrix(torch.randn(n, k, generator=gen) * 0.2, b, group_size) for b in bits])
    return tuple(b.to(DEVICE) for b in (bank(ffn, hidden), bank(ffn, hidden), bank(hidden, ffn)))


def test_fused_kernel_runs_rotated_banks():
    gate, up, down = _rotated_banks()
    assert gate.signs is not None and down.signs is not None and len(down.signs) == 32
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 64, generator=gen).to(DEVICE)
    weights, index = torch.rand(9, 4, generator=gen).softmax(-1).topk(2, dim=-1)
    index, weights = index.to(DEVICE), weights.to(DEVICE)
    out = fused_moe(x, index, weights, gate, up, down)
    ref = fused_moe_reference(x, index, weights, gate, up, down)  # dequantized weights, no rotation of x
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 2e-6
    experts = PackedExperts([tuple(b.expert(e) for b in (gate, up, down)) for e in range(4)], torch.nn.functional.silu)
    loop = experts(x.cpu(), index.cpu(), weights.cpu())  # the CPU path: the per-expert loop over packed_linear
    assert torch.allclose(loop.double(), ref.cpu(), atol=1e-4)
    with pytest.raises(ValueError, match="share its rotation"):
        fused_moe(x, index, weights, gate, ExpertBank(**{**up.tensors(), "signs": -up.signs}, bits=up.bits,
                                                      group_size=up.group_size, shape=up.shape), down)


def test_a_bank_refuses_experts_in_different_rotations():
    w = torch.randn(32, 64)
    rotated, plain = QuantizerConfig(rotate=True).round_matrix(w, 2, 32), QuantizerConfig().round_matrix(w, 2, 32)
    with pytest.raises(ValueError, match="rotation differs"):
        ExpertBank.stack([rotated, plain])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_a_rotated_folder_loads_streams_validates_and_is_not_exported(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from expertbits.tasks.checkpoints.texts import text_examples
    from expertbits.tasks.measure.evaluate import all_log_probs
    from expertbits.tasks.measure.kernel_check import validate
    from expertbits.tasks.model.export import export
    from expertbits.tasks.model.load import load
    from expertbits.tasks.model.streaming import streamed
    from expertbits.zoo import text_path

    src = build(arch, tmp_path / "src")
    quantize_mixed(src, tmp_path / "q", rotate=True)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == 3 and qc["quantizer"]["rotate"] is True
    rotated = [info for info in qc["modules"].values() if info.get("rotation") == "hadamard"]
    assert rotated and len(rotated) == len(qc["modules"])  # this family's widths are all rotatable
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["weight_map"]
    signs = sorted(k for k in index if ".expertbits_signs_" in k)
    assert signs == sorted({info["signs"] for info in rotated})  # one per layer and input width, shared
    assert len(signs) == len({(info["layer"], info["shape"][1]) for info in rotated})

    reference = AutoModelForCausalLM.from_pretrained(dequantize_checkpoint(tmp_path / "q", src, tmp_path / "deq"),
                                                     dtype=torch.float32).eval()
    model, _ = load(tmp_path / "q", dtype=torch.float32)
    ids = torch.arange(2, 42)[None]
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), float((got - want).abs().max())
    banks = [m.bank("down") for m in model.modules() if isinstance(m, PackedExperts)]
    assert banks and all(b.signs is not None for b in banks)

    _, pairs = text_examples(src, text_path("code-train").read_text()[:4000], 32, 2, False)
    with streamed(tmp_path / "q") as lazy:  # how evaluation runs the shipped folder on a CPU
        lazy_lp = all_log_probs(lazy, pairs, 0)
    with torch.no_grad():
        loaded_lp = [torch.log_softmax(model(**inputs).logits[0, :-1].float(), -1) for inputs, _ in pairs]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lazy_lp, loaded_lp))

    report, summary = validate(tmp_path / "q", src)  # the kernel, and the half-step check in the rotated basis
    assert summary["failed"] == 0 and len(report) == len(qc["modules"])

    with pytest.raises(CheckpointError, match="rotated basis") as e:
        export(tmp_path / "q", tmp_path / "export")
    assert "--no-rotate" in e.value.fix and not (tmp_path / "export").exists()


def test_unknown_rotations_and_versions_are_refused_by_name(micro_pair, tmp_path):
    from expertbits.tasks.model.load import base_config_dict
    from expertbits.tasks.model.packed_folder import stored_keys

    with pytest.raises(CheckpointError, match="unknown input rotation 'givens'"):
        stored_keys("model.layers.0.mlp.experts.0.gate_proj", {"rotation": "givens", "signs": "x"})
    config = {"quantization_config": {"quant_method": "expertbits", "base_model_type": "mixtral", "version": 4}}
    with pytest.raises(CheckpointError, match="version 4, this expertbits reads versions 2, 3"):
        base_config_dict(config)


def test_a_folder_without_rotation_stays_version_2(micro_pair, tmp_path):
    _, ft = micro_pair
    quantize_mixed(ft, tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["version"] == 2 and "rotate" not in qc["quantizer"]
    assert not any("rotation" in info for info in qc["modules"].values())
