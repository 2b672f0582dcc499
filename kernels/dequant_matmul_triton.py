"""Triton kernel: y = x @ W^T with W dequantized on the fly from the packed format.

Decorated by ``triton_mode.jit``: compiled on a CUDA device, interpreted elsewhere; the
launch wrapper in :mod:`expertbits.kernels.dequant_matmul` launches it in the same mode.
"""

import triton.language as tl

from .triton_mode import jit

# Block sizes (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for compiled GPU runs, by the
# largest M they serve.  Fixed rather than autotuned: expert GEMMs at decode time are M <= 64
# and bound by the weight stream, so the N tile matters more than anything else.  Untuned.
GPU_CONFIGS = (
    (16, (16, 64, 128, 4, 3)),
    (64, (64, 64, 64, 4, 3)),
    (None, (64, 128, 32, 4, 3)),
)

# tl.dot wants every block dimension >= 16.
MIN_BLOCK = 16


@jit
def dequant_matmul_kernel(
    # Pointers.  x is [M, K] activations; packed/scales/zeros are the quantized W[N, K]
    # (see packing.py); y is the fp32 [M, N] output.
    x_ptr, packed_ptr, scales_ptr, zeros_ptr, y_ptr,
    # Logical sizes.  Nothing is assumed to be a multiple of a block, a word or a group,
    # so every load and the store are masked against these.
    M, N, K,
    # Strides in elements: how far to move to reach the next row / column.  Passing them
    # lets the wrapper hand over views (e.g. a transposed x) without copying.
    stride_xm, stride_xk,
    stride_pn, stride_pw,  # packed: next output row / next int32 word
    stride_sn, stride_sg,  # scales AND zeros: they always share one [N, G] layout
    stride_ym, stride_yn,
    # Format parameters.  constexpr so that the divisions by VPW and GROUP_SIZE and the
    # shift amounts fold into cheap integer ops specialised per bit width.
    BITS: tl.constexpr,        # bits per code, 1..8
    VPW: tl.constexpr,         # codes per int32 word, 32 // BITS
    GROUP_SIZE: tl.constexpr,  # columns sharing one (scale, zero); any positive integer
    # Tile sizes.  constexpr because tl.arange and tl.dot need compile-time shapes.
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    # "ieee" keeps fp32 products exact enough to validate against torch; "tf32" trades
    # ~1e-3 relative error for tensor-core speed on GPUs.  Ignored by the interpreter.
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    CODE_MASK: tl.constexpr = (1 << BITS) - 1

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K

        # Cast right after the load: bf16/fp16 x then meets an fp32 W in one fp32 dot.
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)

        # W^T tile [BLOCK_K, BLOCK_N].  Each word is loaded once per code it holds; the
        # repeats hit cache, and a gather keeps any VPW / BLOCK_K alignment legal.
        w_mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(packed_ptr + offs_n[None, :] * stride_pn + (offs_k // VPW)[:, None] * stride_pw,
                        mask=w_mask, other=0)
        # >> on int32 is arithmetic (bit 31 may be set), so the mask must follow the shift.
        codes = (words >> ((offs_k % VPW) * BITS)[:, None]) & CODE_MASK

        # Groups need not align with BLOCK_K, so scale/zero are gathered per element.
        group = (offs_k // GROUP_SIZE)[:, None]
        sg_offs = offs_n[None, :] * stride_sn + group * stride_sg
        scale = tl.load(scales_ptr + sg_offs, mask=w_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + sg_offs, mask=w_mask, other=0).to(tl.float32)
        # Masked lanes give (0 - 0) * 0 = 0, so padding adds nothing to acc.
        w = (codes.to(tl.float32) - zero) * scale

        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
