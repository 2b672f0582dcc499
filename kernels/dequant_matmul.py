"""Launch wrapper for the dequantize-matmul Triton kernel, and its pure-torch reference.

``dequant_matmul(x, q)`` computes ``x @ W^T`` in fp32 where ``W`` is the packed
:class:`~expertbits.kernels.packing.QuantizedTensor` ``q``, dequantizing inside the kernel.
Without CUDA the kernel runs in the Triton interpreter (slow: keep shapes small).
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from .dequant_matmul_triton import GPU_CONFIGS, MIN_BLOCK, dequant_matmul_kernel
from .packing import QuantizedTensor, values_per_word
from .triton_mode import launching

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PRECISIONS = ("ieee", "tf32")


def interpreted() -> bool:
    """True when the kernel runs in the Triton interpreter (triton_mode decided when it was decorated)."""
    return isinstance(dequant_matmul_kernel, InterpretedFunction)


def _interpreter_blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    # The interpreter costs milliseconds per program and loop step whatever the block
    # size, so take the largest blocks that do not grossly over-cover small shapes.
    def fit(size: int, cap: int) -> int:
        return min(cap, max(MIN_BLOCK, triton.next_power_of_2(size)))
    return fit(m, 64), fit(n, 128), fit(k, 128)


def _gpu_config(m: int) -> tuple[int, int, int, int, int]:
    for max_m, config in GPU_CONFIGS:
        if max_m is None or m <= max_m:
            return config
    raise AssertionError("GPU_CONFIGS must end with a catch-all entry")


def _check(x: torch.Tensor, q: QuantizedTensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    n, k = q.shape
    if x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the quantized weight has shape ({n}, {k}): "
                         f"x.shape[1] must equal K = {k}")
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x must be one of {X_DTYPES}, got {x.dtype}")
    if q.packed.dtype != torch.int32:
        raise ValueError(f"q.packed must be int32, got {q.packed.dtype}")
    groups = -(-k // q.group_size)
    for name, t, dtype in (("scales", q.scales, torch.float16), ("zeros", q.zeros, torch.uint8)):
        if t.dtype != dtype or tuple(t.shape) != (n, groups):
            raise ValueError(f"q.{name} must be {dtype} of shape ({n}, {groups}), got {t.dtype} {tuple(t.shape)}")
    width = -(-k // values_per_word(q.bits))
    if tuple(q.packed.shape) != (n, width):
        raise ValueError(f"q.packed must have shape ({n}, {width}), got {tuple(q.packed.shape)}")
    devices = {t.device for t in (x, q.packed, q.scales, q.zeros)}
    if len(devices) != 1:
        raise ValueError(f"x and q must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"compiled Triton needs CUDA tensors, got x on {x.device}")


def dequant_matmul(x: torch.Tensor, q: QuantizedTensor, *,
                   blocks: tuple[int, int, int] | None = None,
                   input_precision: str = "ieee") -> torch.Tensor:
    """``x[M, K] @ dequantize(q)[N, K]^T`` as fp32 [M, N], dequantizing inside the kernel.

    ``blocks`` overrides (BLOCK_M, BLOCK_N, BLOCK_K), each a power of two >= 16 (tests use it
    to force many K steps).  ``input_precision`` "tf32" is faster on GPUs and less exact.
    A rotated q (packing.QuantizedTensor.signs) is computed as (x R)(W R)ᵀ: x is rotated here,
    and the kernel reads the codes as stored.
    """
    if q.signs is not None:
        x, q = q.rotate_input(x), q.stored()
    _check(x, q)
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    # The scales/zeros share one stride pair in the kernel.
    scales, zeros = q.scales.contiguous(), q.zeros.contiguous()

    num_warps, num_stages = 4, 3
    if interpreted():
        if x.dtype == torch.bfloat16:
            x = x.float()  # the interpreter mishandles bf16 loads
        block_m, block_n, block_k = _interpreter_blocks(m, n, k)
    else:
        block_m, block_n, block_k, num_warps, num_stages = _gpu_config(m)
    if blocks is not None:
        if any(b < MIN_BLOCK or b & (b - 1) for b in blocks):
            raise ValueError(f"blocks must be powers of two >= {MIN_BLOCK}, got {blocks}")
        block_m, block_n, block_k = blocks

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    with launching(x.device):
        dequant_matmul_kernel[grid](
            x, q.packed, scales, zeros, y,
            m, n, k,
            x.stride(0), x.stride(1),
            q.packed.stride(0), q.packed.stride(1),
            scales.stride(0), scales.stride(1),
            y.stride(0), y.stride(1),
            BITS=q.bits, VPW=values_per_word(q.bits), GROUP_SIZE=q.group_size,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            INPUT_PRECISION=input_precision,
            num_warps=num_warps, num_stages=num_stages,
        )
    return y


def dequant_matmul_reference(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """Pure-torch ``x.float() @ q.dequantize().T``, independent of the kernel."""
    return x.float() @ q.dequantize().T
