"""GPTQ (Frantar et al., 2022) for one weight matrix, into expertbits' packed format (torch only).

Given W [N, K] and the Gram matrix of its inputs H = Σ x xᵀ [K, K] (over the tokens the matrix
actually sees: for an expert, the tokens its router sends it), columns are quantized one at a
time, and each column's rounding error is pushed onto the columns not yet quantized through the
inverse Hessian, so the layer output X Wᵀ changes as little as the grid allows:

    Hd   = H + damp · mean(diag H) · I              dampening keeps the Cholesky factor stable
    U    = chol(Hd⁻¹), upper                        (Hd⁻¹ = Uᵀ U)
    for each column j (in blocks of B columns, updates of later blocks applied once per block):
        q_j  = grid(w_j)                            codes from the group's scale and zero point
        e_j  = (w_j − dequant(q_j)) / U[j, j]
        w_k -= e_j · U[j, k]    for k > j

The grid is quantize_rtn's: group-wise along K, fp16 scales rounded up, integer zero points
(`symmetric`: zero at 2**(bits−1)), so the result is an ordinary QuantizedTensor and every
reader of the format reads it. Each group's grid is fixed up front from the original weights
("static groups"): the updates cannot widen a group's range and coarsen its grid. The reference
code sets a group's grid when its first column is reached, from the weights as updated so far
(`static_groups=False`); on the random correlated layers of tests/unit/test_gptq.py that was worse
than RTN at 2 bits (1.1× RTN's output error) where static groups give 0.63×. `act_order` takes
the columns in order of decreasing diag(H) (0.41–0.49× RTN's error there).

An input dimension the calibration tokens never used (diag(H) = 0) gets unit curvature: its
weights are rounded like RTN, never set to zero (zeroing them, as the reference code does, is
wrong for inputs that are merely rare).

Everything runs on w's device; W, H, the Cholesky factor and the error updates are float32
whatever w's dtype (a GPU computing the model in bf16 still factorises in fp32).
"""

from __future__ import annotations

import torch

from .packing import QuantizedTensor, _check_args, _grouped, grid, pack, quantize_clipped


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = False,
         damp: float = 0.01, act_order: bool = False, static_groups: bool = True, clip: bool = False,
         block: int = 128) -> QuantizedTensor:
    """Quantize w [N, K] with GPTQ against the input Gram matrix h [K, K]. `clip`: each static
    group's grid from the clipping search, weighted per column by diag(h)."""
    _check_args(w, bits, group_size, symmetric)
    if h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"w must be [N, K] and h [K, K]; got {tuple(w.shape)} and {tuple(h.shape)}")
    if not (torch.isfinite(w).all() and torch.isfinite(h).all()):
        raise ValueError("w or h contains NaN or Inf; cannot quantize")
    n, k = w.shape
    qmax = (1 << bits) - 1
    groups = -(-k // group_size)
    device = w.device
    W = w.to(torch.float32).clone()
    H = h.to(device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(k, device=device)

    scales16 = torch.empty(n, groups, dtype=torch.float16, device=device)
    s32 = torch.empty(n, groups, device=device)
    zeros = torch.empty(n, groups, device=device)
    static_groups = static_groups or act_order or clip
    if clip:  # the clipped grid of each group, its error weighted by how much each input is used
        g = quantize_clipped(W, bits, group_size, symmetric, importance=torch.diag(h.to(torch.float32)))
        scales16, s32, zeros = g.scales, g.scales.to(torch.float32), g.zeros.to(torch.float32)
    elif static_groups:  # every grid from the original weights, before any update
        padded = _grouped(W, group_size)[1]
        scales16, s32, zeros = grid(padded.amin(-1), padded.amax(-1), bits, symmetric)
    else:
        block = group_size * max(1, block // group_size)  # a group's first column opens its block
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k, device=device)
    W, H = W[:, perm], H[perm][:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    columns = perm.tolist()  # once, on the host: an item read per column would wait for the GPU each time

    codes = torch.empty(n, k, dtype=torch.uint8, device=device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        W1, E1 = W[:, b0:b1].clone(), torch.zeros(n, b1 - b0, device=device)
        for i in range(b1 - b0):
            col = columns[b0 + i]
            g = col // group_size
            if not static_groups and col % group_size == 0:
                span = W1[:, i : min(i + group_size, b1 - b0)]
                scales16[:, g], s32[:, g], zeros[:, g] = grid(span.amin(-1), span.amax(-1), bits, symmetric)
            q = torch.clamp(torch.round(W1[:, i] / s32[:, g]) + zeros[:, g], 0, qmax)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - zeros[:, g]) * s32[:, g]) / U[b0 + i, b0 + i]
            W1[:, i:] -= err[:, None] * U[b0 + i, b0 + i : b1][None, :]
            E1[:, i] = err
        W[:, b1:] -= E1 @ U[b0:b1, b1:]
    return QuantizedTensor(pack(codes, bits), scales16, zeros.to(torch.uint8), bits, group_size, (n, k))


def output_error(w: torch.Tensor, q: QuantizedTensor, h: torch.Tensor) -> float:
    """Σ over rows of (w − dequant(q)) H (w − dequant(q))ᵀ: the squared change of the layer's
    output summed over the tokens that made H."""
    d = (w.float() - q.dequantize()).double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))
