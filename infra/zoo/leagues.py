"""League tables for every zoo pair, as published in the README.

    python -m expertbits.zoo.leagues                    # every pair
    python -m expertbits.zoo.leagues mixtral-wordnet    # one

Each pair runs the `expertbits-league` flow (the same as `expertbits league …` with the options
below) into ./expertbits-store, then copies the table, the figures and the signal correlations
to infra/zoo/results/<pair>/ so they can be read without running anything.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

SUPERSENSE = dict(eval_text="zoo://text/wordnet-supersense-test", calibration_text="zoo://text/wordnet-supersense-train",
                  task="wordnet-supersense")
BOTH = dict(quantizers=["rtn", "gptq"])  # GPTQ is for decoder-only models (Switch: RTN)
PAIRS: dict[str, dict] = {
    "mixtral-wordnet": dict(checkpoint="zoo://mixtral-tiny/wordnet", reference="zoo://mixtral-tiny/base", **SUPERSENSE,
                            **BOTH),
    "mixtral-code": dict(checkpoint="zoo://mixtral-tiny/code", reference="zoo://mixtral-tiny/base",
                         eval_text="zoo://text/python-heldout", calibration_text="zoo://text/python-train", **BOTH),
    "mixtral-control": dict(checkpoint="zoo://mixtral-tiny/control", reference="zoo://mixtral-tiny/base",
                            eval_text="zoo://text/web-heldout", calibration_text="zoo://text/web-train", **BOTH),
    "qwen-moe-wordnet": dict(checkpoint="zoo://qwen-moe-tiny/wordnet", reference="zoo://qwen-moe-tiny/base", **SUPERSENSE,
                             **BOTH),
    # trained on 128-token windows; T5 relative-position buckets beyond that span are untrained
    "switch-wordnet": dict(checkpoint="zoo://switch-tiny/wordnet", reference="zoo://switch-tiny/base", eval_seq_len=128,
                           **SUPERSENSE),
}
TASK_EXAMPLES = 200


def command(pair: str) -> str:
    """The equivalent CLI invocation, for the README."""
    opts = " ".join(f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}" for k, v in PAIRS[pair].items())
    return f"expertbits league {opts}" + (f" --task-examples {TASK_EXAMPLES}" if "task" in PAIRS[pair] else "")


def run(pair: str, store: str, docs: Path) -> Path:
    from expertbits.flows.league import league_table
    from expertbits.flows.params import LeagueParams

    params = LeagueParams(**PAIRS[pair], store=store, task_examples=TASK_EXAMPLES)
    manifest = league_table(params)
    src, out = Path(manifest.uri), docs / pair
    out.mkdir(parents=True, exist_ok=True)
    for name in ("league.md", "pareto.png", "heatmap.png", "league_summary.parquet"):
        shutil.copyfile(src / "league" / name, out / name)
    (out / "command.txt").write_text(command(pair) + "\n")
    return out


# SQL: the default variant (per-expert widths, zero points) of one quantizer's cells; `$suffix` is
# '' for RTN, '+gptq' for GPTQ. Paths and values are always bound parameters, never spliced in.
DEFAULT = "coalesce(variant, allocator) = allocator || $suffix"


def _suffix(quantizer: str) -> str:
    return "" if quantizer == "rtn" else f"+{quantizer}"


def overall(docs: Path, quantizer: str = "rtn") -> str:
    """Across every published pair: each allocator's mean rank (by KL, 1 = best, among the cells of
    the same quantizer) over the budgets where allocators differ (not a width of the set), and how
    often it is best or beats the median random draw."""
    import duckdb

    files = sorted(str(p) for p in docs.glob("*/league_summary.parquet"))
    con = duckdb.connect()
    try:
        args = {"files": files, "suffix": _suffix(quantizer)}
        pairs = con.execute(f"""SELECT count(DISTINCT filename) FROM read_parquet($files, filename = true,
                                union_by_name = true) WHERE {DEFAULT}""", args).fetchone()[0]
        rows = con.execute(f"""
            WITH s AS (SELECT *, split_part(filename, '/', -2) AS pair
                       FROM read_parquet($files, filename = true, union_by_name = true)
                       WHERE {DEFAULT}),
                 r AS (SELECT pair, bit_set, budget, kl AS random_kl FROM s WHERE allocator = 'random')
            SELECT allocator, count(*) AS cells, round(avg(rank), 2) AS mean_rank, sum((rank = 1)::INT) AS best,
                   sum((kl < random_kl)::INT) AS beats_random, round(median(allocation_ms), 1) AS alloc_ms
            FROM s JOIN r USING (pair, bit_set, budget)
            WHERE budget NOT IN (SELECT unnest(string_split(bit_set, ','))::DOUBLE) AND allocator != 'random'
            GROUP BY allocator ORDER BY mean_rank""", args).fetchall()
    finally:
        con.close()
    out = [f"{quantizer.upper()}, over {pairs} pairs × 2 bit-width sets × 3 fractional budgets:", "",
           "| allocator | cells | mean rank | best | beats median random | allocation ms |", "|---|---|---|---|---|---|"]
    out += [f"| {a} | {c} | {m} | {b} | {r}/{c} | {t} |" for a, c, m, b, r, t in rows]
    return "\n".join(out)


ORDER = ("paper", "lambda", "reverse-lambda", "maxvar", "frequency", "routing-weight", "random", "pmq",
         "weight-error", "routed-error")


def budget_table(docs: Path, budget: float = 2.5, quantizer: str = "rtn") -> str:
    """KL per allocator (columns: pairs) at one budget, for each bit-width set; accuracy in
    brackets where the pair has a task, the best KL of each column in bold."""
    import duckdb

    from .cards import fmt_kl

    files = sorted(str(p) for p in docs.glob("*/league_summary.parquet"))
    frame = duckdb.execute(f"""SELECT split_part(filename, '/', -2) AS pair, bit_set, allocator, kl, accuracy
                               FROM read_parquet($files, filename = true, union_by_name = true)
                               WHERE budget = $budget AND {DEFAULT}""",
                           {"files": files, "budget": budget, "suffix": _suffix(quantizer)}).df()
    frame = frame[frame.allocator.isin(ORDER)]  # bold only what is shown
    if frame.empty:
        raise ValueError(f"no published league has budget {budget}")
    pairs = sorted(frame.pair.unique())
    out = [f"{quantizer.upper()}:", ""]
    for bit_set in sorted(frame.bit_set.unique(), reverse=True):
        cells = frame[frame.bit_set == bit_set].set_index(["allocator", "pair"])
        best = cells.kl.groupby("pair").min()
        out += [f"Bit-widths {{{bit_set}}}:", "", "| allocator | " + " | ".join(pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
        for allocator in ORDER:
            row = []
            for pair in pairs:
                kl, acc = cells.loc[(allocator, pair), ["kl", "accuracy"]]
                text = f"**{fmt_kl(kl)}**" if kl == best[pair] else fmt_kl(kl)
                row.append(text + (f" ({acc:.2f})" if acc == acc else ""))  # NaN: no task
            out.append(f"| {allocator} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


SERVABILITY = (("routed-error", "per-expert widths, zero points (expertbits native)"),
               ("routed-error+sym", "per-expert widths, symmetric"),
               ("routed-error@layer", "one width per layer, zero points (vLLM)"),
               ("routed-error@layer+sym", "one width per layer, symmetric (vLLM)"),
               ("uniform", "uniform, zero points (vLLM)"),
               ("uniform+sym", "uniform, symmetric (transformers, vLLM)"))


def servability_table(docs: Path, bit_set: str = "2,3,4", budgets: tuple[float, ...] = (2.5, 3.0)) -> str:
    """What servability costs on every pair: KL of the default allocator (routed-error) per variant
    (and uniform where the budget is a width) at the given budgets of one bit-width set."""
    import duckdb

    from .cards import fmt_kl

    files = sorted(str(p) for p in docs.glob("*/league_summary.parquet"))
    frame = duckdb.execute("""SELECT split_part(filename, '/', -2) AS pair, budget, variant, kl
                              FROM read_parquet($files, filename = true, union_by_name = true)
                              WHERE bit_set = $bit_set""", {"files": files, "bit_set": bit_set}
                           ).df().set_index(["variant", "pair", "budget"]).kl
    pairs = sorted(frame.index.get_level_values("pair").unique())
    head = "| variant (consumers) | " + " | ".join(f"{p} {b:g}b" for b in budgets for p in pairs) + " |"
    out = [f"Bit-widths {{{bit_set}}}, KL(fp ‖ quant) per token:", "", head, "|---" * (1 + len(pairs) * len(budgets)) + "|"]
    for variant, label in SERVABILITY:
        cells = [fmt_kl(frame[variant, p, b]) if (variant, p, b) in frame.index else "–" for b in budgets for p in pairs]
        out.append(f"| `{variant}`: {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def rewrite(docs: Path) -> None:
    """Re-render each published league.md and pareto.png from its summary (keeps the correlation section)."""
    import duckdb

    from expertbits.tasks.measure.league import markdown
    from expertbits.tasks.measure.plots import pareto

    for summary in sorted(docs.glob("*/league_summary.parquet")):
        md = summary.parent / "league.md"
        head, _, _ = md.read_text().partition("\n\n")
        tail = md.read_text()[md.read_text().index("Spearman"):]
        frame = duckdb.execute("SELECT * FROM read_parquet(?)", [str(summary)]).df()
        md.write_text(f"{head}\n\n{markdown(frame)}\n{tail}")
        pareto(frame, summary.parent / "pareto.png", head.removeprefix("# League table: "))


def lambda_vs_control(family: str = "mixtral-tiny") -> str:
    """Is Λ the fine-tune's signal or generic norm growth? Spearman correlation, within each layer
    (mean over layers), of each fine-tune's Λ with the same-length control continuation's Λ; and
    how far the router rows moved relative to their length (small for the control: the base's
    router norms have settled)."""
    from scipy.stats import spearmanr

    from expertbits.tasks.allocation.statistics import collect
    from expertbits.tasks.checkpoints.reader import Checkpoint

    from . import resolve

    def lam(variant):
        with Checkpoint.open(resolve(f"zoo://{family}/{variant}")) as ft, Checkpoint.open(resolve(f"zoo://{family}/base")) as b:
            return collect(ft, b)[0]

    control = lam("control")
    rows = ["| fine-tune | Spearman(Λ, Λ_control) per layer | mean | share of experts with Λ > 0 | mean abs(Λ) / ‖w_base‖ |",
            "|---|---|---|---|---|"]
    for variant in ("wordnet", "code", "control"):
        st = lam(variant)
        rhos = [spearmanr(g.lambda_score, control[control.layer == layer].lambda_score).statistic
                for layer, g in st.groupby("layer")]
        rows.append(f"| {variant} | {', '.join(f'{r:+.2f}' for r in rhos)} | {sum(rhos) / len(rhos):+.2f} | "
                    f"{(st.lambda_score > 0).mean():.0%} | {(st.lambda_score.abs() / st.reference_router_norm).mean():.2%} |")
    return "\n".join(rows)


def main() -> None:
    from expertbits.flows.cli import _prefect_defaults

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="*", help=f"pairs to run (default: all): {', '.join(PAIRS)}")
    parser.add_argument("--store", default="expertbits-store")
    parser.add_argument("--docs", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--lambda-vs-control", action="store_true", help="print how Λ of each fine-tune tracks the control's")
    parser.add_argument("--overall", action="store_true", help="print the allocators' ranks over every published pair")
    parser.add_argument("--rewrite", action="store_true", help="re-render the published league.md and pareto.png files")
    parser.add_argument("--budget-table", type=float, metavar="BITS", help="print KL per allocator and pair at one budget")
    parser.add_argument("--servability", action="store_true", help="print what one width per layer and symmetric cost")
    parser.add_argument("--quantizer", default="rtn", choices=("rtn", "gptq"),
                        help="the quantizer whose cells --overall and --budget-table show")
    args = parser.parse_args()
    if args.lambda_vs_control:
        print(lambda_vs_control())
        return
    if args.rewrite:
        rewrite(args.docs)
        return
    if args.overall:
        print(overall(args.docs, args.quantizer))
        return
    if args.budget_table:
        print(budget_table(args.docs, args.budget_table, args.quantizer))
        return
    if args.servability:
        print(servability_table(args.docs))
        return
    _prefect_defaults()
    for pair in args.pairs or PAIRS:
        print(run(pair, args.store, args.docs))


if __name__ == "__main__":
    main()
