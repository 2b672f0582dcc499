"""Incoherence rotation of an expert matrix's input dimension: a signed, block-diagonal Hadamard
transform (torch only).

A matrix W [N, K] is quantized as W̃ = W R instead of W, with R orthogonal, and every input row x
is rotated the same way at run time, so the product is unchanged:

    x Wᵀ = (x R)(W R)ᵀ          R Rᵀ = I

    R = diag(s) · blockdiag(H_b, …, H_b)      s ∈ {−1, +1}ᴷ (`signs`), K/b blocks of size b
    H_b = Sylvester Hadamard of order b / √b  (symmetric, H_b H_b = I)

b is the largest power of two dividing K (`block`): 128 for a hidden size of 128, 2048 for
Mixtral-8x7B's 14336-wide expert hidden layer. The random signs and the Hadamard spread a few
large weights of a row over its whole block, so each quantization group's range is set by the
row's typical magnitude rather than by its outliers (QuIP#, QuaRot), and GPTQ, which pushes each
column's rounding error onto the columns after it, has no column that dominates.

`rotate` (x ↦ x R) is a fast Walsh-Hadamard transform: log₂ b passes of sums and differences,
O(K log b) per row, against the matrix product's O(N K). `unrotate` is its inverse (x ↦ x Rᵀ).
"""

from __future__ import annotations

import torch

MIN_BLOCK = 16  # a smaller block mixes too few inputs to matter; such a K is not rotated


def block(k: int) -> int:
    """The Hadamard block size for an input dimension of k: the largest power of two dividing k."""
    return k & -k


def rotatable(k: int) -> bool:
    return block(k) >= MIN_BLOCK


def signs(k: int, seed: int = 0) -> torch.Tensor:
    """The random signs s of an input dimension of k: int8 ±1, the same for every (k, seed) on
    every machine (torch's CPU generator)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return torch.randint(0, 2, (k,), generator=g, dtype=torch.int8) * 2 - 1


def _fwht(x: torch.Tensor, b: int) -> torch.Tensor:
    """x [..., K] times blockdiag(H_b, …) (normalised), in float32 or wider."""
    shape = x.shape
    y = x.reshape(-1, shape[-1] // b, b)
    h = 1
    while h < b:  # one butterfly pass: pairs (i, i + h) within each run of 2h become (sum, difference)
        y = y.view(y.shape[0], y.shape[1], b // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return (y.reshape(shape) * b ** -0.5)


def _wide(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x R for x [..., K] (rows of activations, or the rows of W): in x's dtype, computed in float32
    (float64 for float64)."""
    wide = _wide(x)
    return _fwht(x.to(wide) * s.to(x.device, wide), block(x.shape[-1])).to(x.dtype)


def rotate_input(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """x R for a matrix rotated by signs `s`, x itself for one that is not (s None)."""
    return x if s is None else rotate(x, s)


def unrotate(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x Rᵀ, the inverse of `rotate`."""
    wide = _wide(x)
    return (_fwht(x.to(wide), block(x.shape[-1])) * s.to(x.device, wide)).to(x.dtype)


def rotate_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Rᵀ H R, the Gram matrix of the rotated inputs, from H = Σ xᵀx [K, K]."""
    hr = rotate(h.float(), s)  # H R: each row rotated
    return rotate(hr.T.contiguous(), s).T  # rotate((H R)ᵀ) = Rᵀ H R (H symmetric), itself symmetric
