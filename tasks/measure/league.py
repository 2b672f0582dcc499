"""The league table: every allocator × budget × bit-width set, quantized and evaluated side by side.

Each cell allocates (timed), writes the quantized checkpoint exactly as the quantization stage
does (each (matrix, bits) is quantized once and reused across cells), loads it the way a user
does (`expertbits.tasks.model.load`: experts run from the packed weights) and compares it with the
cached full-precision predictions. Cells differ only in who gets which bits, so their KL, perplexity
and task accuracy rank the allocators. The random allocator is drawn several times; the summary
reports its median and range.
"""

from __future__ import annotations

import shutil
import statistics as pystats
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from expertbits.kernels.packing import QuantizedTensor

from ..allocation.allocate import allocate
from ..allocation.allocators import ALLOCATORS, NEEDS_GPTQ, check
from ..allocation.budget import AllocationConfig
from ..errors import BudgetError
from ..placement import CPU, Placement
from ..quantization.gptq_sequential import sequential_gptq
from ..quantization.method import QuantizerConfig
from ..quantization.writer import quantize_checkpoint
from .evaluate import Reference

Progress = Callable[[float, str], None]
DEFAULT_ALLOCATORS = ("uniform", "paper", "lambda", "reverse-lambda", "maxvar", "frequency", "routing-weight",
                      "random", "pmq", "weight-error", "routed-error")


@dataclass(frozen=True)
class Cell:
    """One league cell: an allocation and the quantizer it is measured with."""

    config: AllocationConfig
    symmetric: bool = False
    quantizer: str = "rtn"

    @property
    def variant(self) -> str:
        """The allocator, marked when the cell is layer-granular (`@layer`), symmetric (`+sym`) or
        quantized by GPTQ (`+gptq`)."""
        return (self.config.allocator + ("@layer" if self.config.granularity == "layer" else "")
                + ("+sym" if self.symmetric else "") + ("" if self.quantizer == "rtn" else f"+{self.quantizer}"))


@dataclass(frozen=True)
class Grid:
    allocators: tuple[str, ...] = DEFAULT_ALLOCATORS
    budgets: tuple[float, ...] = (2.0, 2.25, 2.5, 2.75, 3.0)
    bit_sets: tuple[tuple[int, ...], ...] = ((2, 3, 4), (1, 2, 3))
    scheme: str = "three-tier"  # for 3 equally spaced widths; other sets fall back to two-tier
    random_draws: int = 5
    zeta: float = 3.0
    maxvar_definition: str = "max-row"
    group_size: int = 64
    # what servability costs: one width per layer (vLLM), no zero points (transformers); cells off
    # the default (expert, asymmetric) are run for the cost-based allocators and uniform only, and
    # symmetric ones only for bit sets without 1 bit
    granularities: tuple[str, ...] = ("expert", "layer")
    symmetric: tuple[bool, ...] = (False, True)
    # quantizers beyond rtn (gptq) are run for every allocator, on the default variant only
    quantizers: tuple[str, ...] = ("rtn",)
    clip: bool = False
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    gptq_min_tokens: int = 16
    gptq_weighted: bool = True
    rotate: bool = False  # every cell's matrices quantized in the Hadamard-rotated basis (kernels/hadamard.py)

    def __post_init__(self):
        unknown = [a for a in self.allocators if a not in ALLOCATORS]
        if unknown:
            raise BudgetError(f"unknown allocators {unknown}", f"choose from {', '.join(ALLOCATORS)}", "allocators")
        if not self.granularities or not self.symmetric or not self.quantizers:
            raise BudgetError("the league needs at least one granularity, symmetry and quantizer", "e.g. expert, false, rtn")
        for method in self.quantizers:
            self.quantizer(method, False)  # unknown quantizer or bad option: an error before any work

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        """Inverse of dataclasses.asdict after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(tuple(x) for x in v) if k == "bit_sets" else tuple(v) if isinstance(v, list) else v
                      for k, v in d.items()})

    def cells(self) -> list[Cell]:
        """Every cell: each allocation config under each variant that applies to it."""
        out = []
        for cfg in self.configs():
            for granularity in self.granularities:
                for symmetric in self.symmetric:
                    default = granularity == "expert" and not symmetric
                    if not default and cfg.allocator != "uniform" and not hasattr(ALLOCATORS[cfg.allocator], "costs"):
                        continue
                    if granularity == "layer" and cfg.allocator == "uniform":
                        continue  # uniform is already one width per layer
                    if symmetric and 1 in cfg.bit_widths:
                        continue  # symmetric 1-bit rounds every weight to 0 (quantize_rtn refuses it)
                    out.append(Cell(replace(cfg, granularity=granularity), symmetric))
            out += [Cell(cfg, False, method) for method in self.quantizers if method != "rtn"]
        if "rtn" not in self.quantizers:
            out = [c for c in out if c.quantizer != "rtn"]
        # an allocator that reads GPTQ's own error has no RTN cells
        out = [c for c in out if c.quantizer != "rtn" or c.config.allocator not in NEEDS_GPTQ]
        return out

    def quantizer(self, method: str, symmetric: bool) -> QuantizerConfig:
        return QuantizerConfig(method=method, symmetric=symmetric, clip=self.clip, damp=self.gptq_damp,
                               act_order=self.gptq_act_order, min_tokens=self.gptq_min_tokens, weighted=self.gptq_weighted,
                               rotate=self.rotate)

    def error_keys(self) -> list[tuple[str, bool]]:
        """(quantizer, symmetric) of every kind of cell, in order: each needs its own calibration errors."""
        return list(dict.fromkeys((c.quantizer, c.symmetric) for c in self.cells()))

    def configs(self) -> list[AllocationConfig]:
        """Every allocation config of the default variant; budgets a bit set cannot reach are skipped."""
        out = []
        for widths in self.bit_sets:
            w = tuple(sorted(widths))
            if not w or any(not 1 <= b <= 8 for b in w):
                raise BudgetError(f"bit-width set {list(widths)} must be non-empty with widths in 1..8", "e.g. --bit-sets 2,3,4 1,2,3", "bit_sets")
            three = len(w) == 3 and w[2] - w[1] == w[1] - w[0]
            scheme = self.scheme if three else "two-tier"
            for budget in self.budgets:
                if not w[0] <= budget <= w[-1]:
                    continue
                for name in self.allocators:
                    if name == "uniform" and budget not in w:
                        continue
                    seeds = range(self.random_draws) if name == "random" else (0,)
                    out += [check(AllocationConfig(avg_bits=budget, bit_widths=w, zeta=self.zeta, allocator=name,
                                                   scheme=scheme, maxvar_definition=self.maxvar_definition, seed=s))
                            for s in seeds]
        if not out:
            raise BudgetError(f"no budget of {list(self.budgets)} lies within any bit-width set {list(self.bit_sets)}",
                              "choose budgets between the smallest and largest width of a set", "budgets")
        return out

    def widths(self) -> tuple[int, ...]:
        return tuple(sorted({b for s in self.bit_sets for b in s}))

    def heatmap_cell(self) -> tuple[str, float] | None:
        """(bit set, budget) the heatmap shows: the middle budget of the first set that has one."""
        for widths in self.bit_sets:
            inside = sorted(b for b in self.budgets if min(widths) <= b <= max(widths))
            if inside:
                return ",".join(map(str, sorted(widths))), inside[len(inside) // 2]
        return None


class CellWriter:
    """Writes each cell's quantized checkpoint exactly as the quantization stage writes it: the league
    evaluates what a run would ship. Packed matrices are reused across cells from a cache bounded
    to `cache_bytes` (least recently used out first), so a real-size model's league never holds
    every matrix at every width."""

    def __init__(self, path: Path, group_size: int, cache_bytes: int = 1 << 30, calibration: dict | None = None,
                 placement: Placement = CPU):
        self.path, self.group_size, self.cache_bytes, self.placement = path, group_size, cache_bytes, placement
        self.calibration = calibration  # GPTQ's: {"text", "seq_len", "windows"}
        self._cache: OrderedDict[tuple[str, int, QuantizerConfig], QuantizedTensor] = OrderedDict()
        self._bytes = 0

    def write(self, alloc: pd.DataFrame, out: Path, quantizer: QuantizerConfig = QuantizerConfig()) -> dict:
        shutil.rmtree(out, ignore_errors=True)
        if quantizer.calibrated:  # sequential GPTQ depends on the whole allocation: nothing to reuse
            if self.calibration is None:
                raise BudgetError("a GPTQ league cell needs calibration text", "this is a bug; please report it")
            c = self.calibration
            packed, _, _ = sequential_gptq(self.path, c["text"], alloc, self.group_size, quantizer, seq_len=c["seq_len"],
                                        windows=c["windows"], placement=self.placement)
            return quantize_checkpoint(self.path, alloc, self.group_size, out, quantizer=lambda m, w, bits: packed[m.name],
                                       symmetric=quantizer.symmetric, config=quantizer.as_dict())

        def quantize(m, w: torch.Tensor, bits: int) -> QuantizedTensor:
            key = (m.name, bits, quantizer)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            q = quantizer.round_matrix(w.to(self.placement.device), bits, self.group_size).to("cpu")
            self._cache[key] = q
            self._bytes += _nbytes(q)
            while self._bytes > self.cache_bytes and len(self._cache) > 1:
                self._bytes -= _nbytes(self._cache.popitem(last=False)[1])
            return q

        return quantize_checkpoint(self.path, alloc, self.group_size, out, quantizer=quantize,
                                   symmetric=quantizer.symmetric, config=quantizer.as_dict())


def _nbytes(q: QuantizedTensor) -> int:
    return sum(t.numel() * t.element_size() for t in (q.packed, q.scales, q.zeros))


TASKS = ("wordnet-supersense", "lm-eval:<task>")
LM_EVAL = "lm-eval:"  # an lm-evaluation-harness task (harness.py), ranked by its accuracy


def task_data(name: str | None) -> list[str | None] | None:
    """For cache keys: the task files an lm-eval task reads (harness.tasks_digest), else None."""
    if name is None or not name.startswith(LM_EVAL):
        return None
    from .harness import tasks_digest

    return tasks_digest()


def task(name: str | None, examples: int) -> Callable | None:
    """accuracy(model, tokenizer) of a named task, or None. `lm-eval:<task>` runs an lm-eval task
    (lm-eval's own, the zoo's or none other) on each cell's model as the league holds it, and gives
    its `acc` (else `acc_norm`, else its first higher-is-better metric)."""
    if name is None:
        return None
    if name == "wordnet-supersense":
        from expertbits.zoo.cards import supersense_accuracy

        return lambda model, tok, device="cpu": supersense_accuracy(model, tok, limit=examples, device=device)
    if name.startswith(LM_EVAL) and name[len(LM_EVAL):]:
        from . import harness

        config = harness.HarnessConfig(tasks=(name[len(LM_EVAL):],), limit=examples)
        manager = harness.task_manager()
        harness.check_tasks(config, manager)  # before any cell: an unknown or unreachable task fails the league first

        def accuracy(model, tok, device="cpu") -> float:
            rows, _ = harness.run(model, tok, config, device, manager)
            by = {r["metric"]: r for r in rows if r["task"] == config.tasks[0]}
            chosen = next((by[m] for m in ("acc", "acc_norm") if m in by), None) or next(
                (r for r in by.values() if r["higher_is_better"]), None)
            if chosen is None:
                raise BudgetError(f"lm-eval task {config.tasks[0]!r} reports no accuracy (its metrics: {sorted(by)})",
                                  "rank the league by a task with acc or another higher-is-better metric; measure "
                                  "perplexity tasks with expertbits evaluate")
            return chosen["value"]

        return accuracy
    raise BudgetError(f"unknown task {name!r}", "choose wordnet-supersense or lm-eval:<task>, or none")


def run(ft_path: Path, stats: pd.DataFrame, calibration: pd.DataFrame | None,
        qerrors: dict[tuple[str, bool], pd.DataFrame] | None, grid: Grid, reference: Reference,
        task: Callable | None = None, progress: Progress | None = None,
        gptq_calibration: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(league rows, one per cell; allocations, one row per cell × expert). `qerrors` holds the
    quantization errors measured with each quantizer, by (method, symmetric) as in
    `grid.error_keys()`; `gptq_calibration` ({"text", "seq_len", "windows"}) is what GPTQ cells
    calibrate on."""
    writer = CellWriter(ft_path, grid.group_size, calibration=gptq_calibration, placement=reference.placement)
    cells = grid.cells()
    parts = []
    for i in range(len(cells)):
        parts.append(run_cell(i, stats, calibration, qerrors, grid, reference, writer, task))
        if progress:
            c = cells[i]
            progress((i + 1) / len(cells), f"league: {i + 1}/{len(cells)} cells "
                                            f"({c.variant} at {c.config.avg_bits} bits of {c.config.bit_widths})")
    return gather(parts)


def gather(parts: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The league and allocation tables from `run_cell` results, in cell order."""
    league = pd.DataFrame([p["row"] for p in parts]).astype({"accuracy": "float64", "accuracy_fp": "float64"})
    return league, pd.DataFrame([a for p in parts for a in p["allocation"]])


def run_cell(index: int, stats: pd.DataFrame, calibration: pd.DataFrame | None,
             qerrors: dict[tuple[str, bool], pd.DataFrame] | None, grid: Grid, reference: Reference,
             writer: "CellWriter", task: Callable | None = None) -> dict:
    """Allocate, write (as the quantization stage would) and evaluate the `index`-th cell of the
    grid: one unit of work (a Dask task); only that cell's checkpoint exists, in a temp folder."""
    c = grid.cells()[index]
    cfg = c.config
    start = time.perf_counter()
    alloc = allocate(stats, cfg, calibration, (qerrors or {}).get((c.quantizer, c.symmetric)))
    alloc_ms = 1000 * (time.perf_counter() - start)
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    with tempfile.TemporaryDirectory(prefix="expertbits-league-") as tmp:
        written = writer.write(alloc, Path(tmp) / "cell", grid.quantizer(c.quantizer, c.symmetric))
        with reference.quantized(Path(tmp) / "cell") as model:
            metrics = reference.compare(model)
            accuracy = task(model, reference.tokenizer, device=reference.placement.device) if task else None
    cell = {"bit_set": ",".join(map(str, cfg.bit_widths)), "scheme": cfg.scheme, "budget": cfg.avg_bits,
            "allocator": cfg.allocator, "granularity": cfg.granularity, "symmetric_quant": c.symmetric,
            "quantizer": c.quantizer + ("+rot" if grid.rotate else "") + ("+clip" if grid.clip else ""), "variant": c.variant, "seed": cfg.seed, "avg_bits": float(alloc.bits.mean()),
            "effective_bits": written["effective_bits"], "kl": metrics["kl"], "ppl": metrics["ppl_quant"],
            "ppl_fp": metrics["ppl_fp"], "accuracy": accuracy,
            "accuracy_fp": reference.task_accuracy(task) if task else None, "allocation_ms": alloc_ms}
    allocation = [{k: cell[k] for k in ("bit_set", "scheme", "budget", "allocator", "variant", "seed")} |
                  {"layer": layer, "expert": e, "bits": b} for (layer, e), b in sorted(bits_of.items())]
    return {"row": cell, "allocation": allocation}


def summarize(league: pd.DataFrame) -> pd.DataFrame:
    """One row per (bit set, budget, variant): the median over random draws, with its range, and
    each cell's rank by KL among the default variants (per-expert widths, asymmetric) with the same
    quantizer at that budget (1 = best); the servability variants are compared in `servability`."""
    rows = []
    for (bit_set, budget, name), g in league.groupby(["bit_set", "budget", "variant"], sort=True):
        row = {"bit_set": bit_set, "budget": budget, "variant": name, "draws": len(g),
               **{k: g[k].iloc[0] for k in ("allocator", "granularity", "symmetric_quant", "quantizer")}}
        for col in ("avg_bits", "effective_bits", "kl", "ppl", "accuracy", "allocation_ms"):
            values = [v for v in g[col] if pd.notna(v)]
            row[col] = pystats.median(values) if values else None
            if len(g) > 1 and col in ("kl", "ppl", "accuracy"):
                row[f"{col}_min"], row[f"{col}_max"] = (min(values), max(values)) if values else (None, None)
        rows.append(row)
    out = pd.DataFrame(rows)
    default = (out.granularity == "expert") & ~out.symmetric_quant.astype(bool)
    out["rank"] = out[default].groupby(["bit_set", "budget", "quantizer"]).kl.rank(method="min").astype("Int64")
    return out


SERVABLE = {"per-expert widths, zero points (expertbits)": ("expert", False),
            "per-expert widths, symmetric": ("expert", True),
            "one width per layer, zero points (vLLM)": ("layer", False),
            "one width per layer, symmetric (vLLM)": ("layer", True)}


def servability(summary: pd.DataFrame, allocator: str = "routed-error") -> str:
    """What servability costs, as markdown: KL of one allocator at each budget under each variant,
    beside uniform where the budget is a width."""
    lines = []
    for bit_set, g in summary.groupby("bit_set", sort=False):
        budgets = sorted(g.budget.unique())
        lines += [f"**{allocator}, bit-widths {{{bit_set}}}**: KL(fp ‖ quant) per token", "",
                  "| variant | " + " | ".join(f"{b:g} bits" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for label, (gran, sym) in [*SERVABLE.items(), ("uniform, zero points", ("expert", False)),
                                   ("uniform, symmetric (transformers)", ("expert", True))]:
            name = "uniform" if label.startswith("uniform") else allocator
            rtn = g.quantizer.str.startswith("rtn") if "quantizer" in g else True  # with --clip: 'rtn+clip'
            rows = g[(g.allocator == name) & (g.granularity == gran) & (g.symmetric_quant.astype(bool) == sym) & rtn]
            if rows.empty:
                continue
            cells = [f"{rows[rows.budget == b].kl.iloc[0]:.4f}" if (rows.budget == b).any() else "" for b in budgets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


SIGNALS = ("lambda_score", "maxvar", "frequency", "routing_weight", "hessian_trace", "weight_error", "routed_input_error")


def diagnostics(stats: pd.DataFrame, calibration: pd.DataFrame | None, qerror: pd.DataFrame | None) -> pd.DataFrame:
    """What Λ tracks on this model: Spearman correlation of every pair of per-expert signals,
    computed within each layer (allocation ranks within layers) and averaged over layers.
    Errors are taken at the lowest measured width, where allocation matters most; MaxVar is the
    paper's definition."""
    table = stats[["layer", "expert", "lambda_score", "maxvar"]]
    if calibration is not None:
        table = table.merge(calibration[["layer", "expert", "frequency", "routing_weight", "hessian_trace"]],
                            on=["layer", "expert"])
    if qerror is not None and not qerror.empty:
        low = qerror[qerror.bits == qerror.bits.min()][["layer", "expert", "weight_error", "routed_input_error"]]
        table = table.merge(low, on=["layer", "expert"])
    signals = [c for c in SIGNALS if c in table]
    per_layer = [g[signals].rank().corr() for _, g in table.groupby("layer")]
    if not per_layer:
        return pd.DataFrame(index=signals, columns=signals, dtype=float)
    # a constant signal in one layer (e.g. every expert routed equally) has no rank correlation there
    return pd.concat(per_layer).groupby(level=0).mean().loc[signals, signals]


def _grid(g: pd.DataFrame, col: str, fmt: str, spread: bool) -> list[str]:
    budgets = sorted(g.budget.unique())
    lines = ["| allocator | " + " | ".join(f"{b:g} bits" for b in budgets) + " | alloc ms |",
             "|---|" + "---|" * (len(budgets) + 1)]
    for name, a in g.groupby("variant", sort=False):
        cells = []
        for b in budgets:
            r = a[a.budget == b]
            if r.empty or pd.isna(r.iloc[0][col]):
                cells.append("")
                continue
            r = r.iloc[0]
            lo, hi = r.get(f"{col}_min"), r.get(f"{col}_max")
            rng = f" [{lo:{fmt}}–{hi:{fmt}}]" if spread and lo is not None and pd.notna(lo) else ""
            ranked = col == "kl" and pd.notna(r["rank"])
            cells.append(f"{r[col]:{fmt}}{rng}" + (f" ({r['rank']})" if ranked else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {a.allocation_ms.median():.2f} |")
    return lines


def correlation_markdown(corr: pd.DataFrame) -> str:
    return ("Spearman correlation of per-expert signals within a layer, mean over layers:\n\n"
            + "| | " + " | ".join(corr.columns) + " |\n|---|" + "---|" * len(corr.columns) + "\n"
            + "".join(f"| {r} | " + " | ".join(f"{v:+.2f}" for v in corr.loc[r]) + " |\n" for r in corr.index))


def markdown(summary: pd.DataFrame) -> str:
    """The league as markdown: KL (and task accuracy, where measured) per allocator × budget, per bit set;
    then what servability costs (the default allocator, or the first cost-based one the grid has,
    and uniform under each variant)."""
    lines = []
    for bit_set, g in summary.groupby("bit_set", sort=False):
        lines += [f"**bit-widths {{{bit_set}}}**: KL(fp ‖ quant) per token, lower is better (rank at that budget)", ""]
        lines += _grid(g, "kl", ".4f", True) + [""]
        if "accuracy" in g and g.accuracy.notna().any():
            lines += [f"Task accuracy at bit-widths {{{bit_set}}} (higher is better):", ""]
            lines += _grid(g, "accuracy", ".3f", True) + [""]
    solver = next((a for a in ("routed-error", "pmq", "weight-error") if a in set(summary.allocator)), None)
    if solver and (summary.granularity.nunique() > 1 or summary.symmetric_quant.nunique() > 1):
        lines += ["What servability costs (variants: `@layer` one width per MoE layer, `+sym` no zero points):", "",
                  servability(summary, solver)]
    return "\n".join(lines)
