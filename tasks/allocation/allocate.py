"""Stage 3: per-expert bit-widths. Counts per bit level come from the budget (`budget.py`); who
gets them comes from an allocator (`allocators.py`), per MoE layer, or per layer as a whole with
`granularity="layer"`.
"""

from __future__ import annotations

import pandas as pd

from .allocators import ALLOCATORS, Inputs, check, solve
from .budget import AllocationConfig, tier_counts


def allocate(stats: pd.DataFrame, cfg: AllocationConfig, calibration: pd.DataFrame | None = None,
             qerror: pd.DataFrame | None = None) -> pd.DataFrame:
    """The bit_allocation table (layer, expert, bits, position, reason) from the statistics tables."""
    check(cfg)
    inputs = Inputs.build(stats, cfg, calibration, qerror)
    if cfg.granularity == "layer" and cfg.allocator != "uniform":
        return _allocate_layers(stats, cfg, inputs)
    if cfg.scope == "model" and cfg.allocator != "uniform":  # uniform is the same whatever the scope
        return _allocate_model(stats, cfg, inputs)
    rows = []
    for layer in sorted(stats.layer.unique()):
        experts = sorted(int(e) for e in stats.expert[stats.layer == layer])
        counts = tier_counts(len(experts), cfg)
        decision = ALLOCATORS[cfg.allocator](inputs.layer(int(layer)), counts, cfg)
        for pos, e in enumerate(decision.order):
            rows.append({"layer": int(layer), "expert": e, "bits": decision.bits[e], "position": pos,
                         "reason": decision.reasons.get(e, "")})
    return pd.DataFrame(rows).sort_values(["layer", "expert"]).reset_index(drop=True)


def _allocate_layers(stats: pd.DataFrame, cfg: AllocationConfig, inputs) -> pd.DataFrame:
    """One width per MoE layer: minimise the allocator's cost summed over each layer's experts,
    with Σ experts_l · b_l equal to the budget over all routed experts (rounded half to even to a
    reachable total)."""
    costs_of = ALLOCATORS[cfg.allocator].costs
    layers = sorted(int(v) for v in stats.layer.unique())
    sizes, cost, importance, errors = {}, {}, {}, {}
    for layer in layers:
        w, err = costs_of(inputs.layer(layer), cfg)
        sizes[layer], importance[layer], errors[layer] = len(w), w, err
        for b in cfg.bit_widths:
            cost[layer, b] = sum(w[e] * err[e, b] for e in w)
    total = round(cfg.avg_bits * sum(sizes.values()) / max(sizes.values())) * max(sizes.values())
    bits = solve(cost, layers, list(cfg.bit_widths), total, sizes)
    rows = []
    for layer in layers:
        b = bits[layer]
        order = sorted(importance[layer], key=lambda e: (-importance[layer][e], e))
        for pos, e in enumerate(order):
            rows.append({"layer": layer, "expert": e, "bits": b, "position": pos,
                         "reason": f"{cfg.allocator}, layer granularity: layer cost at {b} bits {cost[layer, b]:.4g}"})
    return pd.DataFrame(rows).sort_values(["layer", "expert"]).reset_index(drop=True)


def _allocate_model(stats: pd.DataFrame, cfg: AllocationConfig, inputs) -> pd.DataFrame:
    """One budget over every routed expert of the model: minimise the allocator's cost summed over
    all (layer, expert) pairs with Σ bits equal to the budget over all of them (rounded half to even),
    so a layer whose experts lose more per bit takes bits from one that loses less."""
    costs_of = ALLOCATORS[cfg.allocator].costs
    layers = sorted(int(v) for v in stats.layer.unique())
    cost, importance, errors = {}, {}, {}
    for layer in layers:
        w, err = costs_of(inputs.layer(layer), cfg)
        importance[layer], errors[layer] = w, err
        for e in w:
            for b in cfg.bit_widths:
                cost[(layer, e), b] = w[e] * err[e, b]
    items = [(layer, e) for layer in layers for e in sorted(importance[layer])]
    # the tier counts over every expert at once: a total the widths can reach, rounded as per layer
    total = sum(b * n for b, n in tier_counts(len(items), cfg).items())
    bits = solve(cost, items, list(cfg.bit_widths), total)
    rows = []
    for layer in layers:
        w = importance[layer]
        order = sorted(w, key=lambda e: (-bits[layer, e], -w[e], e))
        for pos, e in enumerate(order):
            b = bits[layer, e]
            rows.append({"layer": layer, "expert": e, "bits": b, "position": pos,
                         "reason": f"{cfg.allocator}, model-wide budget: importance {w[e]:.4g}, error at {b} bits "
                                   f"{errors[layer][e, b]:.4g}"})
    return pd.DataFrame(rows).sort_values(["layer", "expert"]).reset_index(drop=True)


def summarize(alloc: pd.DataFrame, cfg: AllocationConfig) -> dict:
    counts = alloc.groupby("bits").size().to_dict()
    return {
        "allocator": cfg.allocator,
        "scheme": cfg.scheme,
        "requested_avg_bits": cfg.avg_bits,
        "achieved_avg_bits": round(float(alloc.bits.mean()), 6),
        "experts_per_bits": {int(b): int(n) for b, n in counts.items()},
        "moved_by_maxvar": int(alloc.reason.str.contains("promoted").sum()),
        "bit_widths": list(cfg.bit_widths),
        "zeta": cfg.zeta,
        "granularity": cfg.granularity,
        "scope": cfg.scope,
    }
