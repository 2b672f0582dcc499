"""Triton kernels: the routed-expert MLP of one MoE layer, every expert at its own bit-width.

Two launches per layer, each over all experts whatever their widths:

    expert_up_kernel    h[p]   = act(x[t] Gₑᵀ) ⊙ (x[t] Uₑᵀ)      (or act(x[t] Wₑᵀ) for a plain MLP)
    expert_down_kernel  out[p] = w[p] · (h[p] Dₑᵀ)

for every (token, slot) pair p = t·TOP_K + slot routed to expert e.  The pairs arrive sorted by
expert and padded to BLOCK_M per expert (``moe_align`` in fused_moe.py), so each M-block of
pairs belongs to one expert: a program looks its expert up in ``block_expert``, reads that
expert's width and offsets from the bank tables, and dequantizes its tile in registers.

Bank tables (one bank per matrix role; see ExpertBank in fused_moe.py):

    word_offset[e]   int64  where expert e's [N, words_e] int32 block starts in the packed buffer
    group_offset[e]  int64  where its [N, G] scales / zeros start (G = ceil(K / GROUP_SIZE))
    bits[e]          int32  its width; words_e = ceil(K / (32 // bits[e]))

Widths are runtime values, not constexpr: one compiled kernel serves every mix, and the
per-width index arithmetic (word of column k, shift) is a vector over the BLOCK_K columns of a
step, computed once and broadcast across BLOCK_N rows.

Decorated by triton_mode.jit: compiled on a CUDA device, interpreted elsewhere (fused_moe.py launches
them in the same mode).
"""

import triton.language as tl

from .triton_mode import jit

# compiled Triton reads a global only if it is a tl.constexpr object (the interpreter reads anything)
ACT_SILU = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACTIVATIONS = {"silu": 0, "relu": 1}  # the ACT constexpr of each name in bank.FUSED_ACTIVATIONS


@jit
def _dequant_tile(q_ptr, s_ptr, z_ptr, word_off, group_off, bits, offs_k, offs_n, mask_k, mask_n, K,
                  GROUP_SIZE: tl.constexpr):
    """W tile [BLOCK_N, BLOCK_K] of one expert, dequantized in fp32: (code - zero) * scale.

    K is the tile's last (fastest) axis, as in memory: neighbouring lanes read the same or the
    next word of one row, not words a row apart."""
    vpw = 32 // bits
    row_words = (K + vpw - 1) // vpw
    groups = (K + GROUP_SIZE - 1) // GROUP_SIZE
    m = mask_n[:, None] & mask_k[None, :]
    # every code of a word loads the same word; the repeats hit cache and keep any width legal
    words = tl.load(q_ptr + word_off + offs_n[:, None] * row_words + (offs_k // vpw)[None, :], mask=m, other=0)
    # >> on int32 is arithmetic (bit 31 may be set), so the mask follows the shift
    codes = (words >> ((offs_k % vpw) * bits)[None, :]) & ((1 << bits) - 1)
    g = group_off + offs_n[:, None] * groups + (offs_k // GROUP_SIZE)[None, :]
    scale = tl.load(s_ptr + g, mask=m, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + g, mask=m, other=0).to(tl.float32)
    return (codes.to(tl.float32) - zero) * scale  # masked lanes: (0 - 0) * 0


@jit
def _accumulate(acc, a, w, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc[BM, BN] += a[BM, BK] @ w[BN, BK]ᵀ: tensor cores from 16 rows up, otherwise a GEMV-style
    broadcast-and-reduce that wastes nothing on a handful of rows."""
    if USE_DOT:
        acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision=INPUT_PRECISION)
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc


@jit
def _load_rows(ptr, rows, stride, offs_k, mask_m, mask_k):
    """Activation tile [BLOCK_M, BLOCK_K]: columns offs_k of the given rows (masked rows read 0)."""
    return tl.load(ptr + rows[:, None] * stride + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)


@jit
def _block_rows(sorted_ptr, block_expert_ptr, post_pad_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr):
    """(pair ids of this M-block, their mask, its expert); expert -1 means nothing to do."""
    post_pad = tl.load(post_pad_ptr)
    # the grid is sized for the worst case (no host sync for the real count): blocks past it idle
    expert = tl.where(pid_m * BLOCK_M < post_pad, tl.load(block_expert_ptr + pid_m), -1)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + offs)
    # int64: pair x row-stride passes 2^31 on long prefills (DeepSeek-V3's out: from ~37k tokens)
    return pairs.to(tl.int64), pairs < num_pairs, expert


@jit
def expert_up_kernel(
    x_ptr, h_ptr,                                # x [T, K] tokens; h [P, N] one row per pair
    sorted_ptr, block_expert_ptr, post_pad_ptr,  # from moe_align
    gq_ptr, gs_ptr, gz_ptr, g_word_ptr, g_group_ptr, g_bits_ptr,  # gate (or the plain MLP's W) bank
    uq_ptr, us_ptr, uz_ptr, u_word_ptr, u_group_ptr, u_bits_ptr,  # up bank (unused unless GATED)
    num_pairs, N, K,
    stride_xm, stride_hm,
    TOP_K: tl.constexpr, GROUP_SIZE: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pairs, mask_m, expert = _block_rows(sorted_ptr, block_expert_ptr, post_pad_ptr, pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    tokens = pairs // TOP_K  # every slot of a token reads the same x row
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    g_word, g_group, g_bits = tl.load(g_word_ptr + expert), tl.load(g_group_ptr + expert), tl.load(g_bits_ptr + expert)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        u_word, u_group, u_bits = tl.load(u_word_ptr + expert), tl.load(u_group_ptr + expert), tl.load(u_bits_ptr + expert)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = _load_rows(x_ptr, tokens, stride_xm, offs_k, mask_m, mask_k)
        w = _dequant_tile(gq_ptr, gs_ptr, gz_ptr, g_word, g_group, g_bits, offs_k, offs_n, mask_k, mask_n, K, GROUP_SIZE)
        acc_g = _accumulate(acc_g, a, w, USE_DOT, INPUT_PRECISION)
        if GATED:
            w = _dequant_tile(uq_ptr, us_ptr, uz_ptr, u_word, u_group, u_bits, offs_k, offs_n, mask_k, mask_n, K,
                              GROUP_SIZE)
            acc_u = _accumulate(acc_u, a, w, USE_DOT, INPUT_PRECISION)
    if ACT == ACT_SILU:
        h = acc_g * tl.sigmoid(acc_g)
    else:
        h = tl.maximum(acc_g, 0.0)
    if GATED:
        h = h * acc_u
    tl.store(h_ptr + pairs[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@jit
def expert_down_kernel(
    h_ptr, out_ptr,                              # h [P, K] from expert_up_kernel; out [P, N] fp32, zeroed
    sorted_ptr, block_expert_ptr, post_pad_ptr,
    q_ptr, s_ptr, z_ptr, word_ptr, group_ptr, bits_ptr,  # down bank
    weights_ptr,                                 # routing weight of each pair [P]
    num_pairs, N, K,
    stride_hm, stride_om,
    GROUP_SIZE: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    pairs, mask_m, expert = _block_rows(sorted_ptr, block_expert_ptr, post_pad_ptr, pid_m, num_pairs, BLOCK_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    word, group, bits = tl.load(word_ptr + expert), tl.load(group_ptr + expert), tl.load(bits_ptr + expert)
    # split-K: program pid_k takes every SPLIT_K-th K block (few pairs leave too few programs otherwise)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = _load_rows(h_ptr, pairs, stride_hm, offs_k, mask_m, mask_k)
        w = _dequant_tile(q_ptr, s_ptr, z_ptr, word, group, bits, offs_k, offs_n, mask_k, mask_n, K, GROUP_SIZE)
        acc = _accumulate(acc, a, w, USE_DOT, INPUT_PRECISION)
    acc = acc * tl.load(weights_ptr + pairs, mask=mask_m, other=0.0).to(tl.float32)[:, None]
    ptrs = out_ptr + pairs[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)
