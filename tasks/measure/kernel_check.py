"""Stage 5: launch the Triton dequantize-matmul kernel on the packed weights and check it.

Two checks per quantized matrix, both against independent references:
  * kernel: y = x @ Wᵀ from the Triton kernel vs the pure-torch dequantize-then-matmul, on a
    seeded random x; relative error max|Δy| / max|y_ref| must stay under `rtol`;
  * weights, by the quantizer config.json names, so a corrupted or mis-packed file is caught,
    not just a bad kernel:
      (a rotated matrix, codes of W R, is checked against W R: kernels/hadamard.py)
      'half-step' (rtn): every dequantized weight lies within half a quantization step (+ fp16
                  rounding) of the original fp weight;
      'grid' (gptq, clipping search: codes are chosen, not rounded): no group's scale exceeds
                  the one round-to-nearest gives its original weights, and every dequantized
                  weight lies within that group's original range (with 0) widened by half a step.
                  Corrupted scales and zero points fail it; codes permuted within the range do
                  not (the packing itself is the one RTN runs exercise). Each matrix's weight
                  error relative to RTN's is reported beside it (`weight_error_ratio`).
On a machine without a GPU the kernel runs in the Triton interpreter (correct, slow: ~19 s for
one Mixtral-8x7B expert matrix), so there it runs on `INTERPRETER_ROWS` evenly spaced output rows
of each matrix (every row where there are fewer); the weight check always covers every weight.
Speed is measured only where a GPU exists.
"""

from __future__ import annotations

import itertools
import time
import zlib
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from expertbits.kernels.packing import QuantizedTensor

from ..checkpoints.reader import Checkpoint
from ..model.packed_folder import iter_quantized, quantization_config

Progress = Callable[[float, str], None]


def validate(qpath: Path, source: Path, *, batch: int = 8, rtol: float = 1e-4, seed: int = 0,
             progress: Progress | None = None) -> tuple[pd.DataFrame, dict]:
    """Per-matrix results and a summary; the caller decides what a failure means."""
    layers = sorted(quantization_config(qpath)["experts_modules"], key=int)
    parts = []
    with Checkpoint.open(source) as src:
        for i, _ in enumerate(layers):
            parts.append(validate_layer(qpath, src, i, batch=batch, rtol=rtol, seed=seed))
            if progress:
                progress((i + 1) / len(layers), f"validated layer {i + 1}/{len(layers)}")
    return summarize(parts, rtol)


def validate_layer(qpath: Path, src: Checkpoint, position: int, *, batch: int = 8, rtol: float = 1e-4,
                   seed: int = 0) -> dict:
    """Check every packed matrix of the `position`-th MoE layer (one unit of work: a Dask task), and
    with the first the packed dense layers (the whole-model budget); x is seeded per matrix, so a
    layer's result does not depend on which worker ran the others."""
    from expertbits.kernels.dequant_matmul import dequant_matmul, dequant_matmul_reference, interpreted

    device = "cuda" if torch.cuda.is_available() else "cpu"
    qc = quantization_config(qpath)
    layer = sorted(qc["experts_modules"], key=int)[position]
    quantizer = qc.get("quantizer", {"method": "rtn"})
    check = "half-step" if quantizer["method"] == "rtn" and not quantizer.get("clip") else "grid"
    rows, kernel_s = [], 0.0
    matrices = iter_quantized(qpath, layer=int(layer))
    if position == 0:
        matrices = itertools.chain(matrices, iter_quantized(qpath, dense=True))
    for name, info, q in matrices:  # one packed matrix in memory at a time
        n, k = q.shape
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        x = torch.randn(batch, k, generator=gen)
        kq = _rows(q, INTERPRETER_ROWS) if interpreted() else q
        ref = dequant_matmul_reference(x, kq)
        qd = kq.to(device)
        start = time.perf_counter()
        out = dequant_matmul(x.to(device), qd).cpu()
        kernel_s += time.perf_counter() - start
        err = float((out - ref).abs().max())
        rel = err / max(float(ref.abs().max()), 1e-30)
        original = src.read(info["source"]["key"], info["source"]["index"],
                            tuple(info["source"]["rows"]) if info["source"]["rows"] else None).float()
        if q.signs is not None:  # the codes are of W R: the weight checks hold in that basis
            original, q = q.rotate_input(original), q.stored()
        quant_ok = (_within_half_step(original, q) if check == "half-step"
                    else _on_grid(original, q, bool(quantizer.get("symmetric"))))
        rows.append({"name": name, "bits": q.bits, "rows": n, "cols": k, "kernel_rows": kq.shape[0], "max_abs_error": err,
                     "rel_error": rel, "weight_check": check, "quant_error_ok": quant_ok,
                     "weight_error_ratio": weight_error_ratio(original, q, bool(quantizer.get("symmetric"))),
                     "passed": rel <= rtol and quant_ok})
    return {"rows": rows, "kernel_seconds": kernel_s, "interpreted": interpreted(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def summarize(parts: list[dict], rtol: float) -> tuple[pd.DataFrame, dict]:
    """One report from the layers' parts; device and timing are those of the processes that ran
    the kernel (Dask workers may differ from the flow's machine)."""
    report = pd.DataFrame([r for p in parts for r in p["rows"]])
    devices = sorted({p["device"] for p in parts})
    interpreted = sorted({p["interpreted"] for p in parts})
    summary = {
        "matrices": len(report), "failed": int((~report.passed).sum()), "rtol": rtol,
        "max_rel_error": float(report.rel_error.max()), "max_abs_error": float(report.max_abs_error.max()),
        "device": devices[0] if len(devices) == 1 else ", ".join(devices),
        "triton_interpreter": interpreted[0] if len(interpreted) == 1 else "mixed",
        # interpreter timings say nothing about the kernel, so none are reported (nor a mixed sum)
        "kernel_seconds": round(sum(p["kernel_seconds"] for p in parts), 4) if interpreted == [False] else None,
    }
    return report, summary


INTERPRETER_ROWS = 256


def _rows(q: QuantizedTensor, count: int) -> QuantizedTensor:
    """`count` evenly spaced output rows of q (all of them if it has fewer), as a QuantizedTensor."""
    n = q.shape[0]
    if n <= count:
        return q
    idx = torch.linspace(0, n - 1, count).round().long().unique()
    return QuantizedTensor(q.packed[idx], q.scales[idx], q.zeros[idx], q.bits, q.group_size, (len(idx), q.shape[1]),
                           q.signs)


def _within_half_step(original: torch.Tensor, q) -> bool:
    deq = q.dequantize()
    scale = q.scales.float().repeat_interleave(q.group_size, dim=1)[:, : q.shape[1]]
    # half a step: quantize_rtn rounds the fp16 scale up, so the grid spans every group; the
    # rest is fp32 rounding of w / scale and of the reconstruction
    bound = scale * (0.5 + 1e-5) + original.abs() * 1e-6 + 1e-7
    return bool(((deq - original).abs() <= bound).all())


def _on_grid(original: torch.Tensor, q, symmetric: bool) -> bool:
    """Scales no larger than round-to-nearest's, every weight within its group's range ± half a step."""
    from expertbits.kernels.packing import _grouped, quantize_rtn

    rtn = quantize_rtn(original, q.bits, q.group_size, symmetric)
    if not bool((q.scales.float() <= rtn.scales.float()).all()):
        return False
    k, g = q.shape[1], q.group_size
    grouped = _grouped(original, g)[1]  # zero padding: the grid spans 0 anyway
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    if symmetric:
        lo, hi = torch.minimum(lo, -hi), torch.maximum(hi, -lo)
    expand = lambda t: t.repeat_interleave(g, dim=1)[:, :k]  # noqa: E731
    # half a step, plus what rounding the scale up to fp16 adds over the 2**bits - 1 steps of the
    # grid (an end code may sit that far past the range: one fp16 ulp of the scale per step,
    # subnormal scales included), plus fp32 rounding
    s16 = rtn.scales
    ulp = torch.nextafter(s16, torch.full_like(s16, float("inf"))).float() - s16.float()
    half = expand(s16.float() * (0.5 + 1e-5) + ((1 << q.bits) - 1) * ulp) + 1e-7
    deq = q.dequantize()
    slack = original.abs() * 1e-6
    return bool(((deq >= expand(lo) - half - slack) & (deq <= expand(hi) + half + slack)).all())


def weight_error_ratio(original: torch.Tensor, q, symmetric: bool) -> float:
    """‖W − Q‖² / ‖W − RTN(W)‖²: 1 for RTN, below 1 for the clipping search; GPTQ trades weight
    error for output error (1.6–3× on the zoo, more where a few inputs dominate). Reported, not
    judged: no threshold separates GPTQ on outlier-heavy inputs from codes scrambled within range."""
    from expertbits.kernels.packing import quantize_rtn

    rtn = quantize_rtn(original, q.bits, q.group_size, symmetric)
    error = float((q.dequantize() - original).double().square().sum())
    return error / max(float((rtn.dequantize() - original).double().square().sum()), 1e-30)
