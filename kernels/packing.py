"""The expertbits packed weight format and its pure-torch reference.

A quantized weight W[N, K] (N output features, K input features) is stored as

* ``packed``  int32 [N, W]  W = ceil(K / vpw) words per row, vpw = 32 // bits codes per word
* ``scales``  fp16  [N, G]  G = ceil(K / group_size), one per ``group_size`` consecutive columns
* ``offsets`` fp16  [N, G]

and dequantizes as ``w = code * scale + offset`` (scale and offset cast to fp32).

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
from dataclasses import dataclass

import torch

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


def dequantize(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
               bits: int, group_size: int, k: int) -> torch.Tensor:
    """The reference definition of the format: ``w = code * scale + offset`` in fp32, [N, k]."""
    codes = unpack(packed, bits, k).to(torch.float32)
    s = _expand_groups(scales.to(torch.float32), group_size, k)
    o = _expand_groups(offsets.to(torch.float32), group_size, k)
    return codes * s + o


@dataclass(frozen=True)
class QuantizedTensor:
    """A packed weight matrix and what is needed to dequantize it."""

    packed: torch.Tensor   # int32 [N, packed_width(K, bits)]
    scales: torch.Tensor   # fp16 [N, ceil(K / group_size)]
    offsets: torch.Tensor  # fp16 [N, ceil(K / group_size)]
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the original matrix

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K] reconstruction."""
        return dequantize(self.packed, self.scales, self.offsets, self.bits, self.group_size, self.shape[1])

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed words plus scales plus offsets."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.offsets))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same tensor with its three buffers on ``device``."""
        return QuantizedTensor(self.packed.to(device), self.scales.to(device), self.offsets.to(device),
                               self.bits, self.group_size, self.shape)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
    """Group-wise asymmetric min-max round-to-nearest quantization along K.

    Each run of ``group_size`` consecutive columns (the last may be shorter) gets
    ``offset = min`` and ``scale = (max - min) / (2**bits - 1)``, both rounded to fp16.
    Codes are computed from the rounded values, so that dequantization reproduces what
    was optimised rather than what was hoped for.  A group whose fp16 scale is zero
    (constant, or a range below fp16 resolution) gets scale 1 and codes 0.
    """
    _check_bits(bits)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"w must be a floating-point tensor, got {w.dtype}")
    n, k = w.shape
    if k == 0:
        raise ValueError("w has no columns (K = 0)")
    wf = w.to(torch.float32)
    if not torch.isfinite(wf).all():
        raise ValueError("w contains NaN or Inf; cannot quantize")

    groups = -(-k // group_size)
    pad = groups * group_size - k
    # Pad the partial last group with +inf / -inf so that it does not move min / max.
    lo = torch.nn.functional.pad(wf, (0, pad), value=math.inf).view(n, groups, group_size).amin(-1)
    hi = torch.nn.functional.pad(wf, (0, pad), value=-math.inf).view(n, groups, group_size).amax(-1)
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    if n and (lo.abs().max() > FP16_MAX or scale.max() > FP16_MAX):
        raise ValueError(f"weight magnitude exceeds fp16 range: offsets up to {lo.abs().max().item():.4g}, "
                         f"scales up to {scale.max().item():.4g}, fp16 stores at most {FP16_MAX}")
    offsets = lo.to(torch.float16)
    scales = scale.to(torch.float16)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)

    s = _expand_groups(scales.to(torch.float32), group_size, k)
    o = _expand_groups(offsets.to(torch.float32), group_size, k)
    codes = torch.clamp(torch.round((wf - o) / s), 0, qmax).to(torch.uint8)
    return QuantizedTensor(pack(codes, bits), scales, offsets, bits, group_size, (n, k))


def effective_bits(bits: int, group_size: int, k: int) -> float:
    """Stored bits per weight of one row: packed words (with their slack) and 2 fp16 values per group."""
    return (packed_width(k, bits) * 32 + -(-k // group_size) * 32) / k
