"""Allocators by name, each against a hand-computed answer or an independent brute force."""

import itertools

import pandas as pd
import pytest

from expertbits.tasks.allocation.allocate import allocate
from expertbits.tasks.allocation.allocators import ALLOCATORS, NEEDS_CALIBRATION, NEEDS_ERROR, check, solve
from expertbits.tasks.allocation.budget import AllocationConfig, tier_counts
from expertbits.tasks.errors import BudgetError, ExpertbitsError

# one layer, four experts: (Λ, MaxVar, MaxVar of the max-norm row, frequency, routing weight)
EXPERTS = [(0.30, 1.0, 1.0, 0.10, 0.50),
           (0.10, 1.0, 9.0, 0.40, 0.20),
           (0.40, 5.0, 1.0, 0.30, 0.30),
           (0.20, 1.0, 1.0, 0.20, 0.60)]


def _tables():
    stats = pd.DataFrame([{"layer": 0, "expert": e, "lambda_score": lam, "maxvar": mv, "maxvar_max_norm_row": mvn}
                          for e, (lam, mv, mvn, _, _) in enumerate(EXPERTS)])
    calib = pd.DataFrame([{"layer": 0, "expert": e, "frequency": f, "routing_weight": w, "hessian_trace": 1.0, "tokens": 100}
                          for e, (_, _, _, f, w) in enumerate(EXPERTS)])
    # error halves per extra bit; expert e's error scale is 1 + e
    qerr = pd.DataFrame([{"layer": 0, "expert": e, "bits": b, "weight_error": (1 + e) * 2.0 ** -b,
                          "routed_input_error": (4 - e) * 2.0 ** -b, "output_error": (1 + (e % 2)) * 2.0 ** -b}
                         for e in range(4) for b in (2, 3, 4)])
    return stats, calib, qerr


def _bits(name, avg=2.5, widths=(2, 3), **kw):
    stats, calib, qerr = _tables()
    alloc = allocate(stats, AllocationConfig(avg_bits=avg, bit_widths=widths, allocator=name, **kw), calib, qerr)
    return [int(b) for b in alloc.sort_values("expert").bits]


# at 2.5 bits over {2, 3}, two of four experts get 3 bits
RANKED = {
    "paper": [0, 1, 1, 0],           # Λ ascending 1, 3, 0, 2; expert 2 (MaxVar 5 > 3·1) jumps to the top
    "lambda": [0, 1, 0, 1],          # Λ ascending 1, 3, 0, 2
    "reverse-lambda": [1, 0, 1, 0],  # Λ descending 2, 0, 3, 1
    "maxvar": [1, 0, 1, 0],          # MaxVar descending 2, then 0 (ties by index)
    "frequency": [0, 1, 1, 0],       # 1 (0.4), 2 (0.3)
    "routing-weight": [1, 0, 0, 1],  # 3 (0.6), 0 (0.5)
}


@pytest.mark.parametrize("name", RANKED)
def test_ranking_allocators_hand_computed(name):
    assert _bits(name) == [2 + x for x in RANKED[name]]


def test_paper_with_the_reference_codes_maxvar():
    # max-norm-row variant: expert 1 is the noisy one and it already ranks first by Λ; no move
    assert _bits("paper", maxvar_definition="max-norm-row") == [2, 3, 2, 3]


def test_uniform_needs_a_width_as_budget():
    assert _bits("uniform", avg=3.0, widths=(2, 3, 4)) == [3, 3, 3, 3]
    with pytest.raises(BudgetError, match="uniform"):
        _bits("uniform", avg=2.5)


def test_random_is_seeded_and_spends_the_budget():
    draws = {tuple(_bits("random", seed=s)) for s in range(12)}
    assert _bits("random", seed=3) == _bits("random", seed=3)
    assert len(draws) > 1 and all(sum(d) == 10 for d in draws)


def _brute_force(costs, experts, widths, total):
    best = None
    for combo in itertools.product(widths, repeat=len(experts)):
        if sum(combo) == total:
            c = sum(costs[e, b] for e, b in zip(experts, combo))
            best = min(best or (c, combo), (c, combo))
    return dict(zip(experts, best[1]))


@pytest.mark.parametrize("seed", range(5))
def test_milp_matches_brute_force(seed):
    import random

    rng = random.Random(seed)
    experts, widths = list(range(6)), [1, 2, 3, 4]
    costs = {(e, b): rng.random() * 4.0 ** -b for e in experts for b in widths}
    total = rng.randint(6 * 1 + 1, 6 * 4 - 1)
    got = solve(costs, experts, widths, total)
    want = _brute_force(costs, experts, widths, total)
    assert sum(got.values()) == total
    assert sum(costs[e, got[e]] for e in experts) == pytest.approx(sum(costs[e, want[e]] for e in experts))


def test_solver_allocators_hand_computed():
    # weight-error: costs (1+e)·2^-b, 10 bits over widths {2,3}: the two largest-error experts (3, 2) get 3 bits
    assert _bits("weight-error") == [2, 2, 3, 3]
    # routed-error: f_e·(4-e)·2^-b -> importance 0.4, 1.2, 0.6, 0.2: experts 1 and 2
    assert _bits("routed-error") == [2, 3, 3, 2]
    # pmq: f·w·(1+e)·2^-b -> 0.05, 0.16, 0.27, 0.48: experts 3 and 2
    assert _bits("pmq") == [2, 2, 3, 3]
    # output-error: f_e·(1 + e mod 2)·2^-b -> importance 0.1, 0.8, 0.3, 0.4: experts 1 and 3
    assert _bits("output-error") == [2, 3, 2, 3]


def test_output_error_needs_gptqs_measurement():
    """RTN's per-layer errors have no output_error column (NULL in the table): a clear error, and
    the parameters refuse the combination before any work."""
    from pydantic import ValidationError

    from expertbits.flows.params import QuantizeParams

    stats, calib, qerr = _tables()
    with pytest.raises(ExpertbitsError, match="only GPTQ's calibration pass") as e:
        allocate(stats, AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator="output-error"), calib,
                 qerr.drop(columns="output_error"))
    assert "--quantizer gptq" in e.value.fix
    with pytest.raises(ValidationError, match="give --quantizer gptq"):
        QuantizeParams(allocator="output-error", quantizer="rtn")


def test_solver_may_use_every_width_at_the_same_total():
    # weight-error (1+e)·2^-b at 12 bits: from all-3, moving u up and d down gains (1+u)/16 − (1+d)/8,
    # positive only for d = 0 and u ∈ {2, 3}, best u = 3; no second pair gains: [2, 3, 3, 4]
    stats, calib, qerr = _tables()
    cfg = AllocationConfig(avg_bits=3.0, bit_widths=(2, 3, 4), allocator="weight-error")
    assert _bits("weight-error", avg=3.0, widths=(2, 3, 4)) == [2, 3, 3, 4]
    assert sum(b * n for b, n in tier_counts(4, cfg).items()) == 12


@pytest.mark.parametrize("name", sorted(NEEDS_CALIBRATION | NEEDS_ERROR))
def test_missing_calibration_is_a_clear_error(name):
    stats, _, _ = _tables()
    with pytest.raises(ExpertbitsError) as e:
        allocate(stats, AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator=name))
    assert "fix:" in str(e.value)


def test_every_allocator_is_covered():
    covered = set(RANKED) | {"uniform", "random", "pmq", "weight-error", "routed-error", "output-error"}
    assert covered == set(ALLOCATORS)


def test_unknown_allocator_is_refused_up_front():
    with pytest.raises(BudgetError, match="unknown allocator"):
        check(AllocationConfig(avg_bits=2.5, allocator="magic"))


def test_non_finite_costs_are_a_clear_error():
    with pytest.raises(ExpertbitsError, match="non-finite"):
        solve({(0, 2): float("nan"), (0, 3): 1.0, (1, 2): 1.0, (1, 3): 0.5}, [0, 1], [2, 3], 5)


def test_layer_granularity_gives_each_layer_one_width_where_it_pays():
    # two layers of four experts, weight-error; layer 1's errors are ten times layer 0's. At 2.5
    # bits over {2, 3} the two layers' widths must sum to 5: one layer at 3 bits, and it is layer 1
    # (cost 10·Σ(1+e)·(1/4 − 1/8) saved there against Σ(1+e)/8 in layer 0)
    stats, calib, qerr = _tables()
    stats = pd.concat([stats, stats.assign(layer=1)])
    qerr = pd.concat([qerr, qerr.assign(layer=1, weight_error=qerr.weight_error * 10)])
    cfg = AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator="weight-error", granularity="layer")
    alloc = allocate(stats, cfg, None, qerr)
    assert alloc.groupby("layer").bits.unique().map(list).to_dict() == {0: [2], 1: [3]}
    assert alloc.bits.mean() == 2.5
    flipped = allocate(stats, cfg, None, qerr.assign(weight_error=lambda d: d.weight_error.where(d.layer == 0, d.weight_error / 100)))
    assert flipped.groupby("layer").bits.unique().map(list).to_dict() == {0: [3], 1: [2]}


def test_layer_granularity_refuses_ranking_allocators():
    with pytest.raises(BudgetError, match="cannot choose one width per layer"):
        check(AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator="paper", granularity="layer"))
    check(AllocationConfig(avg_bits=3, bit_widths=(2, 3), allocator="uniform", granularity="layer"))


def test_a_model_wide_budget_is_the_cheapest_assignment_over_every_expert():
    """--budget-scope model against brute force over all 3^8 widths of two layers' eight experts:
    layer 1 loses ten times more per bit, so it takes bits from layer 0 (whose own average drops
    below the budget), and the cost is never above the per-layer allocation's."""
    stats, calib, qerr = _tables()
    stats = pd.concat([stats, stats.assign(layer=1)])
    calib = pd.concat([calib, calib.assign(layer=1)])
    qerr = pd.concat([qerr, qerr.assign(layer=1, routed_input_error=qerr.routed_input_error * 10)])
    model = allocate(stats, AllocationConfig(avg_bits=2.5, bit_widths=(2, 3, 4), allocator="routed-error", scope="model"),
                     calib, qerr)
    layer = allocate(stats, AllocationConfig(avg_bits=2.5, bit_widths=(2, 3, 4), allocator="routed-error"), calib, qerr)
    freq = {(int(r.layer), int(r.expert)): r.frequency for r in calib.itertuples()}
    err = {(int(r.layer), int(r.expert), int(r.bits)): r.routed_input_error for r in qerr.itertuples()}
    items = sorted(freq)
    costs = {(i, b): freq[i] * err[(*i, b)] for i in items for b in (2, 3, 4)}
    want = _brute_force(costs, items, [2, 3, 4], 20)
    got = {(int(r.layer), int(r.expert)): int(r.bits) for r in model.itertuples()}
    cost = lambda bits: sum(costs[i, bits[i]] for i in items)  # noqa: E731
    assert sum(got.values()) == 20 and cost(got) == pytest.approx(cost(want))
    assert model.groupby("layer").bits.mean().to_dict() == {0: 2.0, 1: 3.0}  # the sensitive layer took the bits
    assert cost(got) < cost({(int(r.layer), int(r.expert)): int(r.bits) for r in layer.itertuples()})
    assert model.reason.str.contains("model-wide budget").all()


def test_a_model_wide_budget_refuses_ranking_allocators_and_layer_widths():
    with pytest.raises(BudgetError, match="cannot spend one budget over the whole model"):
        check(AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator="paper", scope="model"))
    with pytest.raises(BudgetError, match="already spends one budget over the whole model"):
        check(AllocationConfig(avg_bits=2.5, bit_widths=(2, 3), allocator="pmq", scope="model", granularity="layer"))
    with pytest.raises(BudgetError, match="unknown budget scope"):
        AllocationConfig(avg_bits=2.5, scope="network")


def test_a_model_wide_budget_is_reachable_with_gapped_widths():
    """Widths {2, 4} at 3 bits over seven experts: the total comes from the tier counts (4 at 4 bits,
    3 at 2), which the widths reach, never 3·7 = 21, which no mix of 2s and 4s makes."""
    stats, calib, qerr = _tables()
    stats = pd.concat([stats, stats.assign(layer=1)[stats.expert < 3]])
    qerr = pd.concat([qerr, qerr.assign(layer=1)[qerr.expert < 3]])
    alloc = allocate(stats, AllocationConfig(avg_bits=3, bit_widths=(2, 4), allocator="weight-error", scope="model"),
                     None, qerr)
    assert len(alloc) == 7 and alloc.bits.sum() == 4 * 4 + 3 * 2
    uniform = allocate(stats, AllocationConfig(avg_bits=3, bit_widths=(2, 3, 4), allocator="uniform", scope="model"))
    assert set(uniform.bits) == {3}  # uniform is uniform whatever the scope
