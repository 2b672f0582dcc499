"""The budget arithmetic of allocation: the configuration, the tier counts and the paper's order.

The paper's method, per MoE layer independently:
  1. order experts by ascending Λ (position 0 = highest priority = most bits);
  2. one pass from the largest Λ upward: expert j jumps to the topmost position p whose expert
     has ζ·MaxVar < MaxVar_j, if that is above where j sits (so a noisy expert is not left
     below a much quieter one);
  3. counts per bit level, the same in every layer (so each layer's mean is the achieved average):
     two-tier   b_l ≤ b_avg ≤ b_h adjacent widths; n_h = round(κ·E), κ = (b_avg − b_l)/(b_h − b_l)
     three-tier b_l < b_m < b_h equally spaced, Δ = b_h − b_l; start from the two-tier split on
                the side of b_m the budget falls, then turn pairs of b_m experts into one b_h
                and one b_l (same average) while the region allows it:
                  b_avg > b_h − Δ/3          while n_m ≥ 2                (most b_h experts)
                  b_h − 2Δ/3 ≤ b_avg ≤ …     while n_m after ≥ conversions made (incl. this one)
                  b_avg < b_h − 2Δ/3         never                        (fewest b_l experts)
     The first n_h experts of the order get b_h, the next n_m get b_m, the rest b_l.
Python's round (half to even) decides ties, as in the reference code; the achieved average
is reported, not assumed. Which allocator orders the experts is `allocators.py`'s business;
this module knows none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BudgetError

SCHEMES = ("two-tier", "three-tier")
GRANULARITIES = ("expert", "layer")  # one width per expert, or per MoE layer (what vLLM serves)
# where the budget holds: in each MoE layer (the same counts per layer), or over the whole model (a
# cost-based allocator's one solve over every routed expert: sensitive layers may take bits from others)
SCOPES = ("layer", "model")
MAXVAR_DEFINITIONS = {"max-row": "maxvar", "max-norm-row": "maxvar_max_norm_row"}  # paper | reference code


@dataclass(frozen=True)
class AllocationConfig:
    avg_bits: float
    bit_widths: tuple[int, ...] = (2, 3, 4)
    zeta: float = 3.0
    allocator: str = "paper"
    scheme: str = "two-tier"
    maxvar_definition: str = "max-row"
    seed: int = 0  # for the random allocator
    granularity: str = "expert"
    scope: str = "layer"
    version: int = 3

    def __post_init__(self):
        """Everything checkable without the allocators; `allocators.check` adds the allocator."""
        widths = tuple(sorted(set(self.bit_widths)))
        if not widths or any(not 1 <= b <= 8 for b in widths):
            raise BudgetError(f"bit widths {self.bit_widths} must be integers in 1..8", "e.g. --bit-widths 2,3,4", "bit_widths")
        if not widths[0] <= self.avg_bits <= widths[-1]:
            raise BudgetError(
                f"average budget {self.avg_bits} bits is outside the available bit-widths {list(widths)}",
                f"choose --avg-bits between {widths[0]} and {widths[-1]}, or add bit-widths", "avg_bits",
            )
        if self.zeta <= 0:
            raise BudgetError(f"zeta must be positive, got {self.zeta}", "the paper's default is 3", "zeta")
        if self.scheme not in SCHEMES:
            raise BudgetError(f"unknown allocation scheme {self.scheme!r}", f"choose one of {', '.join(SCHEMES)}", "scheme")
        if self.scheme == "three-tier" and (len(widths) != 3 or widths[2] - widths[1] != widths[1] - widths[0]):
            raise BudgetError(f"three-tier allocation needs exactly three equally spaced bit-widths, got {list(widths)}",
                              "e.g. --bit-widths 1,2,3 or 2,3,4, or --scheme two-tier", "scheme")
        if self.granularity not in GRANULARITIES:
            raise BudgetError(f"unknown granularity {self.granularity!r}", f"choose one of {', '.join(GRANULARITIES)}", "granularity")
        if self.scope not in SCOPES:
            raise BudgetError(f"unknown budget scope {self.scope!r}", f"choose one of {', '.join(SCOPES)}", "budget_scope")
        if self.maxvar_definition not in MAXVAR_DEFINITIONS:
            raise BudgetError(f"unknown MaxVar definition {self.maxvar_definition!r}",
                              f"choose one of {', '.join(MAXVAR_DEFINITIONS)}", "maxvar_definition")
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


def _split(num_experts: int, avg: float, low: int, high: int) -> int:
    """Experts at `high` in a two-level split of `num_experts` around `avg` (banker's rounding)."""
    if low == high:
        return num_experts
    return round(min(1.0, max(0.0, (avg - low) / (high - low))) * num_experts)


def tier_counts(num_experts: int, cfg: AllocationConfig) -> dict[int, int]:
    """{bits: experts per layer}, highest bits first; the same for every layer."""
    if cfg.scheme == "two-tier":
        low, high = cfg.tiers()
        n_high = _split(num_experts, cfg.avg_bits, low, high)
        return {high: n_high, low: num_experts - n_high} if high != low else {high: num_experts}
    bl, bm, bh = cfg.bit_widths
    if cfg.avg_bits >= bm:
        n_h = _split(num_experts, cfg.avg_bits, bm, bh)
        n_m, n_l = num_experts - n_h, 0
    else:
        n_h, n_m = 0, _split(num_experts, cfg.avg_bits, bl, bm)
        n_l = num_experts - n_m
    delta, conversions = bh - bl, 0
    while n_m >= 2:
        if cfg.avg_bits > bh - delta / 3:
            pass
        elif cfg.avg_bits >= bh - 2 * delta / 3:
            if n_m - 2 < conversions + 1:
                break
        else:
            break
        n_h, n_m, n_l, conversions = n_h + 1, n_m - 2, n_l + 1, conversions + 1
    return {bh: n_h, bm: n_m, bl: n_l}


def assign(order: list[int], counts: dict[int, int]) -> dict[int, int]:
    """{expert: bits}: walk the priority order handing out the highest bits first."""
    levels = [b for b in sorted(counts, reverse=True) for _ in range(counts[b])]
    if len(levels) != len(order):
        raise BudgetError(f"counts {counts} do not cover {len(order)} experts", "this is a bug; please report it")
    return dict(zip(order, levels))
