"""expertbits: each routed expert of a Mixture-of-Experts model at its own bit-width.

The repository root is the package `expertbits` (pyproject maps it here; `flows`, `tasks` and
`kernels` are its subpackages), and this file is its public API: the quantized model, and the
pipeline's steps on local folders without Prefect. They call the library code the Prefect flow
runs (`expertbits quantize` adds caching, retries, a store and a Dask cluster), and give the
tables and the folder it publishes, byte for byte (tests/flow/test_steps.py).

    import expertbits

    stats = expertbits.statistics("my-moe", reference="my-base")         # Λ and MaxVar per expert
    calib = expertbits.calibrate("my-moe", text)                          # routing and error per width
    alloc = expertbits.allocate(stats, calibration=calib, avg_bits=2.5)  # bits per expert
    expertbits.quantize("my-moe", alloc, "my-moe-2.5b")                   # the quantized folder
    expertbits.evaluate("my-moe", "my-moe-2.5b", held_out)               # KL and perplexity
    model, tokenizer = expertbits.load("my-moe-2.5b")

Importing expertbits imports neither torch nor Prefect; each function imports what it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotations only: importing expertbits stays cheap
    import pandas as pd

__all__ = ["load", "statistics", "calibrate", "allocate", "quantize", "evaluate", "Calibration"]

# The defaults of `expertbits quantize` (flows/params.py), so that the steps and the flow agree.
BIT_WIDTHS = (2, 3, 4)
GROUP_SIZE = 64
SEQ_LEN = 256
WINDOWS = 16


def load(path: str | Path, *, dtype="auto", device=None):
    """(model, tokenizer) of a quantized folder (a run's `quantization/`, or `quantize`'s `out`).

    The model is a transformers model (causal LM, or seq2seq for Switch Transformers) whose routed
    experts run from their packed weights; `dtype` and `device` are as in `from_pretrained`."""
    from expertbits.tasks.model.load import load as _load

    return _load(path, dtype=dtype, device=device)


def statistics(checkpoint: str | Path, reference: str | Path | None = None) -> pd.DataFrame:
    """Λ and MaxVar of every routed expert: one row per (layer, expert), the `expert_stats` table.

    `reference` is the checkpoint the fine-tune started from (same routers); without it Λ is the
    final router row's norm. Tensors are streamed from safetensors; the model is never built."""
    from expertbits.tasks.allocation.statistics import collect
    from expertbits.tasks.checkpoints.reader import Checkpoint
    from expertbits.tasks.checkpoints.reference import check
    from expertbits.tasks.records import ReferenceChoice

    if reference is None:
        with Checkpoint.open(checkpoint) as ft:
            return collect(ft, None)[0]
    given = ReferenceChoice(uri=str(reference), source="given", reason="as given", note="")
    check(str(checkpoint), Path(checkpoint), given, Path(reference))  # the same routers, or a clear error
    with Checkpoint.open(checkpoint) as ft, Checkpoint.open(reference) as ref:
        return collect(ft, ref)[0]


class Calibration(tuple):
    """`calibrate`'s result, (routing, errors): `routing` has one row per expert (tokens routed,
    routing weight, Hessian trace), `errors` one per expert and width (the quantizer's error)."""

    @property
    def routing(self) -> pd.DataFrame:
        return self[0]

    @property
    def errors(self) -> pd.DataFrame:
        return self[1]


def calibrate(checkpoint: str | Path, text: str, *, bit_widths: tuple[int, ...] = BIT_WIDTHS,
              group_size: int = GROUP_SIZE, quantizer: str = "gptq", seq_len: int = SEQ_LEN,
              windows: int = WINDOWS, device: str = "auto", **quantizer_options) -> Calibration:
    """What the routers do on `text` (the text itself, not a path) and what each expert loses at
    each width: the input of the routing- and error-based allocators (`routed-error`, the
    default, among them).

    Give the quantizer you will pass to `quantize`, with the same options (`symmetric`, `clip`,
    `rotate`, and for GPTQ `damp`, `act_order`, `min_tokens`, `weighted`): the errors are that
    quantizer's, as the flow measures them for the allocators that read errors. As in the flow,
    GPTQ is the default and rotates unless `rotate=False`; RTN does not unless `rotate=True`. `device` is as in
    `expertbits quantize --device`: auto (a GPU if there is one), cpu, cuda or cuda:N."""
    from expertbits.tasks.allocation.calibrate import calibrate as _calibrate
    from expertbits.tasks.placement import of_checkpoint

    calib, qerr, _ = _calibrate(Path(checkpoint), text, seq_len=seq_len, windows=windows,
                                bit_widths=tuple(sorted(bit_widths)), group_size=group_size,
                                quantizer=_quantizer(quantizer, quantizer_options),
                                placement=of_checkpoint(device, checkpoint))
    return Calibration((calib, qerr))


def _quantizer(method: str, options: dict):
    from dataclasses import fields

    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.quantization.method import QuantizerConfig

    known = {f.name for f in fields(QuantizerConfig)} - {"method"}
    if unknown := sorted(set(options) - known):
        raise ExpertbitsError(f"unknown quantizer options {unknown}", f"give any of {sorted(known)}", "quantizer")
    return QuantizerConfig(method=method, **{"rotate": method == "gptq", **options})  # the flow's default rotation


def allocate(stats: pd.DataFrame, *, avg_bits: float = 2.5, allocator: str = "auto",
             calibration: Calibration | None = None, bit_widths: tuple[int, ...] = BIT_WIDTHS,
             **options) -> pd.DataFrame:
    """Bits per routed expert: one row per (layer, expert) with its bits and why.

    `allocator` is any of `expertbits quantize --allocator`'s choices; those that use routing or
    error need `calibration`. `auto`, as in the flow: `output-error` when the calibration's errors
    are GPTQ's (they carry the expert output error), else `routed-error`. `options` are the other
    fields of the allocation configuration (`zeta`, `scheme`, `granularity`, `scope`,
    `maxvar_definition`, `seed`); `scope` defaults as the flow's `--budget-scope auto`: `model`
    for `output-error` with per-expert widths, else `layer`."""
    from expertbits.tasks.allocation.allocate import allocate as _allocate
    from expertbits.tasks.allocation.allocators import ALLOCATORS, NEEDS_CALIBRATION, NEEDS_ERROR, NEEDS_GPTQ, check
    from expertbits.tasks.allocation.budget import AllocationConfig
    from expertbits.tasks.errors import BudgetError

    if allocator == "auto":
        errors = calibration.errors if calibration is not None else None
        gptq = errors is not None and "output_error" in errors and errors["output_error"].notna().all()
        allocator = "output-error" if gptq else "routed-error"
    options.setdefault("scope", "model" if allocator in NEEDS_GPTQ and options.get("granularity", "expert") == "expert"
                       else "layer")
    cfg = check(AllocationConfig(avg_bits=avg_bits, bit_widths=tuple(bit_widths), allocator=allocator, **options))
    if calibration is None and allocator in NEEDS_CALIBRATION | NEEDS_ERROR:
        raise BudgetError(f"allocator {allocator!r} reads routing{' and quantization error' if allocator in NEEDS_ERROR else ''}"
                          ", and no calibration was given",
                          "pass calibration=expertbits.calibrate(checkpoint, text, bit_widths=...), or choose an "
                          f"allocator that needs none ({', '.join(sorted(ALLOCATORS.keys() - NEEDS_CALIBRATION - NEEDS_ERROR))})",
                          "calibration")
    calib, qerr = calibration if calibration is not None else (None, None)
    if allocator in NEEDS_ERROR and not set(cfg.bit_widths) <= set(qerr.bits):
        raise BudgetError(f"the calibration measured widths {sorted(set(qerr.bits))}, not all of {list(cfg.bit_widths)}",
                          f"calibrate with bit_widths={tuple(cfg.bit_widths)}", "bit_widths")
    return _allocate(stats, cfg, calib, qerr)


def quantize(checkpoint: str | Path, allocation: pd.DataFrame, out: str | Path, *, group_size: int = GROUP_SIZE,
             quantizer: str = "gptq", text: str | None = None, seq_len: int = SEQ_LEN, windows: int = WINDOWS,
             device: str = "auto", dense_bits: int | None = None, dense_override: tuple[str, ...] = (),
             **quantizer_options) -> dict:
    """Write the quantized folder of `checkpoint` into `out` and return its summary.

    `quantizer="gptq"` (the default, as in the flow) calibrates each expert on the tokens its router
    sends it from `text`, layer after layer; `quantizer="rtn"` needs no text. `quantizer_options`
    are as in `calibrate` (GPTQ rotates unless `rotate=False`). `dense_bits` and `dense_override`
    (GPTQ only) quantize the dense linear layers too, as `--dense-bits` and `--dense-override`
    (tasks/quantization/dense.py). The folder is what `load` reads and
    `expertbits export` converts. It is written beside `out` and renamed into place when complete:
    `out` must not exist, and a failure leaves nothing there. `device` is as in `calibrate`."""
    import shutil
    import uuid

    from expertbits.tasks.errors import ExpertbitsError
    from expertbits.tasks.placement import of_checkpoint
    from expertbits.tasks.quantization.writer import quantize_checkpoint

    from expertbits.tasks.quantization.dense import DenseWidths

    q, out = _quantizer(quantizer, quantizer_options), Path(out)
    dense = DenseWidths.parse(dense_bits, dense_override)
    if dense.active and not q.calibrated:
        raise ExpertbitsError("dense_bits quantizes the dense layers with GPTQ", "pass quantizer='gptq', or drop dense_bits",
                              "dense_bits")
    if out.exists():
        raise ExpertbitsError(f"{out} already exists", "name a new folder, or remove this one", "out")
    if q.calibrated and text is None:
        raise ExpertbitsError("GPTQ needs calibration text", "pass text=..., or quantizer='rtn'", "text")
    placement = of_checkpoint(device, checkpoint)
    partial = out.with_name(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if q.calibrated:
            from expertbits.tasks.quantization.gptq_sequential import quantize_checkpoint_gptq

            summary = quantize_checkpoint_gptq(Path(checkpoint), allocation, group_size, q, text, partial,
                                               seq_len=seq_len, windows=windows, dense=dense, placement=placement)
        else:
            summary = quantize_checkpoint(Path(checkpoint), allocation, group_size, partial,
                                          quantizer=lambda m, w, bits: q.round_matrix(w.to(placement.device), bits,
                                                                                      group_size),
                                          symmetric=q.symmetric, config=q.as_dict())
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def evaluate(checkpoint: str | Path, quantized: str | Path, text: str, *, seq_len: int = SEQ_LEN,
             windows: int = WINDOWS, device: str = "auto") -> dict:
    """Token-level KL(full precision ‖ quantized) and the perplexity of both on held-out `text`,
    the quantized model run from its folder's own bytes (on a GPU as it is served: loaded, its
    experts through the fused kernel). `device` is as in `calibrate`."""
    from expertbits.tasks.measure.evaluate import evaluate as _evaluate
    from expertbits.tasks.placement import of_checkpoint

    return _evaluate(Path(checkpoint), Path(quantized), text, seq_len=seq_len, windows=windows,
                     placement=of_checkpoint(device, checkpoint))
