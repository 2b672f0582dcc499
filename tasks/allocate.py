"""Stage 3: per-expert bit-widths from Λ and MaxVar (two-tier rule of the paper).

Per MoE layer, independently:
  1. order experts by ascending Λ (position 0 = highest priority = most bits);
  2. one pass from the largest Λ upward: expert j jumps to the topmost position p whose expert
     has ζ·MaxVar < MaxVar_j, if that is above where j sits (so a noisy expert is not left
     below a much quieter one);
  3. the first n_h = round(κ·E) experts get b_h, the rest b_l, with κ = (b_avg − b_l)/(b_h − b_l)
     and b_l ≤ b_avg ≤ b_h the two available bit-widths that bracket the budget.
Every layer gets the same counts, so each layer's mean bits is the achieved average; Python's
round (half to even) decides ties, as in the reference code, and the achieved average is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .errors import BudgetError


@dataclass(frozen=True)
class AllocationConfig:
    avg_bits: float
    bit_widths: tuple[int, ...] = (2, 3, 4)
    zeta: float = 3.0
    version: int = 1

    def __post_init__(self):
        widths = tuple(sorted(set(self.bit_widths)))
        if not widths or any(not 1 <= b <= 8 for b in widths):
            raise BudgetError(f"bit widths {self.bit_widths} must be integers in 1..8", "e.g. --bit-widths 2,3,4")
        if not widths[0] <= self.avg_bits <= widths[-1]:
            raise BudgetError(
                f"average budget {self.avg_bits} bits is outside the available bit-widths {list(widths)}",
                f"choose --avg-bits between {widths[0]} and {widths[-1]}, or add bit-widths",
            )
        if self.zeta <= 0:
            raise BudgetError(f"zeta must be positive, got {self.zeta}", "the paper's default is 3")
        object.__setattr__(self, "bit_widths", widths)

    def tiers(self) -> tuple[int, int]:
        """(b_l, b_h): the adjacent available widths around the budget (equal if it hits one)."""
        low = max(b for b in self.bit_widths if b <= self.avg_bits)
        high = min(b for b in self.bit_widths if b >= self.avg_bits)
        return low, high


def maxvar_rearrange(order: list[int], maxvar: dict[int, float], zeta: float) -> tuple[list[int], dict[int, int]]:
    """The single-pass ζ rearrangement; returns the new order and {moved expert: expert it passed}."""
    order = list(order)
    moved = {}
    for j in list(reversed(order)):
        pos_j = order.index(j)
        p = next((i for i, e in enumerate(order) if zeta * maxvar[e] < maxvar[j]), None)
        if p is not None and p < pos_j:
            moved[j] = order[p]
            order.insert(p, order.pop(pos_j))
    return order, moved


def two_tier_counts(num_experts: int, cfg: AllocationConfig) -> tuple[int, int]:
    """(n_high, n_low) experts per layer."""
    low, high = cfg.tiers()
    if low == high:
        return num_experts, 0
    kappa = min(1.0, max(0.0, (cfg.avg_bits - low) / (high - low)))
    n_high = round(kappa * num_experts)
    return n_high, num_experts - n_high


def allocate(stats: pd.DataFrame, cfg: AllocationConfig) -> pd.DataFrame:
    """The bit_allocation table (layer, expert, bits, position, reason) from expert_stats."""
    low, high = cfg.tiers()
    rows = []
    for layer, group in stats.groupby("layer", sort=True):
        lam = dict(zip(group.expert, group["lambda_score"]))
        var = dict(zip(group.expert, group.maxvar))
        primary = sorted(lam, key=lambda e: (lam[e], e))
        order, moved = maxvar_rearrange(primary, var, cfg.zeta)
        n_high, _ = two_tier_counts(len(order), cfg)
        for pos, e in enumerate(order):
            reason = f"lambda rank {primary.index(e)}"
            if e in moved:
                reason += f", promoted by maxvar over expert {moved[e]}"
            rows.append({"layer": int(layer), "expert": int(e), "bits": high if pos < n_high else low,
                         "position": pos, "reason": reason})
    return pd.DataFrame(rows).sort_values(["layer", "expert"]).reset_index(drop=True)


def summarize(alloc: pd.DataFrame, cfg: AllocationConfig) -> dict:
    counts = alloc.groupby("bits").size().to_dict()
    return {
        "requested_avg_bits": cfg.avg_bits,
        "achieved_avg_bits": round(float(alloc.bits.mean()), 6),
        "experts_per_bits": {int(b): int(n) for b, n in counts.items()},
        "moved_by_maxvar": int(alloc.reason.str.contains("promoted").sum()),
        "tiers": list(cfg.tiers()),
        "zeta": cfg.zeta,
    }
