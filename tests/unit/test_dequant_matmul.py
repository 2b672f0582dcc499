"""The Triton dequantize-matmul kernel against the pure-torch reference.

Without CUDA this runs in the Triton interpreter, chosen for expertbits' kernels alone
(kernels/triton_mode.py).
"""

import os

import pytest
import torch

from expertbits.kernels.dequant_matmul import (  # noqa: E402
    dequant_matmul,
    dequant_matmul_reference,
    interpreted,
)
from expertbits.kernels.packing import quantize_rtn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K), none a multiple of the blocks: partial M, N and K tiles, several K steps.
SHAPES = [(1, 64, 128), (5, 96, 200), (16, 130, 70)]
BITS = [1, 2, 3, 4, 8]
GROUP_SIZES = [32, 64, 128, 100]  # 100: groups straddle both BLOCK_K and word boundaries
X_DTYPES = [torch.float32, torch.float16]


def _case(m, n, k, bits, group_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return x.to(DEVICE), quantize_rtn(w, bits, group_size).to(DEVICE)


def _assert_matches(y, x, q):
    """Elementwise fp32 rounding bound: |y - ref| <= K * 2**-23 * (|x| @ |W|^T).

    Any two fp32 summation orders of K products differ by at most about 2 * K * 2**-24 times
    the sum of absolute products (the classic recursive-summation bound, once per side).
    It is loose (observed errors are ~100x smaller) but does not depend on block sizes.
    The 1e-6 floor covers outputs whose absolute products all vanish.
    """
    ref = dequant_matmul_reference(x, q)
    assert y.shape == ref.shape and y.dtype == torch.float32
    bound = q.shape[1] * 2.0**-23 * (x.float().abs() @ q.dequantize().abs().T) + 1e-6
    err = (y - ref).abs()
    assert torch.all(err <= bound), f"max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"
    return err.max().item()


@pytest.mark.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda s: str(s))
def test_kernel_matches_reference(m, n, k, bits, group_size, dtype):
    x, q = _case(m, n, k, bits, group_size, dtype, seed=m + n + k + bits)
    _assert_matches(dequant_matmul(x, q), x, q)


@pytest.mark.parametrize("bits", [3, 5, 7], ids=lambda b: f"{b}bit")
def test_small_blocks_many_k_steps(bits):
    # 16-wide blocks force 7 K steps; group 24 and 10/6/4 codes per word cross the block edges.
    x, q = _case(5, 40, 100, bits, 24, torch.float32, seed=bits)
    _assert_matches(dequant_matmul(x, q, blocks=(16, 16, 16)), x, q)


def test_strided_x():
    # A transposed view: strides (1, M) rather than (K, 1).
    x, q = _case(7, 33, 90, 4, 32, torch.float32)
    xt = x.T.contiguous().T
    assert xt.stride() == (1, 7)
    _assert_matches(dequant_matmul(xt, q), x, q)


def test_bf16_x():
    x, q = _case(3, 50, 60, 4, 32, torch.bfloat16)
    _assert_matches(dequant_matmul(x, q), x, q)


def test_empty_m():
    x, q = _case(0, 20, 30, 4, 16, torch.float32)
    assert dequant_matmul(x, q).shape == (0, 20)


def test_rejects_bad_inputs():
    x, q = _case(2, 20, 30, 4, 16, torch.float32)
    with pytest.raises(ValueError, match=r"x has shape \(2, 31\).*\(20, 30\)"):
        dequant_matmul(torch.randn(2, 31, device=DEVICE), q)
    with pytest.raises(ValueError, match="2-D"):
        dequant_matmul(torch.randn(30, device=DEVICE), q)
    with pytest.raises(ValueError, match="x must be one of"):
        dequant_matmul(torch.ones(2, 30, dtype=torch.int32, device=DEVICE), q)
    with pytest.raises(ValueError, match="powers of two"):
        dequant_matmul(x, q, blocks=(16, 24, 16))
    with pytest.raises(ValueError, match="input_precision"):
        dequant_matmul(x, q, input_precision="fp8")


def test_interpreted_flag():
    # interpreted without CUDA, or where TRITON_INTERPRET=1 asks for it
    assert interpreted() == (not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_gpu_bigger_bf16(bits):
    for m in (1, 16, 33, 100):  # every GPU config, with partial tiles
        x, q = _case(m, 4096 + 17, 2048 + 50, bits, 128, torch.bfloat16, seed=m)
        _assert_matches(dequant_matmul(x, q), x, q)
