"""The packed format (layout, round trip) and round-to-nearest quantization."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from expertbits.kernels.packing import (  # noqa: E402
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    effective_bits,
    pack,
    packed_width,
    quantize_rtn,
    unpack,
    values_per_word,
)

BITS = list(SUPPORTED_BITS)
ROUND_TRIP_K = [1, 7, 10, 33, 100, 257]
# (N, K, group_size): K % group_size != 0 in most, so the partial last group is exercised.
QUANT_SHAPES = [(8, 128, 32), (5, 200, 64), (3, 70, 100), (4, 257, 128)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _group_expand(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    return t.float().repeat_interleave(group_size, dim=1)[:, :k]


# ---------------------------------------------------------------- layout


def test_values_per_word_and_width():
    assert [values_per_word(b) for b in BITS] == [32, 16, 10, 8, 6, 5, 4, 4]
    assert packed_width(1, 3) == 1
    assert packed_width(10, 3) == 1
    assert packed_width(11, 3) == 2
    assert packed_width(4096, 4) == 512
    assert packed_width(14336, 3) == 1434  # 14336 / 10 rounded up


@pytest.mark.parametrize("k", ROUND_TRIP_K, ids=lambda k: f"K{k}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_pack_unpack_round_trip(bits, k):
    codes = torch.randint(0, 1 << bits, (6, k), generator=_gen(bits * 1000 + k), dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (6, packed_width(k, bits))
    out = unpack(packed, bits, k)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes.to(torch.uint8))


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_unused_bits_and_padding_slots_are_zero(bits):
    k = 3 * values_per_word(bits) + 1  # last word holds one code
    codes = torch.full((2, k), (1 << bits) - 1, dtype=torch.uint8)  # all ones: any stray bit would show
    words = pack(codes, bits).to(torch.int64) & 0xFFFFFFFF
    used = values_per_word(bits) * bits
    assert torch.all(words >> used == 0)  # no-op when bits divides 32
    assert torch.all(words[:, -1] == (1 << bits) - 1)  # only slot 0 of the last word is set


def test_layout_3bit_by_hand():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 5]])
    # Word 0 holds values 0..9, value j at bits 3j..3j+2, least significant first, so reading
    # the 3-bit fields from the top down is one octal digit each:
    #   value: 9 8 7 6 5 4 3 2 1 0  -> 0o2107654321 = 287267025; bits 30-31 stay 0.
    # Word 1 holds value 10 (= 5) in bits 0-2 and zero padding slots: 5.
    expected = torch.tensor([[287267025, 5]], dtype=torch.int32)
    assert torch.equal(pack(codes, 3), expected)
    assert torch.equal(unpack(expected, 3, 11), codes.to(torch.uint8))


def test_layout_4bit_sign_bit_by_hand():
    codes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 15, 9]])
    # Word 0, one hex digit per value from the top down: 0xF6543210.  Value 7 (= 15) sets
    # bit 31, so as int32 the word is 0xF6543210 - 2**32 = -162254320.  Word 1: 9.
    expected = torch.tensor([[-162254320, 9]], dtype=torch.int32)
    assert torch.equal(pack(codes, 4), expected)
    assert torch.equal(unpack(expected, 4, 9), codes.to(torch.uint8))


# Hand-worked words for the widths the two tests above do not cover; codes fill each word from bit 0.
HAND_LAYOUTS = [
    # 1 bit, 32 per word: codes 0, 2, 3 and 31 set -> 0b1101 + 2^31, read as int32; word 1 holds code 32
    (1, [1, 0, 1, 1] + [0] * 27 + [1, 1], [13 - 2**31, 1]),
    (2, [3, 0, 1, 2], [3 + (1 << 4) + (2 << 6)]),                           # 147
    (5, [31, 1, 0, 0, 0, 2, 7], [31 + (1 << 5) + (2 << 25), 7]),            # 6 per word, bits 30-31 unused
    (6, [63, 0, 0, 0, 1, 5], [63 + (1 << 24), 5]),                          # 5 per word
    (7, [127, 1, 0, 2], [127 + (1 << 7) + (2 << 21)]),                      # 4 per word, bits 28-31 unused
    (8, [0x10, 0x20, 0x30, 0xFF], [0xFF302010 - 2**32]),                    # top byte sets the sign bit
]


@pytest.mark.parametrize("bits,codes,words", HAND_LAYOUTS, ids=[f"{b}bit" for b, _, _ in HAND_LAYOUTS])
def test_layout_by_hand_at_every_other_width(bits, codes, words):
    expected = torch.tensor([words], dtype=torch.int32)
    assert torch.equal(pack(torch.tensor([codes]), bits), expected)
    assert torch.equal(unpack(expected, bits, len(codes)), torch.tensor([codes], dtype=torch.uint8))


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match="must lie in"):
        pack(torch.tensor([[0, 8]]), 3)
    with pytest.raises(ValueError, match="must lie in"):
        pack(torch.tensor([[-1, 0]]), 3)
    with pytest.raises(ValueError, match="integer dtype"):
        pack(torch.zeros(2, 2), 3)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.zeros(4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(2, 2, dtype=torch.int32), 9)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match="need 2"):
        unpack(torch.zeros(1, 3, dtype=torch.int32), 3, 11)


# ---------------------------------------------------------------- quantize_rtn


@pytest.mark.parametrize("n,k,group_size", QUANT_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_quantize_error_within_half_step(bits, n, k, group_size):
    w = torch.randn(n, k, generator=_gen(bits + k))
    q = quantize_rtn(w, bits, group_size)
    groups = -(-k // group_size)
    assert q.packed.shape == (n, packed_width(k, bits)) and q.packed.dtype == torch.int32
    assert q.scales.shape == q.zeros.shape == (n, groups)
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.uint8
    assert q.shape == (n, k) and q.bits == bits and q.group_size == group_size
    codes = unpack(q.packed, bits, k)
    assert int(codes.max()) <= (1 << bits) - 1
    assert _within_a_half_step(q, w)


def _within_a_half_step(q, w) -> bool:
    """Round to nearest leaves at most half a step (the fp16 scale is rounded up, so the grid spans
    each group); the slack is fp32 rounding."""
    s = _group_expand(q.scales, q.group_size, w.shape[1])
    return bool(torch.all((q.dequantize() - w.float()).abs() <= s * (0.5 + 1e-5) + w.float().abs() * 1e-6 + 1e-7))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_half_a_step_holds_on_large_matrices(bits, symmetric):
    """Many groups meet the worst fp16 rounding of the scale; rounding it up keeps every one inside."""
    w = torch.randn(512, 2048, generator=_gen(bits)) * 0.02
    assert _within_a_half_step(quantize_rtn(w, bits, 64, symmetric), w)


@pytest.mark.parametrize("bits", [b for b in BITS if b > 1], ids=lambda b: f"{b}bit")
def test_symmetric_has_every_zero_at_the_middle_and_stays_within_half_a_step(bits):
    w = torch.randn(6, 96, generator=_gen(bits))
    q = quantize_rtn(w, bits, 32, symmetric=True)
    assert q.symmetric and torch.all(q.zeros == 1 << (bits - 1))
    assert not quantize_rtn(w, bits, 32).symmetric
    assert _within_a_half_step(q, w)


def test_symmetric_1bit_is_refused():
    with pytest.raises(ValueError, match="symmetric 1-bit"):
        quantize_rtn(torch.randn(2, 8), 1, 4, symmetric=True)


def test_rtn_by_hand():
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    # asymmetric 2-bit: range [-1, 2], scale 3/3 = 1, zero round(1/1) = 1, codes round(w) + 1
    # = [0, 1, 1 (0.5 rounds half to even, to 0), 3] -> (code - 1) * 1 = [-1, 0, 0, 2]
    q = quantize_rtn(w, 2, 4)
    assert q.scales.item() == 1.0 and q.zeros.item() == 1
    assert unpack(q.packed, 2, 4).tolist() == [[0, 1, 1, 3]]
    assert q.dequantize().tolist() == [[-1.0, 0.0, 0.0, 2.0]]
    # symmetric 2-bit: scale 2·2/3 = 1.3333…, rounded up to fp16 1.333984375, zero 2; w/scale =
    # [-0.7496, 0, 0.3748, 1.4993] rounds to [-1, 0, 0, 1], + 2 = [1, 2, 2, 3]
    q = quantize_rtn(w, 2, 4, symmetric=True)
    s = 1.333984375
    assert q.scales.item() == s and q.zeros.item() == 2
    assert unpack(q.packed, 2, 4).tolist() == [[1, 2, 2, 3]]
    assert q.dequantize().tolist() == [[-s, 0.0, 0.0, s]]


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_is_always_exact(symmetric):
    # the range always holds 0 and the zero point is a code, so exact zeros (pruned weights,
    # padding) come back exactly, in mixed groups and in all-zero groups (scale 1)
    w = torch.randn(5, 40, generator=_gen(4))
    w[:, ::3] = 0.0
    w[2, 8:16] = 0.0
    for bits in BITS[1:] if symmetric else BITS:
        q = quantize_rtn(w, bits, 8, symmetric=symmetric)
        assert torch.all(q.dequantize()[w == 0] == 0)
        assert q.scales[2, 1] == 1
    assert torch.equal(quantize_rtn(torch.zeros(3, 9), 2, 4).dequantize(), torch.zeros(3, 9))


def test_quantize_error_shrinks_with_bits():
    w = torch.randn(64, 512, generator=_gen(7))
    errors = [(quantize_rtn(w, b, 128).dequantize() - w).abs().mean().item() for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]


def test_quantize_partial_last_group():
    gen = _gen(3)
    w = torch.rand(4, 70, generator=gen) * 2 - 1  # [-1, 1)
    w[:, 64:] = 10 + torch.rand(4, 6, generator=gen)  # last group: 6 columns in [10, 11)
    q = quantize_rtn(w, 4, 32)
    assert q.scales.shape == (4, 3)
    # The range comes from the 6 real columns (all positive, so it starts at 0), not from padding.
    hi = w[:, 64:].amax(1)
    assert torch.equal(q.zeros[:, 2], torch.zeros(4, dtype=torch.uint8))
    # hi / 15 rounded up to fp16: the smallest fp16 at or above it
    assert torch.all(q.scales[:, 2].float() >= hi / 15)
    assert torch.all(torch.nextafter(q.scales[:, 2], torch.zeros(4, dtype=torch.float16)).float() < hi / 15)
    assert _within_a_half_step(q, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_quantize_accepts_float_dtypes(dtype):
    w = torch.randn(4, 40, generator=_gen(1)).to(dtype)
    q = quantize_rtn(w, 4, 16)
    assert _within_a_half_step(q, w)


def test_quantize_rejects_bad_input():
    w = torch.randn(4, 8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        w_bad = w.clone()
        w_bad[1, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            quantize_rtn(w_bad, 4, 4)
    for bits in (0, 9, 16):
        with pytest.raises(ValueError, match="bits must be one of"):
            quantize_rtn(w, bits, 4)
    for group_size in (0, -1):
        with pytest.raises(ValueError, match="group_size"):
            quantize_rtn(w, 4, group_size)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(8), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(2, 2, 8), 4, 4)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_rtn(torch.ones(4, 8, dtype=torch.int32), 4, 4)


def test_quantize_rejects_fp16_overflow():
    with pytest.raises(ValueError, match="exceeds fp16 range"):
        quantize_rtn(torch.full((2, 4), 1e6), 4, 4)  # scale 1e6 / 15 overflows
    with pytest.raises(ValueError, match="exceeds fp16 range"):
        quantize_rtn(torch.tensor([[-60000.0, 60000.0]]), 1, 2)  # scale 120000 overflows
    quantize_rtn(torch.tensor([[-60000.0, 60000.0]]), 2, 2)  # scale 40000 fits


# ---------------------------------------------------------------- bookkeeping


def test_dequantize_function_matches_method():
    q = quantize_rtn(torch.randn(3, 50, generator=_gen(2)), 5, 20)
    direct = dequantize(q.packed, q.scales, q.zeros, q.bits, q.group_size, 50)
    assert direct.dtype == torch.float32 and direct.shape == (3, 50)
    assert torch.equal(direct, q.dequantize())


def test_nbytes():
    q = quantize_rtn(torch.randn(4, 256), 3, 128)
    # 26 words * 4 B per row, plus 2 groups * (an fp16 scale + a uint8 zero) per row.
    assert q.nbytes == 4 * (26 * 4 + 2 * (2 + 1))
    assert isinstance(q, QuantizedTensor)


def test_effective_bits():
    # a group costs 24 bits: an fp16 scale and a uint8 zero point
    # 4 bits, K 256: 32 words * 32 + 2 groups * 24 = 1072 bits over 256 weights.
    assert effective_bits(4, 128, 256) == pytest.approx(4.1875)
    # 3 bits, K 640: 64 words * 32 + 10 groups * 24 = 2288 bits over 640 weights.
    assert effective_bits(3, 64, 640) == pytest.approx(3.575)
    # 3 bits waste 2 of 32 bits: 3.2 bits per code before group overhead.
    assert effective_bits(3, 4096, 4096) == pytest.approx((410 * 32 + 24) / 4096)
    # Partial group and partial word: K 100, 8 bits: 25 words, 1 group.
    assert effective_bits(8, 128, 100) == pytest.approx((25 * 32 + 24) / 100)


def test_quantize_rtn_in_row_blocks_equals_row_by_row():
    """Large matrices are quantized in row blocks; every row must come out as if alone."""
    from expertbits.kernels.packing import ROW_BLOCK, quantize_rtn

    w = torch.randn(ROW_BLOCK * 2 + 7, 100, generator=torch.Generator().manual_seed(3))
    whole = quantize_rtn(w, 3, 32)
    for r in (0, ROW_BLOCK - 1, ROW_BLOCK, 2 * ROW_BLOCK + 6):
        one = quantize_rtn(w[r : r + 1], 3, 32)
        assert torch.equal(whole.packed[r], one.packed[0]) and torch.equal(whole.scales[r], one.scales[0])
        assert torch.equal(whole.zeros[r], one.zeros[0])
