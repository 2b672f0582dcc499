"""lm-evaluation-harness on the shipped quantized model and on the full-precision checkpoint it
was made from, side by side: the numbers papers report (piqa, arc, mmlu, ...), from the artifact a
user gets.

Each model is loaded whole, one after the other (the full-precision one is released before the
quantized one loads): the quantized folder through `expertbits.load`, exactly as a user loads it,
its experts running from their packed weights; the checkpoint through transformers. lm-eval gets
each as `HFLM(pretrained=<model>, tokenizer=<tokenizer>)`, the documented way to hand it a model
object, so a plain `lm_eval` user can do the same (docs/evaluation.md).

Tasks are found in lm-eval's own registry, in the zoo's task folder (`ZOO_TASKS`: supersense
multiple choice and a perplexity task per held-out text, all read from files expertbits ships)
and in the user's `include_path`. A task whose dataset cannot be had (offline, not in the
datasets cache) is an error naming the task and the fix before either model is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pandas as pd

from ..errors import ExpertbitsError
from ..placement import CPU, Placement

Progress = Callable[[float, str], None]
COLUMNS = ("task", "metric", "fp", "fp_stderr", "quant", "quant_stderr", "diff", "higher_is_better", "samples")
OFFLINE_FIX = ("for a standard task, fill the datasets cache on a machine with network (run the same tasks there once, "
               "or `python -c \"from lm_eval.tasks import TaskManager, get_task_dict; get_task_dict(['TASK'], "
               "TaskManager())\"`), copy ~/.cache/huggingface to this machine and set HF_DATASETS_OFFLINE=1; or give "
               "a task folder over local files with --include-path (docs/evaluation.md)")


def zoo_tasks() -> Path:
    """The zoo's lm-eval task folder (expertbits_supersense, expertbits_ppl_<text>)."""
    from expertbits import zoo

    return Path(zoo.__file__).parent / "lm_eval_tasks"


def folder_digest(folder: str | Path | None) -> str | None:
    """A folder's files by content (names and bytes): an edited task or data file is a new digest."""
    if folder is None:
        return None
    root, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def tasks_digest(include_path: str | None = None) -> list[str | None]:
    """What the tasks' results depend on beside code and library versions, for cache keys: the
    zoo's task folder, the texts its tasks read (its corpora by their manifest), the user's folder."""
    from expertbits import zoo

    root = Path(zoo.__file__).parent
    return [folder_digest(zoo_tasks()), folder_digest(root / "text"),
            hashlib.sha256((root / "corpora" / "MANIFEST.sha256").read_bytes()).hexdigest(), folder_digest(include_path)]


def require_lm_eval() -> None:
    """lm-eval is the optional `eval` extra: a clear error where it is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ExpertbitsError(f"lm-evaluation-harness is not installed ({e})",
                              'pip install -c infra/constraints.txt -e ".[eval]" (or pip install "lm-eval[hf]")',
                              "lm_eval_tasks") from e


@dataclass(frozen=True)
class HarnessConfig:
    """What lm-eval runs: task names (lm-eval's, the zoo's or the include path's), at most `limit`
    examples of each, `num_fewshot` examples in each prompt (None: each task's own default)."""
    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: str | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.tasks or any(not t or "," in t for t in self.tasks):
            raise ExpertbitsError(f"lm-eval tasks {list(self.tasks)!r}: give one or more task names",
                                  "--tasks expertbits_supersense,arc_easy (comma-separated)", "lm_eval_tasks")
        if self.limit is not None and self.limit < 1:
            raise ExpertbitsError(f"--limit {self.limit}: must be at least 1", "leave it out for every example", "lm_eval_limit")
        if self.batch_size < 1:
            raise ExpertbitsError(f"--batch-size {self.batch_size}: must be at least 1", "give 1 or more", "lm_eval_batch_size")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d


def task_manager(include_path: str | None = None):
    """lm-eval's task index over its own tasks, the zoo's and `include_path`'s. Indexing lm-eval's
    hundreds of task folders takes seconds, so one index is kept per folder content."""
    require_lm_eval()
    _quiet()
    if include_path is not None and not Path(include_path).is_dir():
        raise ExpertbitsError(f"--include-path {include_path}: no such folder",
                              "give a folder of lm-eval task YAMLs", "lm_eval_include_path")
    resolved = str(Path(include_path).resolve()) if include_path else None
    return _indexed(resolved, folder_digest(resolved))


@lru_cache(maxsize=8)
def _indexed(include_path: str | None, _content: str | None):  # _content: an edited folder is indexed again
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(zoo_tasks())] + ([include_path] if include_path else []), include_defaults=True)


def check_tasks(config: HarnessConfig, manager=None, datasets: bool = True) -> None:
    """Every task is known and (with `datasets`) its dataset loads: else an ExpertbitsError naming
    the task and the fix, before any model is loaded (never a trace from inside `datasets`)."""
    manager = manager or task_manager(config.include_path)
    known = set(manager.all_tasks)
    for name in config.tasks:
        if name not in known:
            where = "lm-eval's tasks, the zoo's" + (
                f" or those in {config.include_path}" if config.include_path else " or an --include-path's")
            raise ExpertbitsError(f"lm-eval task {name!r}: not among {where}",
                                  "check the name (`lm_eval ls tasks` lists lm-eval's; the zoo's are "
                                  f"{', '.join(sorted(p.stem for p in zoo_tasks().glob('*.yaml')))}), or add "
                                  "its YAML folder with --include-path", "lm_eval_tasks")
        if not datasets:
            continue
        try:
            manager.load([name])
        except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExpertbitsError(f"lm-eval task {name!r}: its dataset could not be loaded ({type(e).__name__}: {first})",
                                  OFFLINE_FIX.replace("TASK", name), "lm_eval_tasks") from e


def _quiet() -> None:
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run(model, tokenizer, config: HarnessConfig, device: str = "cpu", manager=None) -> tuple[list[dict], dict]:
    """lm-eval's results for one loaded model: rows of (task, metric, value, stderr,
    higher_is_better, samples), and lm-eval's own results dict (its configs and versions)."""
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=config.batch_size)
    if lm.device.type == "meta":
        # HFLM takes a model object's device from its weights; a streamed model (model/streaming.py,
        # the league's cells) keeps them on `meta` between forwards and computes on `device`
        lm._device = torch.device(device)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(config.tasks), num_fewshot=config.num_fewshot, limit=config.limit,
        task_manager=manager or task_manager(config.include_path), log_samples=False, bootstrap_iters=1000,
        random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
        fewshot_random_seed=config.seed)
    rows = []
    for task, metrics in out["results"].items():
        better = out.get("higher_is_better", {}).get(task, {})
        samples = out.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "name", "sample_len", "sample_count") or name.endswith("_stderr") \
                    or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"task": task, "metric": name if filt in ("", "none") else f"{name} ({filt})",
                         "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "higher_is_better": better.get(name), "samples": samples})
    return rows, {k: out.get(k) for k in ("results", "configs", "versions", "n-shot", "n-samples")}


def side_by_side(fp_rows: list[dict], q_rows: list[dict]) -> pd.DataFrame:
    """One row per (task, metric): both models' value and stderr and quant − fp."""
    fp = {(r["task"], r["metric"]): r for r in fp_rows}
    rows = []
    for r in q_rows:
        f = fp.get((r["task"], r["metric"]))
        if f is None:
            raise ExpertbitsError(f"lm-eval reported {r['task']} {r['metric']} for the quantized model only",
                                  "a task whose metrics depend on the model cannot be compared; report it upstream")
        rows.append({"task": r["task"], "metric": r["metric"], "fp": f["value"], "fp_stderr": f["stderr"],
                     "quant": r["value"], "quant_stderr": r["stderr"], "diff": r["value"] - f["value"],
                     "higher_is_better": r["higher_is_better"], "samples": r["samples"]})
    return pd.DataFrame(rows, columns=list(COLUMNS)).sort_values(["task", "metric"]).reset_index(drop=True)


def compare(fp_path: Path, q_path: Path, config: HarnessConfig, placement: Placement = CPU,
            progress: Progress | None = None) -> tuple[pd.DataFrame, dict]:
    """lm-eval on the full-precision checkpoint, then on the quantized folder as shipped:
    (the side-by-side table, {"fp": raw, "quant": raw, "seconds": {...}})."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..model.load import load

    manager = task_manager(config.include_path)
    check_tasks(config, manager)
    raw, seconds = {}, {}
    for i, which in enumerate(("fp", "quant")):
        if progress:
            progress(i / 2, f"lm-eval on the {'full-precision' if which == 'fp' else 'quantized'} model: "
                            f"{', '.join(config.tasks)}")
        start = time.perf_counter()
        if which == "fp":
            tokenizer = AutoTokenizer.from_pretrained(fp_path, trust_remote_code=False)
            from transformers import AutoConfig

            seq2seq = getattr(AutoConfig.from_pretrained(fp_path), "is_encoder_decoder", False)
            auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
            model = auto.from_pretrained(fp_path, dtype=placement.torch_dtype, trust_remote_code=False)
            model.to(placement.device).eval()
        else:
            model, tokenizer = load(q_path, dtype=placement.torch_dtype, device=placement.device)
        try:
            with torch.no_grad():
                rows, raw[which] = run(model, tokenizer, config, placement.device, manager)
        finally:
            del model
            gc.collect()  # the full-precision model's memory, reference cycles included, before the next loads
            if placement.is_cuda:
                torch.cuda.empty_cache()
        raw[which]["rows"] = rows
        seconds[which] = time.perf_counter() - start
    if progress:
        progress(1.0, "lm-eval done")
    table = side_by_side(raw["fp"]["rows"], raw["quant"]["rows"])
    bad = table[~table[["fp", "quant"]].map(lambda v: math.isfinite(v)).all(axis=1)]
    if len(bad):
        raise ExpertbitsError(f"lm-eval gave non-finite results: {bad.to_dict(orient='records')}",
                              "a non-finite score means a broken model; check the run's KL first")
    return table, {"fp": raw["fp"], "quant": raw["quant"], "seconds": seconds, "config": config.as_dict()}


def markdown(table: pd.DataFrame) -> str:
    """The side-by-side table as markdown: value ± stderr for each model, and the difference."""
    def num(v: float, sign: str = "") -> str:  # word perplexities of a tiny model run to 1e13
        return f"{v:{sign}.4e}" if abs(v) >= 1e5 else f"{v:{sign}.4f}"

    def cell(v, s):
        return num(v) + (f" ± {num(s)}" if s is not None and not pd.isna(s) else "")

    lines = ["| task | metric | full precision | quantized | difference | samples |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.task} | {r.metric} | {cell(r.fp, r.fp_stderr)} | {cell(r.quant, r.quant_stderr)} | "
                     f"{num(r.diff, '+')} | {'' if pd.isna(r.samples) else int(r.samples)} |")
    return "\n".join(lines) + "\n"
