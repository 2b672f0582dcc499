"""GPTQ for one matrix: a case worked by hand, RTN where H says nothing, never worse than RTN."""

from __future__ import annotations

import pytest
import torch

from expertbits.kernels.gptq import gptq, output_error
from expertbits.kernels.packing import quantize_clipped, quantize_rtn, unpack


def codes(q) -> torch.Tensor:
    return unpack(q.packed, q.bits, q.shape[1])


def test_a_two_by_four_case_worked_by_hand():
    """Rows [0.4, 0.4, 3, 0] and [1.6, 1.0, 3, 0], 2 bits, one group of 4: the grid is 0..3 with
    step 1 (scale 1, zero 0). H couples columns 0 and 1 ([[2, 1], [1, 2]]) and leaves 2 and 3
    alone, so H⁻¹ = ⅓[[2, −1], [−1, 2]] ⊕ I, and rounding column 0 moves column 1 by
    −H⁻¹₀₁ / H⁻¹₀₀ = +½ times column 0's error:
      row 0: 0.4 → 0 (error 0.4), so column 1 becomes 0.4 + 0.2 = 0.6 → 1;
      row 1: 1.6 → 2 (error −0.4), so column 1 becomes 1.0 − 0.2 = 0.8 → 1.
    RTN rounds row 0's column 1 to 0; GPTQ's choice has the smaller output error
    dᵀHd: 0.56 against 0.96 for row 0."""
    w = torch.tensor([[0.4, 0.4, 3.0, 0.0], [1.6, 1.0, 3.0, 0.0]])
    h = torch.eye(4)
    h[:2, :2] = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    q = gptq(w, h, bits=2, group_size=4, damp=0.0)
    assert q.scales.float().tolist() == [[1.0], [1.0]] and q.zeros.tolist() == [[0], [0]]
    assert codes(q).tolist() == [[0, 1, 3, 0], [2, 1, 3, 0]]
    assert codes(quantize_rtn(w, 2, 4)).tolist() == [[0, 0, 3, 0], [2, 1, 3, 0]]
    assert output_error(w[:1], QuantRow(q, 0), h) == pytest.approx(0.56)
    assert output_error(w[:1], QuantRow(quantize_rtn(w, 2, 4), 0), h) == pytest.approx(0.96)


def QuantRow(q, r):
    from expertbits.kernels.packing import QuantizedTensor

    return QuantizedTensor(q.packed[r : r + 1], q.scales[r : r + 1], q.zeros[r : r + 1], q.bits, q.group_size,
                           (1, q.shape[1]))


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (3, 32, False), (4, 64, True), (8, 16, False),
                                                  (1, 32, False), (5, 48, False)])
def test_with_an_uninformative_hessian_gptq_is_rtn(bits, group, symmetric):
    """H = c·I: no column tells anything about another, so nothing moves and GPTQ is exactly RTN
    (same codes, scales and zero points), dampening or not."""
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(bits))
    for damp in (0.0, 0.01):
        q, r = gptq(w, 3.0 * torch.eye(100), bits, group, symmetric=symmetric, damp=damp), quantize_rtn(w, bits, group, symmetric)
        assert torch.equal(q.packed, r.packed) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_with_clip_and_an_uninformative_hessian_gptq_is_the_clipping_search(bits):
    """`clip`: each group's grid comes from the clipping search weighted by diag(H); with H = c·I
    nothing moves, so the result is quantize_clipped's, codes included (clamped to the grid)."""
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(bits))
    w[:, 7] *= 8  # an outlier column the search clips
    q, c = gptq(w, 3.0 * torch.eye(100), bits, 32, clip=True), quantize_clipped(w, bits, 32)
    assert torch.equal(q.packed, c.packed) and torch.equal(q.scales, c.scales) and torch.equal(q.zeros, c.zeros)
    assert not torch.equal(q.scales, quantize_rtn(w, bits, 32).scales)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_never_worse_than_rtn_on_the_layer_output(bits, act_order):
    """On correlated inputs (a random layer fed tokens that share directions), GPTQ's output error
    is below RTN's at every width, with and without activation order."""
    gen = torch.Generator().manual_seed(bits)
    mix = torch.randn(256, 256, generator=gen) / 16
    x = torch.randn(2048, 256, generator=gen) @ (torch.eye(256) + mix) * torch.rand(256, generator=gen) * 2
    w = torch.randn(64, 256, generator=gen) * 0.05
    h = x.T @ x
    ours = output_error(w, gptq(w, h, bits, 64, act_order=act_order), h)
    rtn = output_error(w, quantize_rtn(w, bits, 64), h)
    assert ours < rtn * (0.9 if bits < 4 else 1.0), (ours, rtn)


def test_an_input_never_seen_keeps_its_weights():
    """A dead input dimension (diag(H) = 0) is rounded like RTN, not zeroed."""
    w = torch.full((3, 8), 0.7)
    h = torch.eye(8)
    h[5, 5] = 0.0
    q = gptq(w, h, 4, 8)
    assert (q.dequantize()[:, 5] - 0.7).abs().max() < 0.05


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        gptq(torch.zeros(2, 4), torch.eye(3), 4, 4)
    with pytest.raises(ValueError, match="NaN"):
        gptq(torch.full((2, 4), float("nan")), torch.eye(4), 4, 4)


def test_clipping_search_trims_an_outlier_and_is_never_worse_than_rtn():
    """One group of 16 with an outlier: shrinking the range loses the outlier's precision but
    rounds the other 15 finer, which lowers the group's squared error; elsewhere RTN stays."""
    from expertbits.kernels.packing import quantize_clipped

    row = torch.linspace(-0.3, 0.3, 16)
    row[3] = 1.0
    w = torch.stack([row, torch.linspace(-1, 1, 16)])
    rtn, clipped = quantize_rtn(w, 2, 16), quantize_clipped(w, 2, 16)
    err = lambda q: (q.dequantize() - w).square().sum(1)  # noqa: E731
    assert err(clipped)[0] < 0.8 * err(rtn)[0] and clipped.scales[0, 0] < rtn.scales[0, 0]
    assert err(clipped)[1] <= err(rtn)[1]
    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        w = torch.randn(32, 200, generator=gen)
        imp = torch.rand(200, generator=gen)
        a, b = quantize_rtn(w, bits, 64), quantize_clipped(w, bits, 64, importance=imp)
        we = lambda q: float(((q.dequantize() - w).square() * imp).sum())  # noqa: E731
        assert we(b) <= we(a)
    assert torch.equal(quantize_clipped(w, 3, 64, steps=1, max_shrink=0.0).packed, quantize_rtn(w, 3, 64).packed)


def test_every_quantizer_refuses_what_rtn_refuses():
    from expertbits.kernels.packing import quantize_clipped

    w = torch.ones(2, 8)
    for quantize in (lambda **kw: quantize_clipped(w, **kw), lambda **kw: gptq(w, torch.eye(8), **kw)):
        with pytest.raises(ValueError, match="group_size"):
            quantize(bits=4, group_size=0)
        with pytest.raises(ValueError, match="symmetric 1-bit"):
            quantize(bits=1, group_size=4, symmetric=True)
