"""The expertbits packed weight format and its pure-torch reference.

A quantized weight W[N, K] (N output features, K input features) is stored as

* ``packed``  int32 [N, W]  W = ceil(K / vpw) words per row, vpw = 32 // bits codes per word
* ``scales``  fp16  [N, G]  G = ceil(K / group_size), one per ``group_size`` consecutive columns
* ``zeros``   uint8 [N, G]  the integer zero point of each group, in [0, 2**bits)

and dequantizes as ``w = (code - zero) * scale`` in fp32, which is exact (a product of an
integer of at most 9 bits and an fp16 value).  Integer zero points make the format the same
arithmetic as compressed-tensors' pack-quantized (``(q - zp) * scale`` with q = code - 2**(bits-1),
zp = zero - 2**(bits-1)), so an export is lossless both ways.  A symmetric tensor has every
zero at 2**(bits-1) (GPTQ's convention), so it exports without zero points.

Codes fill each 32-bit word least-significant first; column j of a row is in word
``j // vpw`` at bit ``(j % vpw) * bits``.  When ``bits`` does not divide 32 the top
``32 - vpw * bits`` bits of every word stay zero, so no code straddles two words.
For 3 bits (vpw = 10)::

    bit  31 30 | 29 28 27 | 26 .. 9 | 8  7  6 | 5  4  3 | 2  1  0
         ------+----------+---------+---------+---------+--------
          0  0 | value 9  | 8 .. 3  | value 2 | value 1 | value 0
        unused

    word 0 holds columns 0-9, word 1 columns 10-19, ...; in the last word of a row the
    slots past column K-1 are zero.

The word is the uint32 bit pattern reinterpreted as int32 (torch has no uint32 arithmetic
worth using), so a word whose bit 31 is set reads as a negative number; only 1, 2, 4 and
8-bit codes reach bit 31.  Kernels must therefore mask after shifting, because ``>>`` on
int32 is arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from . import hadamard
SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
FP16_MAX = 65504.0


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def values_per_word(bits: int) -> int:
    """Codes per int32 word; the remainder bits of a word are left unused."""
    _check_bits(bits)
    return 32 // bits


def packed_width(k: int, bits: int) -> int:
    """Words needed for one row of ``k`` codes."""
    return -(-k // values_per_word(bits))


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(values_per_word(bits), device=device, dtype=torch.int64) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [N, K] (each in [0, 2**bits)) into int32 words [N, packed_width(K, bits)]."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"got range [{int(c.min())}, {int(c.max())}]")
    vpw, width = values_per_word(bits), packed_width(k, bits)
    c = torch.nn.functional.pad(c, (0, width * vpw - k))  # zero padding slots
    # Slots occupy disjoint bit ranges, so the sum is the bitwise OR; int64 holds 32 bits unsigned.
    words = (c.view(n, width, vpw) << _shifts(bits, c.device)).sum(dim=-1)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 pattern as int32
    return words.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Exact inverse of :func:`pack`: int32 words [N, W] -> uint8 codes [N, k]."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(k, bits):
        raise ValueError(f"packed has {packed.shape[1]} words per row; {k} {bits}-bit codes "
                         f"need {packed_width(k, bits)}")
    n, width = packed.shape
    words = packed.to(torch.int64) & 0xFFFFFFFF  # back to the unsigned pattern
    codes = (words.unsqueeze(-1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(n, -1)[:, :k].to(torch.uint8)


def _expand_groups(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[N, G] -> [N, k]: column j takes the value of group j // group_size."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int, group_size: int, k: int) -> torch.Tensor:
    """The reference definition of the format: ``w = (code - zero) * scale`` in fp32, [N, k]."""
    codes = unpack(packed, bits, k).to(torch.float32)
    s = _expand_groups(scales.to(torch.float32), group_size, k)
    z = _expand_groups(zeros.to(torch.float32), group_size, k)
    return (codes - z) * s


@dataclass(frozen=True)
class QuantizedTensor:
    """A packed weight matrix and what is needed to dequantize it.

    With `signs`, the codes are of the rotated matrix W R (hadamard.py: R = diag(signs) ·
    blockdiag(H_b)), and x Wᵀ is computed as (x R)(W R)ᵀ: `dequantize` gives W back (the
    matrix in the model's own basis), `stored` the codes' own matrix W R, as kernels read it.
    """

    packed: torch.Tensor  # int32 [N, packed_width(K, bits)]
    scales: torch.Tensor  # fp16 [N, ceil(K / group_size)]
    zeros: torch.Tensor   # uint8 [N, ceil(K / group_size)]
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the original matrix
    signs: torch.Tensor | None = None  # int8 ±1 [K]: the input rotation's signs, or None (not rotated)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] reconstruction of the matrix, in the model's basis (rotated back; the codes'
        own matrix W R is `stored().dequantize()`)."""
        w = dequantize(self.packed, self.scales, self.zeros, self.bits, self.group_size, self.shape[1])
        return w if self.signs is None else hadamard.unrotate(w, self.signs)

    def stored(self) -> QuantizedTensor:
        """The same codes without the rotation: what a kernel multiplies the rotated input by."""
        return replace(self, signs=None)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x R for this matrix's rotation (x itself when it has none)."""
        return hadamard.rotate_input(x, self.signs)

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 1 << (self.bits - 1)).all())

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed words plus scales plus zero points (and the signs of a rotated matrix)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros, self.signs)
                   if t is not None)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same tensor with its three buffers on ``device``."""
        return QuantizedTensor(self.packed.to(device), self.scales.to(device), self.zeros.to(device),
                               self.bits, self.group_size, self.shape,
                               None if self.signs is None else self.signs.to(device))


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False) -> QuantizedTensor:
    """Group-wise round-to-nearest along K with integer zero points.

    Asymmetric (default): each run of ``group_size`` consecutive columns (the last may be
    shorter) spans ``[min(lo, 0), max(hi, 0)]`` (the range always holds 0, as in GPTQ, so the zero
    point is a code), ``scale = span / (2**bits - 1)`` and ``zero = round(-min / scale)``.
    Symmetric: ``scale = 2 * max|w| / (2**bits - 1)`` and ``zero = 2**(bits - 1)`` (GPTQ's
    convention), so one code above the middle is the top; 1 bit is refused (its two codes are
    -scale and 0, and every weight would round to 0).  The scale is rounded *up* to fp16, so the
    grid still spans the group and no weight is more than half a step from its code.  Codes are
    computed from the stored scale, so dequantization reproduces what was optimised.  An
    all-zero group gets scale 1 and codes at the zero point.
    """
    _check_args(w, bits, group_size, symmetric)
    n, k = w.shape
    if n > ROW_BLOCK:  # rows are independent: blocks keep the fp32 temporaries in cache (~7× faster)
        parts = [_quantize_rows(w[i : i + ROW_BLOCK], bits, group_size, symmetric) for i in range(0, n, ROW_BLOCK)]
        return QuantizedTensor(*(torch.cat([getattr(q, f) for q in parts]) for f in ("packed", "scales", "zeros")),
                               bits, group_size, (n, k))
    return _quantize_rows(w, bits, group_size, symmetric)


ROW_BLOCK = 128


def _check_args(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> None:
    """What every quantizer of the format refuses, with the reason."""
    _check_bits(bits)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if symmetric and bits == 1:
        raise ValueError("symmetric 1-bit quantization rounds every weight to 0; use 1 bit asymmetric")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"w must be a floating-point tensor, got {w.dtype}")
    if w.shape[1] == 0:
        raise ValueError("w has no columns (K = 0)")


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w in fp32 [N, K], its groups [N, ⌈K/G⌉, G]); the partial last group is padded with zeros,
    which the range holds anyway."""
    wf = w.to(torch.float32)
    if not torch.isfinite(wf).all():
        raise ValueError("w contains NaN or Inf; cannot quantize")
    n, k = wf.shape
    groups = -(-k // group_size)
    return wf, torch.nn.functional.pad(wf, (0, groups * group_size - k)).view(n, groups, group_size)


def grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp16 scales, the same in fp32, integer zero points in fp32) of groups whose weights span
    [lo, hi], by quantize_rtn's rules (range widened to hold 0, scale rounded up to fp16)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    qmax = (1 << bits) - 1
    scale = (torch.maximum(-lo, hi) * 2 if symmetric else hi - lo) / qmax
    if scale.numel() and scale.max() > FP16_MAX:
        raise ValueError(f"weight magnitude exceeds fp16 range: scales up to {scale.max().item():.4g}, "
                         f"fp16 stores at most {FP16_MAX}")
    scales = scale.to(torch.float16)
    # round up, not to nearest: a scale rounded down shrinks the grid below the group's span and
    # leaves its extremes up to (2**bits - 1) * 2^-11 steps past the last code
    short = scales.to(torch.float32) < scale
    scales = torch.where(short, torch.nextafter(scales, torch.full_like(scales, math.inf)), scales)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    s32 = scales.to(torch.float32)
    if symmetric:
        zeros = torch.full_like(s32, float(1 << (bits - 1)))
    else:
        zeros = torch.clamp(torch.round(-lo / s32), 0, qmax)
    return scales, s32, zeros


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedTensor:
    n, k = w.shape
    wf, grouped = _grouped(w, group_size)
    scales, s32, zeros = grid(grouped.amin(-1), grouped.amax(-1), bits, symmetric)
    qmax = (1 << bits) - 1

    s = _expand_groups(s32, group_size, k)
    z = _expand_groups(zeros, group_size, k)
    codes = torch.clamp(torch.round(wf / s) + z, 0, qmax).to(torch.uint8)
    return QuantizedTensor(pack(codes, bits), scales, zeros.to(torch.uint8), bits, group_size, (n, k))


def quantize_clipped(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, *, steps: int = 20,
                     max_shrink: float = 0.5, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Round-to-nearest with a clipping search: each group's range [lo, hi] is scaled by
    1 − i·max_shrink/steps for i = 0..steps, and the factor with the least squared rounding error
    of that group (weighted per input column by `importance` [K], e.g. E[x²], if given) is kept.
    i = 0 is plain RTN, so no group ends up worse than quantize_rtn's. Weights outside a shrunk
    range are clamped to its end codes. The result is an ordinary QuantizedTensor."""
    _check_args(w, bits, group_size, symmetric)
    n, k = w.shape
    _, grouped = _grouped(w, group_size)
    groups = grouped.shape[1]
    pad = groups * group_size - k
    imp = torch.ones(k, device=w.device) if importance is None else importance.to(w.device, torch.float32).flatten()
    imp = torch.nn.functional.pad(imp, (0, pad)).view(groups, group_size)  # padding weighs nothing
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    qmax = (1 << bits) - 1
    best = None
    for i in range(steps + 1):
        f = 1.0 - i * max_shrink / steps
        scales, s32, zeros = grid(lo * f, hi * f, bits, symmetric)
        codes = torch.clamp(torch.round(grouped / s32[..., None]) + zeros[..., None], 0, qmax)
        err = (((codes - zeros[..., None]) * s32[..., None] - grouped).square() * imp).sum(-1)  # [N, groups]
        if best is None:
            best = [err, scales, zeros, codes]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scales, best[1])
        best[2] = torch.where(better, zeros, best[2])
        best[3] = torch.where(better[..., None], codes, best[3])
    codes = best[3].reshape(n, groups * group_size)[:, :k].to(torch.uint8)
    return QuantizedTensor(pack(codes, bits), best[1], best[2].to(torch.uint8), bits, group_size, (n, k))


def effective_bits(bits: int, group_size: int, k: int) -> float:
    """Stored bits per weight of one row: packed words (with their slack), an fp16 scale and a
    uint8 zero point per group."""
    return (packed_width(k, bits) * 32 + -(-k // group_size) * 24) / k


# ---- dense packing (compressed-tensors' pack-quantized layout, for exports) -------------------------
#
# Codes are laid end to end as one bit stream per row, code j at bits [j·b, j·b + b), least
# significant first, with no slack: a code may straddle two words.  For 3 bits:
#
#     word 0: bits 0-29 hold codes 0-9, bits 30-31 the low 2 bits of code 10
#     word 1: bit 0 the high bit of code 10, bits 1-30 codes 11-20, bit 31 the low bit of code 21
#     ...     32 codes fill exactly 3 words; a row of K codes takes ceil(K·b / 32) words.
#
# compressed-tensors stores signed values q = code − 2**(b−1) and adds the same offset back
# before packing, so the packed words are these unsigned codes' bits.


def pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> int32 words [N, ceil(K·bits/32)], no slack between codes."""
    _check_bits(bits)
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    start = torch.arange(k, dtype=torch.int64, device=codes.device) * bits
    word, shift = start // 32, start % 32
    width = -(-k * bits // 32)
    out = torch.zeros(n, width + 1, dtype=torch.int64, device=codes.device)  # a spare word for the last straddle
    out.scatter_add_(1, word.expand(n, k), (c << shift) & 0xFFFFFFFF)
    out.scatter_add_(1, (word + 1).expand(n, k), c >> (32 - shift))  # the high part of a straddling code
    out = out[:, :width]
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)


def unpack_dense(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_dense`: int32 words -> uint8 codes [N, k]."""
    _check_bits(bits)
    n = words.shape[0]
    if words.shape[1] != -(-k * bits // 32):
        raise ValueError(f"{words.shape[1]} words per row cannot hold exactly {k} dense {bits}-bit codes")
    w = torch.nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, 1))
    start = torch.arange(k, dtype=torch.int64, device=words.device) * bits
    word, shift = start // 32, start % 32
    lo = w[:, word] >> shift
    hi = w[:, word + 1] << (32 - shift)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)
