"""Allocators by name: who gets the bits, per MoE layer.

Rank allocators return a priority order and take the layer's tier counts (`budget.tier_counts`)
from the top: the paper's method and every ranking baseline spend exactly the same bits.
Solver allocators (PMQ and the error-based ones) choose any available width per expert with an
integer program whose only budget constraint is the same total of nominal bits per layer.

    name            order / objective                                 needs
    uniform         every expert at the budget (a width)               nothing
    paper           ascending Λ, then the ζ MaxVar rearrangement       weights
    lambda          ascending Λ                                        weights
    reverse-lambda  descending Λ                                       weights
    maxvar          descending MaxVar                                  weights
    frequency       descending activation frequency (Li et al.)        calibration
    routing-weight  descending mean routing weight given routed        calibration
    random          seeded permutation                                 nothing
    pmq             min Σ f·w·‖W − Q_b(W)‖²  (MC-MoE's PMQ, MILP)       calibration + error
    weight-error    min Σ ‖W − Q_b(W)‖²  (data-free)                   error
    routed-error    min Σ f·Σ_i h_i ‖W[:, i] − Q_b(W)[:, i]‖²          calibration + error
                    h = E[u_i² | routed] of each matrix's own input u (tokens for gate/up,
                    hidden activations for down): f × the expected output error per routed token
    output-error    min Σ f·E[r² ‖y_b(x) − y(x)‖² | routed]             calibration + GPTQ error
                    the expert's whole output (act(x Gᵀ) ⊙ x Uᵀ) Dᵀ at width b against full
                    precision, times its routing weight r: residual-stream units, so one budget
                    over the whole model compares layers fairly (--budget-scope model)
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from ..errors import BudgetError, ExpertbitsError
from .budget import MAXVAR_DEFINITIONS, AllocationConfig, assign, maxvar_rearrange


@dataclass(frozen=True)
class Decision:
    order: list[int]  # priority order, 0 = most bits
    bits: dict[int, int]
    reasons: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerInputs:
    layer: int
    table: pd.DataFrame  # one row per expert, indexed by expert
    error: pd.DataFrame | None  # rows (expert, bits): weight_error, routed_input_error

    def column(self, name: str, allocator: str) -> dict[int, float]:
        if name not in self.table or self.table[name].isna().any():
            raise ExpertbitsError(f"allocator {allocator!r} needs the calibration statistic {name!r}, which this run "
                                  "does not have", "run the statistics stage with calibration text (--calibration-windows > 0)")
        return {int(e): float(v) for e, v in self.table[name].items()}


@dataclass(frozen=True)
class Inputs:
    stats: pd.DataFrame
    error: pd.DataFrame | None
    maxvar_column: str

    @classmethod
    def build(cls, stats: pd.DataFrame, cfg: AllocationConfig, calibration: pd.DataFrame | None,
              qerror: pd.DataFrame | None) -> "Inputs":
        table = stats if calibration is None else stats.merge(calibration, on=["layer", "expert"], how="left")
        return cls(table, qerror, MAXVAR_DEFINITIONS[cfg.maxvar_definition])

    def layer(self, layer: int) -> LayerInputs:
        table = self.stats[self.stats.layer == layer].set_index("expert").sort_index()
        if self.maxvar_column not in table:
            raise ExpertbitsError(f"statistics lack {self.maxvar_column!r}", "recompute statistics with this version")
        table = table.assign(maxvar_selected=table[self.maxvar_column])
        err = None if self.error is None else self.error[self.error.layer == layer]
        return LayerInputs(layer, table, err)


Allocator = Callable[[LayerInputs, dict, AllocationConfig], Decision]


def _ranked(order: list[int], counts: dict[int, int], reason: Callable[[int], str]) -> Decision:
    return Decision(order, assign(order, counts), {e: reason(e) for e in order})


def paper(x: LayerInputs, counts, cfg) -> Decision:
    lam = {int(e): float(v) for e, v in x.table["lambda_score"].items()}
    var = {int(e): float(v) for e, v in x.table["maxvar_selected"].items()}
    primary = sorted(lam, key=lambda e: (lam[e], e))  # stable: expert index breaks ties
    order, moved = maxvar_rearrange(primary, var, cfg.zeta)

    def reason(e):
        r = f"lambda rank {primary.index(e)}"
        return r + (f", promoted by maxvar over expert {moved[e]}" if e in moved else "")
    return _ranked(order, counts, reason)


def _by(column: str, descending: bool, label: str, calibrated: bool = False) -> Allocator:
    def allocator(x: LayerInputs, counts, cfg) -> Decision:
        values = x.column(column, label) if calibrated else {int(e): float(v) for e, v in x.table[column].items()}
        order = sorted(values, key=lambda e: (-values[e] if descending else values[e], e))
        return _ranked(order, counts, lambda e: f"{label} rank {order.index(e)} ({values[e]:.4g})")
    allocator.__name__ = label
    return allocator


def uniform(x: LayerInputs, counts, cfg) -> Decision:
    if cfg.avg_bits not in cfg.bit_widths:
        raise BudgetError(f"uniform allocation needs the budget to be a bit-width, got {cfg.avg_bits}",
                          f"choose --avg-bits from {list(cfg.bit_widths)}")
    order = sorted(int(e) for e in x.table.index)
    return Decision(order, {e: int(cfg.avg_bits) for e in order}, {e: "uniform" for e in order})


def random_order(x: LayerInputs, counts, cfg) -> Decision:
    order = sorted(int(e) for e in x.table.index)
    _random.Random(f"{cfg.seed}/{x.layer}").shuffle(order)  # string seeds hash deterministically
    return _ranked(order, counts, lambda e: f"random draw (seed {cfg.seed})")


def solve(costs: dict[tuple, float], experts: list, widths: list[int], total_bits: int,
          sizes: dict | None = None) -> dict:
    """Minimise Σ cost[e, b]·x[e, b] with one width per item and Σ size_e·b·x = total_bits (scipy MILP).

    Items are experts of a layer (size 1), (layer, expert) pairs for a model-wide budget, or, for
    layer granularity, whole layers (size = their experts)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    pairs = [(e, b) for e in experts for b in widths]
    c = np.array([costs[p] for p in pairs], dtype=float)
    if not np.isfinite(c).all():
        bad = [p for p, v in zip(pairs, c) if not np.isfinite(v)]
        raise ExpertbitsError(f"non-finite allocation cost for (item, bits) {bad[:4]}",
                              "the calibration or error statistics are damaged; recompute them")
    scale = max(float(np.abs(c).max()), 1e-300)  # HiGHS tolerances are absolute; keep costs O(1)
    from scipy.sparse import csr_matrix

    row = {e: i for i, e in enumerate(experts)}  # sparse: a model-wide solve has thousands of items
    one_each = csr_matrix((np.ones(len(pairs)), ([row[e] for e, _ in pairs], np.arange(len(pairs)))),
                          shape=(len(experts), len(pairs)))
    budget = np.array([[float(b * (sizes[e] if sizes else 1)) for e, b in pairs]])
    res = milp(c / scale, integrality=np.ones(len(pairs)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(budget, total_bits, total_bits)])
    if not res.success:
        raise BudgetError(f"no assignment of widths {widths} to {len(experts)} items uses exactly {total_bits} bits "
                          f"({res.message})", "choose a budget the bit-widths can reach")
    return {e: b for (e, b), v in zip(pairs, res.x) if v > 0.5}


def _solver(weight: Callable[[LayerInputs, str], dict[int, float]], error_column: str, label: str) -> Allocator:
    def costs(x: LayerInputs, cfg) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
        """(importance per expert, error per (expert, bits)) of one layer."""
        if x.error is None or x.error.empty:
            raise ExpertbitsError(f"allocator {label!r} needs per-expert quantization errors, which this run does not have",
                                  "run the statistics stage with error measurement enabled")
        w = weight(x, label)
        if error_column not in x.error or x.error[error_column].isna().any():
            raise ExpertbitsError(f"allocator {label!r} needs {error_column!r}, which only GPTQ's calibration pass "
                                  "measures (it runs every expert's routed tokens through it)",
                                  "use --quantizer gptq with this allocator, or routed-error with rtn", "allocator")
        err = {(int(r.expert), int(r.bits)): float(getattr(r, error_column)) for r in x.error.itertuples()}
        missing = [(e, b) for e in sorted(w) for b in cfg.bit_widths if (e, b) not in err]
        if missing:
            raise ExpertbitsError(f"no quantization error measured for (expert, bits) {missing[:4]} in layer {x.layer}",
                                  "recompute statistics with these bit-widths")
        return w, err

    def allocator(x: LayerInputs, counts, cfg) -> Decision:
        w, err = costs(x, cfg)
        experts, widths = sorted(w), list(cfg.bit_widths)
        total = sum(b * n for b, n in counts.items())
        bits = solve({(e, b): w[e] * err[e, b] for e in experts for b in widths}, experts, widths, total)
        order = sorted(experts, key=lambda e: (-bits[e], -w[e], e))
        return Decision(order, bits, {e: f"{label}: importance {w[e]:.4g}, error at {bits[e]} bits "
                                         f"{err[e, bits[e]]:.4g}" for e in experts})
    allocator.__name__ = label
    allocator.costs = costs  # layer granularity sums them per layer (allocate.allocate)
    return allocator


def _ones(x: LayerInputs, label: str) -> dict[int, float]:
    return {int(e): 1.0 for e in x.table.index}


def _freq_times_weight(x: LayerInputs, label: str) -> dict[int, float]:
    f, w = x.column("frequency", label), x.column("routing_weight", label)
    return {e: f[e] * w[e] for e in f}


ALLOCATORS: dict[str, Allocator] = {
    "uniform": uniform,
    "paper": paper,
    "lambda": _by("lambda_score", False, "lambda"),
    "reverse-lambda": _by("lambda_score", True, "reverse-lambda"),
    "maxvar": _by("maxvar_selected", True, "maxvar"),
    "frequency": _by("frequency", True, "frequency", calibrated=True),
    "routing-weight": _by("routing_weight", True, "routing-weight", calibrated=True),
    "random": random_order,
    "pmq": _solver(_freq_times_weight, "weight_error", "pmq"),
    "weight-error": _solver(_ones, "weight_error", "weight-error"),
    "routed-error": _solver(lambda x, label: x.column("frequency", label), "routed_input_error", "routed-error"),
    "output-error": _solver(lambda x, label: x.column("frequency", label), "output_error", "output-error"),
}
NEEDS_CALIBRATION = {"frequency", "routing-weight", "pmq", "routed-error", "output-error"}
NEEDS_ERROR = {"pmq", "weight-error", "routed-error", "output-error"}
NEEDS_GPTQ = {"output-error"}  # its error is measured by GPTQ's calibration pass only


def check(cfg: AllocationConfig) -> AllocationConfig:
    """The allocator exists and can honour the configuration; raises BudgetError before any work."""
    if cfg.allocator not in ALLOCATORS:
        raise BudgetError(f"unknown allocator {cfg.allocator!r}", f"choose one of {', '.join(ALLOCATORS)}", "allocator")
    if cfg.granularity == "layer" and cfg.allocator != "uniform" and not hasattr(ALLOCATORS[cfg.allocator], "costs"):
        solvers = [n for n, x in ALLOCATORS.items() if hasattr(x, "costs")]
        raise BudgetError(f"allocator {cfg.allocator!r} ranks experts within a layer and cannot choose one width "
                          "per layer", f"with --granularity layer use {', '.join(solvers)} or uniform",
                          "allocator")
    if cfg.scope == "model" and cfg.allocator != "uniform":
        solvers = [n for n, x in ALLOCATORS.items() if hasattr(x, "costs")]
        if not hasattr(ALLOCATORS[cfg.allocator], "costs"):
            raise BudgetError(f"allocator {cfg.allocator!r} ranks experts within a layer and cannot spend one budget "
                              "over the whole model", f"with --budget-scope model use {', '.join(solvers)}", "allocator")
        if cfg.granularity != "expert":
            raise BudgetError("--granularity layer already spends one budget over the whole model (one width per "
                              "layer)", "leave --budget-scope at layer, or use --granularity expert", "budget_scope")
    return cfg
