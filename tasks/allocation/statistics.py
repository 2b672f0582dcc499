"""Stage 2: per-expert statistics, streamed from safetensors (the model is never instantiated).

For each MoE layer and routed expert s:
  Λ_s      = ‖w_s^ft‖₂ − ‖w_s^ref‖₂   (router row norms; signed difference of norms, not norm of
                                       the difference). Without a reference: ‖w_s^ft‖₂, the
                                       paper's proxy for checkpoints trained from scratch.
  MaxVar_s = max over rows r of W₁ of  (1/d) Σ_i (W₁[r,i] − mean_i W₁[r,·])²
             where W₁ is the expert's first-layer (gate / w1) matrix [F, H] (the paper's
             definition), and beside it the reference code's variant: the variance of the
             row of W₁ with the largest l2 norm (`maxvar_max_norm_row`).
Everything is computed in fp32. Allocated memory is bounded by one tensor plus a block of fp32
rows (benchmarks/bench_statistics.py measures it); the file pages read are the OS's to reclaim.
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from ..checkpoints.adapters import MoEModel, check_compatible, detect
from ..checkpoints.reader import Checkpoint, require_finite

Progress = Callable[[float, str], None]


def maxvar(w: torch.Tensor) -> float:
    """Maximum over rows of the (population) variance across the input dimension."""
    return float(w.float().var(dim=1, unbiased=False).max())


def row_variances(w: torch.Tensor, what: str = "tensor", block: int = 256) -> tuple[float, float]:
    """(max over rows of the row variance, variance of the largest-norm row) in fp32.

    Blocks of rows keep the fp32 temporaries small (a Mixtral w1 is 14336 rows) and in cache:
    256 rows of 4096 are 4 MiB of fp32, which stay in cache across the passes (1024-row blocks
    ran at half the speed). Two passes per block, mean then the norm of the centred rows, in
    place: exact like `torch.var_mean` and ~18× faster on CPU (its Welford kernel is
    compute-bound at ~0.3 GB/s of fp16 on one core here; this runs at ~5.5 GB/s, twice a plain
    copy of the same tensor). A NaN or Inf in a row makes
    its variance non-finite, so the full finiteness scan runs only when one is.
    ‖row‖² = K·(var + mean²), so the norms come from the same pass.
    """
    best_var, best_sq, var_at_best = -1.0, -1.0, 0.0
    k = w.shape[1]
    for start in range(0, w.shape[0], block):
        rows = w[start : start + block].to(torch.float32, copy=True)  # centred in place: never the caller's tensor
        mean = rows.sum(dim=1) / k
        var = torch.linalg.vector_norm(rows.sub_(mean[:, None]), dim=1).square_() / k
        if not (torch.isfinite(var).all() and torch.isfinite(mean).all()):
            require_finite(w, what)
        sq = var + mean.square()
        i = int(sq.argmax())
        if float(sq[i]) > best_sq:
            best_sq, var_at_best = float(sq[i]), float(var[i])
        best_var = max(best_var, float(var.max()))
    return best_var, var_at_best


def collect(ft: Checkpoint, ref: Checkpoint | None, progress: Progress | None = None) -> tuple[pd.DataFrame, dict]:
    """Statistics of every routed expert, as a DataFrame with the expert_stats columns."""
    model = detect(ft)
    rows = []
    for i, layer in enumerate(model.layers):
        rows += collect_layer(ft, ref, i)
        if progress:
            progress((i + 1) / len(model.layers), f"statistics: layer {layer.layer} done")
    return frame(rows), info_of(model)


def info_of(model: MoEModel) -> dict:
    return {"model_type": model.model_type, "layout": model.layout, "moe_layers": len(model.layers),
            "experts": model.layers[0].num_experts}


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows).astype({"reference_router_norm": "float64"})


def collect_layer(ft: Checkpoint, ref: Checkpoint | None, position: int) -> list[dict]:
    """The expert_stats rows of the `position`-th MoE layer: one unit of work (a Dask task)."""
    layer = detect(ft).layers[position]
    ref_norms = None
    if ref is not None:
        ref_model = detect(ref)
        check_compatible(detect(ft), ref_model, ft, ref)
        ref_router = ref.read(ref_model.layers[position].router_key).float()
        require_finite(ref_router, f"{ref.path}: {ref_model.layers[position].router_key}")
        ref_norms = ref_router.norm(dim=1)
    router = ft.read(layer.router_key).float()
    require_finite(router, f"{ft.path}: {layer.router_key}")
    norms = router.norm(dim=1)
    lam = norms - ref_norms if ref_norms is not None else norms
    # Stable sort, expert index breaks ties: the allocation must be reproducible.
    order = sorted(range(layer.num_experts), key=lambda e: (float(lam[e]), e))
    rank = {e: r for r, e in enumerate(order)}
    rows = []
    for m in layer.matrices:
        if m.role != "gate":
            continue
        w = ft.read(m.key, m.index, m.rows)
        e = m.expert
        var_max, var_max_norm_row = row_variances(w, f"{ft.path}: {m.name}")
        rows.append({
            "layer": layer.layer, "expert": e,
            "router_norm": float(norms[e]),
            "reference_router_norm": float(ref_norms[e]) if ref_norms is not None else None,
            "lambda_score": float(lam[e]),
            "lambda_source": "norm-change" if ref is not None else "final-norm-proxy",
            "maxvar": var_max,
            "maxvar_max_norm_row": var_max_norm_row,
            "lambda_rank": rank[e],
        })
    return rows
