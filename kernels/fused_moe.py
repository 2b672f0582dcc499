"""The routed-expert MLP of one MoE layer in two Triton launches, every expert at its own width.

    out = fused_moe(x, top_k_index, top_k_weights, gate, up, down, "silu")

computes, for every token t and each of its k routed experts e with routing weight w,

    out[t] = Σ  w · (act(x[t] Gₑᵀ) ⊙ (x[t] Uₑᵀ)) Dₑᵀ       (up=None: w · act(x[t] Gₑᵀ) Dₑᵀ)

where Gₑ, Uₑ, Dₑ are expert e's packed matrices, held for all experts of the layer in one
`ExpertBank` per role. The path:

1. `moe_align`: the (token, slot) pairs are sorted by expert and each expert's run padded to
   BLOCK_M (the `moe_align_block_size` pattern of vLLM and SGLang), so every M-block of pairs
   has one expert. Pairs routed to an out-of-range expert (dropped slots) go nowhere.
2. `expert_up_kernel`, one launch over all experts: gate and up tiles dequantized in registers,
   the activation fused, h written per pair.
3. `expert_down_kernel`, one launch: h Dₑᵀ times the routing weight, written per pair (split-K
   adds partial sums atomically), then the k slots of each token are summed: the scatter back.

Few pairs per expert (decode) take a GEMV-style path (BLOCK_M of 1-8 rows, broadcast-and-reduce,
split-K on the down projection); more take `tl.dot` tiles (prefill). The GPU block sizes are
reasoned, not tuned: no GPU was available to tune them.

`fused_moe_reference` is the same forward in pure torch (per expert: dequantize by the format's
definition, then matmul, in float64): what the kernel is tested and validated against.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from .bank import FUSED_ACTIVATIONS, ExpertBank
from .dequant_matmul import interpreted
from .fused_moe_triton import ACTIVATIONS, expert_down_kernel, expert_up_kernel
from .triton_mode import launching

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- routing: sort the pairs by expert ------------------------------------------------------------

@dataclass(frozen=True)
class Aligned:
    """Pairs p = token·k + slot sorted by expert, each expert's run padded to `block_m`.

        sorted_pairs  int32 [blocks·block_m + 1]  pair ids; padding holds P (= no pair)
        block_expert  int32 [blocks]              the expert of each M-block, -1 past the end
        post_pad      int32 [1]                   how many entries of sorted_pairs are in use
    """

    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    post_pad: torch.Tensor
    blocks: int
    block_m: int


def moe_align(top_k_index: torch.Tensor, num_experts: int, block_m: int, *, exact: bool) -> Aligned:
    """Sort the routed pairs by expert and pad each expert's run to `block_m`, on the device.

    With exact=False no value is read back to the host (no sync): the grid is sized for the worst
    case, P + min(E, P)·(block_m - 1) entries, and blocks past the real end idle."""
    flat = top_k_index.reshape(-1).to(torch.int64)
    pairs, device = flat.numel(), flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # dropped slots sort last, into bucket E
    # scatter_add, not bincount: bincount on CUDA reads its maximum back to size the output (a sync)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    end_pad = padded.cumsum(0)
    start_pad = end_pad - padded
    start = counts.cumsum(0) - counts
    if exact:
        blocks = int(end_pad[-1]) // block_m
    else:
        blocks = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m)
    size = blocks * block_m
    order = torch.argsort(key, stable=True)
    e_sorted = key[order]
    rank = torch.arange(pairs, device=device) - start[e_sorted]
    trash = size  # one slot past the grid: where dropped pairs are written and never read
    dest = torch.where(e_sorted < num_experts, start_pad[e_sorted.clamp(max=num_experts - 1)] + rank, trash)
    sorted_pairs = torch.full((size + 1,), pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(blocks, device=device) * block_m
    block_expert = torch.searchsorted(end_pad, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return Aligned(sorted_pairs, block_expert, end_pad[-1:].to(torch.int32), blocks, block_m)


# ---- launch configuration --------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """Tile sizes of one call: BLOCK_M is shared by both launches (it is the alignment)."""

    block_m: int
    up_blocks: tuple[int, int]    # (BLOCK_N, BLOCK_K) of the gate/up launch
    down_blocks: tuple[int, int]  # (BLOCK_N, BLOCK_K) of the down launch
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16  # tl.dot's minimum; below it the GEMV-style path


@functools.lru_cache
def _sm_count(index: int | None = None) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).multi_processor_count


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, math.ceil(math.log2(max(v, 1))))))


# GPU launches by BLOCK_M (split-K is set per call). Chosen offline, without a GPU: the largest
# tiles that compile for sm_90 (H100/H200) with no register spills in bf16, as measured by
# benchmarks/compile_fused_moe.py (ptxas -v); the 4-warp versions of the bigger tiles spill.
# Not timed: `bench_fused_moe.py --sweep` on a GPU is how these should be tuned.
GPU_LAUNCHES = {
    1: Launch(1, (32, 64), (32, 64), 1, 8, 2),    # decode: GEMV-style rows
    2: Launch(2, (32, 64), (32, 64), 1, 8, 2),
    4: Launch(4, (32, 64), (32, 64), 1, 8, 2),
    8: Launch(8, (32, 32), (32, 32), 1, 4, 2),
    16: Launch(16, (64, 32), (64, 32), 1, 8, 3),  # prefill: tensor-core tiles
    32: Launch(32, (64, 32), (64, 32), 1, 8, 3),
    64: Launch(64, (64, 32), (64, 32), 1, 8, 3),
}


def choose_launch(pairs: int, num_experts: int, shapes: tuple[tuple[int, int], tuple[int, int]],
                  per_expert_max: int | None = None, device_index: int | None = None) -> Launch:
    """Tile sizes for `pairs` routed pairs (on CUDA device `device_index`, default the current one). On a GPU by the expected pairs per active expert
    (decode: GEMV-style rows, split-K on down when the rows leave too few programs; prefill:
    tensor-core tiles); in the interpreter, which pays per program and loop step, the largest
    blocks the shapes allow (`per_expert_max` known exactly there)."""
    (n_up, k_up), (n_down, k_down) = shapes
    if interpreted():
        bm = _pow2(per_expert_max or 1, 1, 64)
        fit = lambda size, cap: _pow2(size, 16, cap)  # noqa: E731
        return Launch(bm, (fit(n_up, 128), fit(k_up, 128)), (fit(n_down, 128), fit(k_down, 128)), 1, 4, 1)
    per_expert = -(-pairs // max(1, min(num_experts, pairs)))
    if per_expert > 8:
        return GPU_LAUNCHES[16 if per_expert <= 32 else 32 if per_expert <= 128 else 64]
    launch = GPU_LAUNCHES[_pow2(per_expert, 1, 8)]
    bn, bk = launch.down_blocks
    programs = max(1, -(-pairs // launch.block_m) * -(-n_down // bn))
    split = min(8, max(1, -(-2 * _sm_count(device_index) // programs)), max(1, k_down // bk))
    return dataclasses.replace(launch, split_k=split)


# ---- the forward -----------------------------------------------------------------------------------

def _check(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate: ExpertBank,
           up: ExpertBank | None, down: ExpertBank, activation: str) -> None:
    if x.dim() != 2 or x.dtype not in X_DTYPES:
        raise ValueError(f"x must be a 2-D [T, H] tensor of {X_DTYPES}, got {x.dtype} {tuple(x.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"top_k_index {tuple(top_k_index.shape)} and top_k_weights {tuple(top_k_weights.shape)} "
                         f"must both be [T, k] with T = {x.shape[0]} tokens")
    if activation not in ACTIVATIONS:
        raise ValueError(f"the fused kernel has activations {sorted(ACTIVATIONS)}, got {activation!r}")
    f, h = gate.shape
    banks = [("gate", gate), ("down", down)] + ([("up", up)] if up is not None else [])
    if h != x.shape[1] or down.shape[1] != f or (up is not None and up.shape != gate.shape):
        raise ValueError(f"x [T, {x.shape[1]}], gate {gate.shape}, up {up.shape if up else None}, down {down.shape} "
                         "do not form an [F, H] (gate, up), [H', F] (down) expert MLP over x")
    if len({b.num_experts for _, b in banks}) != 1 or len({b.group_size for _, b in banks}) != 1:
        raise ValueError("gate, up and down must hold the same experts with one group size")
    # gate and up read one rotated x, so they must share its signs; compared by value only off the GPU
    # (on it a comparison would wait for the device every call; PackedExperts compares once, at load)
    if up is not None and ((gate.signs is None) != (up.signs is None) or (
            gate.signs is not None and gate.signs is not up.signs and
            (gate.signs.shape != up.signs.shape or (not x.is_cuda and not torch.equal(gate.signs, up.signs))))):
        raise ValueError("gate and up read the same input and must share its rotation")
    want = dict(packed=torch.int32, scales=torch.float16, zeros=torch.uint8, word_offset=torch.int64,
                group_offset=torch.int64, bits_table=torch.int32, signs=torch.int8)
    for role, b in banks:
        wrong = {f: t.dtype for f, t in b.tensors().items() if t.dtype != want[f]}
        if wrong:
            raise ValueError(f"the {role} bank has {wrong}; the format needs {({f: want[f] for f in wrong})}")
    devices = {x.device, top_k_index.device, top_k_weights.device} | {t.device for _, b in banks for t in b.tensors().values()}
    if len(devices) != 1:
        raise ValueError(f"x, the routing and the banks must be on one device, got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(f"compiled Triton needs CUDA tensors, got x on {x.device}")


def _bank_args(b: ExpertBank) -> tuple:
    return b.packed, b.scales, b.zeros, b.word_offset, b.group_offset, b.bits_table


def fused_moe(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate: ExpertBank,
              up: ExpertBank | None, down: ExpertBank, activation: str = "silu", *,
              launch: Launch | None = None, input_precision: str = "ieee", sync_free: bool | None = None) -> torch.Tensor:
    """The routed-expert MLP of one layer for x [T, H], routed by top_k_index / top_k_weights [T, k]:
    [T, H'] (H' = down's rows, H but for a sliced check) in x's dtype. Slots whose index is outside [0, E) contribute nothing (dropped tokens).
    `launch` overrides the tile sizes; `input_precision` 'tf32' trades fp32 exactness for speed.
    `sync_free` sizes the grid for the worst case instead of reading the padded count back (the
    default on CUDA; the interpreter, which pays per idle program, reads it)."""
    _check(x, top_k_index, top_k_weights, gate, up, down, activation)
    tokens, top_k = top_k_index.shape
    pairs, (f, hidden), n_out = tokens * top_k, gate.shape, down.shape[0]  # n_out = H but for a sliced check
    out_dtype = x.dtype
    if interpreted() and x.dtype == torch.bfloat16:
        x = x.float()  # the interpreter multiplies bf16 bit patterns
    if pairs == 0:
        return torch.zeros((tokens, n_out), dtype=out_dtype, device=x.device)
    x = gate.rotate_input(x).contiguous()  # a rotated layer: x R once for every expert (hadamard.py)
    weights = top_k_weights.reshape(-1).contiguous()
    if launch is None:
        per_expert = None
        if interpreted():
            valid = top_k_index[(top_k_index >= 0) & (top_k_index < gate.num_experts)]
            per_expert = int(torch.bincount(valid.reshape(-1)).max()) if valid.numel() else 1
        launch = choose_launch(pairs, gate.num_experts, ((f, hidden), (n_out, f)), per_expert, x.device.index)
    aligned = moe_align(top_k_index, gate.num_experts, launch.block_m,
                        exact=interpreted() if sync_free is None else not sync_free)
    precision = input_precision if x.dtype == torch.float32 else None
    common = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)

    with launching(x.device):  # compiled or interpreted, as the kernels were decorated (triton_mode)
        h = torch.empty((pairs, f), dtype=x.dtype, device=x.device)
        bn, bk = launch.up_blocks
        expert_up_kernel[(aligned.blocks, -(-f // bn))](
            x, h, aligned.sorted_pairs, aligned.block_expert, aligned.post_pad,
            *_bank_args(gate), *_bank_args(up if up is not None else gate),
            pairs, f, hidden, x.stride(0), h.stride(0),
            TOP_K=top_k, GROUP_SIZE=gate.group_size, GATED=up is not None, ACT=ACTIVATIONS[activation],
            USE_DOT=launch.use_dot, BLOCK_M=launch.block_m, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=precision, **common)

        h = down.rotate_input(h)  # the hidden activation into down's basis, between the two launches
        out = torch.zeros((pairs, n_out), dtype=torch.float32, device=x.device)
        bn, bk = launch.down_blocks
        expert_down_kernel[(aligned.blocks, -(-n_out // bn), launch.split_k)](
            h, out, aligned.sorted_pairs, aligned.block_expert, aligned.post_pad, *_bank_args(down), weights,
            pairs, n_out, f, h.stride(0), out.stride(0),
            GROUP_SIZE=down.group_size, USE_DOT=launch.use_dot, SPLIT_K=launch.split_k,
            BLOCK_M=launch.block_m, BLOCK_N=bn, BLOCK_K=bk, INPUT_PRECISION=precision, **common)
    return out.view(tokens, top_k, n_out).sum(dim=1).to(out_dtype)


def fused_moe_reference(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate: ExpertBank,
                        up: ExpertBank | None, down: ExpertBank, activation: str = "silu") -> torch.Tensor:
    """The same forward in pure torch, float64: for each expert with tokens, its matrices
    dequantized by the format's definition, then act(x Gᵀ) ⊙ (x Uᵀ) Dᵀ times the routing weight."""
    act = FUSED_ACTIVATIONS[activation]
    xd = x.double()
    out = torch.zeros((x.shape[0], down.shape[0]), dtype=torch.float64, device=x.device)
    for e in range(gate.num_experts):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        a = xd[token]
        hidden = act(a @ gate.expert(e).dequantize().double().T)
        if up is not None:
            hidden = hidden * (a @ up.expert(e).dequantize().double().T)
        y = (hidden @ down.expert(e).dequantize().double().T) * top_k_weights[token, slot, None].double()
        out.index_add_(0, token, y)
    return out
