"""Allocation against hand-computed tables: counts, order, ζ rearrangement, budget errors."""

import pandas as pd
import pytest

from expertbits.tasks.allocation.allocate import allocate, summarize
from expertbits.tasks.allocation.budget import AllocationConfig, maxvar_rearrange, tier_counts
from expertbits.tasks.errors import BudgetError

# (avg_bits, bit_widths, experts) -> experts at the high tier; κ·E rounded half to even
TWO_TIER = [
    (2.0, (2, 3), 8, 8),      # budget on a width: every expert at it
    (2.125, (2, 3), 8, 1),
    (2.0625, (2, 3), 8, 0),   # κ·E = 0.5 -> 0 (half to even)
    (2.1875, (2, 3), 8, 2),   # κ·E = 1.5 -> 2
    (2.25, (2, 3), 8, 2),
    (2.5, (2, 3, 4), 8, 4),
    (2.75, (2, 3, 4), 8, 6),
    (3.0, (2, 4), 8, 4),      # widths 2 and 4 only: half and half
    (2.5, (2, 3), 64, 32),
    (2.875, (2, 3), 64, 56),
    (3.5, (2, 3, 4), 6, 3),
]


@pytest.mark.parametrize("avg,widths,experts,n_high", TWO_TIER, ids=[f"{a}b-{w}-E{e}" for a, w, e, _ in TWO_TIER])
def test_two_tier_counts(avg, widths, experts, n_high):
    cfg = AllocationConfig(avg_bits=avg, bit_widths=widths)
    counts = tier_counts(experts, cfg)
    assert counts[max(counts)] == n_high and sum(counts.values()) == experts


# method.md §3: E = 8, bits {1, 2, 3}, three-tier -> (n 1-bit, n 2-bit, n 3-bit)
THREE_TIER_SPEC = [(1.5, (4, 4, 0)), (1.75, (4, 2, 2)), (2.0, (2, 4, 2)), (2.125, (2, 3, 3)),
                   (2.25, (2, 2, 4)), (2.5, (2, 0, 6)), (2.75, (1, 0, 7))]


@pytest.mark.parametrize("avg,expected", THREE_TIER_SPEC, ids=[f"{a}b" for a, _ in THREE_TIER_SPEC])
def test_three_tier_reproduces_the_spec_table(avg, expected):
    counts = tier_counts(8, AllocationConfig(avg_bits=avg, bit_widths=(1, 2, 3), scheme="three-tier"))
    assert (counts[1], counts[2], counts[3]) == expected


def _three_tier_by_hand(e: int, avg: float, bl: int, bm: int, bh: int) -> tuple[int, int, int]:
    """The region rules in closed form (no loop): c conversions of two b_m experts into one b_h
    and one b_l, c = ⌊n_m/2⌋ at the top region (convert while two remain), ⌊n_m/3⌋ in the middle
    (the remaining n_m − 2c must be at least c), 0 at the bottom."""
    if avg >= bm:
        n_h = round(max(0, min(1, (avg - bm) / (bh - bm))) * e)
        n_l, n_m = 0, e - n_h
    else:
        n_m = round(max(0, min(1, (avg - bl) / (bm - bl))) * e)
        n_l, n_h = e - n_m, 0
    d = bh - bl
    c = n_m // 2 if avg > bh - d / 3 else n_m // 3 if avg >= bh - 2 * d / 3 else 0
    return n_l + c, n_m - 2 * c, n_h + c


@pytest.mark.parametrize("widths", [(1, 2, 3), (2, 3, 4), (2, 4, 6)])
@pytest.mark.parametrize("experts", [4, 7, 8, 16, 60, 64])
def test_three_tier_any_expert_count(widths, experts):
    bl, bm, bh = widths
    for step in range(0, 33):
        avg = bl + (bh - bl) * step / 32
        counts = tier_counts(experts, AllocationConfig(avg_bits=avg, bit_widths=widths, scheme="three-tier"))
        assert (counts[bl], counts[bm], counts[bh]) == _three_tier_by_hand(experts, avg, bl, bm, bh)
        assert sum(counts.values()) == experts
        # conversions keep the baseline's average; only rounding moves it, by under one step per expert
        achieved = sum(b * n for b, n in counts.items()) / experts
        assert abs(achieved - avg) <= (bh - bl) / 2 / experts * 2 + 1e-9


def test_three_tier_needs_three_equally_spaced_widths():
    with pytest.raises(BudgetError, match="equally spaced"):
        AllocationConfig(avg_bits=2.5, bit_widths=(1, 2, 4), scheme="three-tier")
    with pytest.raises(BudgetError, match="equally spaced"):
        AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), scheme="three-tier")


def test_three_tier_allocation_hands_out_bits_in_order():
    # Λ ascending 3, 1, 0, 2, ... (no MaxVar outliers): at 2.25 bits the first 4 get 3 bits, next 2 get 2, last 2 get 1
    lam = [0.3, 0.2, 0.4, 0.1, 0.5, 0.6, 0.7, 0.8]
    stats = _stats({0: [(v, 1.0) for v in lam]})
    alloc = allocate(stats, AllocationConfig(avg_bits=2.25, bit_widths=(1, 2, 3), scheme="three-tier"))
    assert alloc.sort_values("position").bits.tolist() == [3, 3, 3, 3, 2, 2, 1, 1]
    assert alloc.sort_values("position").expert.tolist() == [3, 1, 0, 2, 4, 5, 6, 7]


def test_maxvar_rearrangement_hand_worked():
    # primary order by Λ: 0, 1, 2, 3. Expert 3 is noisy (5.0 > 3·1.0), so it jumps to the top;
    # expert 1 (1.0) would pass expert 2 (3·0.1 < 1.0) but 2 already sits below it: no move.
    order, moved = maxvar_rearrange([0, 1, 2, 3], {0: 1.0, 1: 1.0, 2: 0.1, 3: 5.0}, zeta=3.0)
    assert order == [3, 0, 1, 2]
    assert moved == {3: 0}


def test_maxvar_rearrangement_is_single_pass_on_the_mutated_list():
    # reverse order visits 3, then 2, then 1, 0. Expert 3 (mv 4) passes 0 (mv 1; 3 < 4): [3, 0, 1, 2].
    # Expert 2 (mv 10) then finds 3 (3·4 = 12 >= 10, not passed) and 0 (3 < 10): lands at 1.
    order, moved = maxvar_rearrange([0, 1, 2, 3], {0: 1.0, 1: 2.0, 2: 10.0, 3: 4.0}, zeta=3.0)
    assert order == [3, 2, 0, 1]
    assert moved == {3: 0, 2: 0}


def test_no_rearrangement_when_zeta_is_huge():
    order, moved = maxvar_rearrange([2, 0, 1], {0: 1.0, 1: 50.0, 2: 0.01}, zeta=1e9)
    assert order == [2, 0, 1] and moved == {}


def _stats(layers: dict[int, list[tuple[float, float]]]) -> pd.DataFrame:
    return pd.DataFrame([{"layer": l, "expert": e, "lambda_score": lam, "maxvar": mv, "maxvar_max_norm_row": mv}
                         for l, experts in layers.items() for e, (lam, mv) in enumerate(experts)])


def test_allocation_table_hand_computed():
    # layer 0: Λ ascending is 2, 0, 3, 1; no MaxVar outliers -> top half (2, 0) get 3 bits.
    # layer 1: Λ ascending is 0, 1, 2, 3 but expert 3's MaxVar (9) > 3·(1) -> 3 jumps to the top.
    stats = _stats({0: [(0.2, 1.0), (0.9, 1.0), (-0.1, 1.0), (0.5, 1.0)],
                    1: [(0.1, 1.0), (0.2, 1.0), (0.3, 1.0), (0.4, 9.0)]})
    cfg = AllocationConfig(avg_bits=2.5, bit_widths=(2, 3))
    alloc = allocate(stats, cfg)
    bits = {(r.layer, r.expert): r.bits for r in alloc.itertuples()}
    assert bits == {(0, 0): 3, (0, 1): 2, (0, 2): 3, (0, 3): 2,
                    (1, 0): 3, (1, 1): 2, (1, 2): 2, (1, 3): 3}
    assert alloc.loc[(alloc.layer == 1) & (alloc.expert == 3), "reason"].item() == "lambda rank 3, promoted by maxvar over expert 0"
    s = summarize(alloc, cfg)
    assert s["achieved_avg_bits"] == 2.5 and s["moved_by_maxvar"] == 1 and s["experts_per_bits"] == {2: 4, 3: 4}


def test_ties_break_by_expert_index():
    stats = _stats({0: [(0.5, 1.0)] * 4})
    alloc = allocate(stats, AllocationConfig(avg_bits=2.5, bit_widths=(2, 3)))
    assert alloc.bits.tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize("avg,widths", [(1.5, (2, 3, 4)), (4.5, (2, 3, 4)), (3.0, ()), (2.0, (0, 2))])
def test_impossible_budget_is_a_clear_error(avg, widths):
    with pytest.raises(BudgetError) as e:
        AllocationConfig(avg_bits=avg, bit_widths=widths)
    assert "fix:" in str(e.value)
