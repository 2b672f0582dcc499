"""League-table figures: quality vs bits (Pareto) and bits per layer × expert (heatmaps)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: flows run on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def pareto(summary: pd.DataFrame, out: Path, title: str) -> Path:
    """KL vs effective bits, one panel per bit-width set (and a row per quantizer when the league
    compares several), one line per allocator (random: median with its range as error bars). An
    allocator keeps its colour across rows. Down and left is better."""
    plt = _pyplot()
    sets = list(dict.fromkeys(summary.bit_set))
    quantizers = list(dict.fromkeys(summary.quantizer)) if "quantizer" in summary else [None]
    fig, axes = plt.subplots(len(quantizers), len(sets), figsize=(6 * len(sets) + 2.5, 4.5 * len(quantizers)),
                             squeeze=False, layout="constrained", sharey=True)
    base = lambda variant: variant.split("+gptq")[0]  # noqa: E731  (the allocator and its servability marks)
    names = sorted({base(v) for v in summary.variant})
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # stable colour per variant
    for row, quantizer in zip(axes, quantizers):
        for ax, bit_set in zip(row, sets):
            g = summary[summary.bit_set == bit_set]
            if quantizer is not None:
                g = g[g.quantizer == quantizer]
            for name, a in g.groupby("variant", sort=True):
                a, label = a.sort_values("effective_bits"), base(name)
                style = dict(marker="o", ms=4, lw=2.2 if label == "paper" else 1.2, label=label, color=colors[label],
                             ls="--" if "@" in label or "+" in label else "-")
                if "kl_min" in a and a.kl_min.notna().any():
                    err = [(a.kl - a.kl_min).fillna(0), (a.kl_max - a.kl).fillna(0)]
                    ax.errorbar(a.effective_bits, a.kl, yerr=err, capsize=2, **style)
                else:
                    ax.plot(a.effective_bits, a.kl, **style)
            ax.set_yscale("log")
            ax.set_xlabel("effective bits per expert weight (incl. scales and zero points)")
            ax.set_ylabel("KL(fp ‖ quant) per token")
            ax.set_title(f"bit-widths {{{bit_set}}}" + (f", {quantizer.upper()}" if len(quantizers) > 1 else ""))
            ax.grid(True, which="both", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7)  # off the curves
    fig.suptitle(title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmap(allocations: pd.DataFrame, out: Path, bit_set: str, budget: float, title: str) -> Path:
    """Bits of every (layer, expert), one panel per allocator (and layer-granular variant), at one
    budget (random: draw 0)."""
    plt = _pyplot()
    cell = allocations[(allocations.bit_set == bit_set) & (allocations.budget == budget) & (allocations.seed == 0)
                       & ~allocations.variant.str.endswith("+sym")]
    names = sorted(cell.variant.unique())
    if not names:
        return out
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False,
                             layout="constrained")
    widths = [int(b) for b in bit_set.split(",")]
    image = None
    for ax, name in zip(axes.flat, names):
        grid = cell[cell.variant == name].pivot(index="layer", columns="expert", values="bits")
        image = ax.imshow(grid.values, cmap="viridis", vmin=min(widths), vmax=max(widths), aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]), [str(v) for v in grid.index])
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, ticks=widths, label="bits", shrink=0.8)
    fig.suptitle(f"{title}: bits per layer × expert at {budget:g} average bits of {{{bit_set}}}")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
