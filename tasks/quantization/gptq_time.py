"""How long GPTQ will take on this CPU, said before it starts.

GPTQ of one matrix W [N, K] factorises its K × K Hessian three times (Cholesky, inverse from the
factor, Cholesky of the inverse: about 4/3·K³ floating-point operations) and updates the N × K
weights column by column (about 2·N·K²), plus a Python step per column. At real size that is
hours on a CPU: Mixtral-8x7B's down projection (4096 × 14336) alone is 6·10¹² operations. The
estimate counts those operations for every routed expert matrix, times the passes the run makes
(the calibration stage quantizes every expert at every width for the error-based allocators, then
the quantization stage once), at the rate a probe of this machine's float32 matrix product gives.
The probe runs a dense product (BLAS, at the process's thread count) for about 0.1 s. GPTQ's
factorisations and narrow column updates run at a fraction of that rate, `EFFICIENCY`: measured on
one thread, GPTQ of a 768 × 2048 matrix took 1.79 s and of a 2048 × 4096 one 9.93 s, 4.2 and 2.9
times the operation count at the probe's rate (48 GFLOP/s).
"""

from __future__ import annotations

import time

import torch

COLUMN_SECONDS = 25e-6  # the per-column Python step of kernels/gptq.py
EFFICIENCY = 0.3  # GPTQ's share of the probe's rate (see above: 0.24 and 0.34 measured)


def flops(n: int, k: int) -> float:
    return 4 / 3 * k**3 + 2 * n * k**2


def probe_rate(size: int = 1024, repeats: int = 3) -> float:
    """float32 operations per second of a size³ matrix product on this process's threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm the BLAS up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / max(time.perf_counter() - start, 1e-9)


def estimate_seconds(shapes: list[tuple[int, int]], passes: int, rate: float) -> float:
    """Seconds of GPTQ for matrices of `shapes` (N, K), each quantized `passes` times, at `rate` flop/s."""
    return passes * sum(flops(n, k) / (rate * EFFICIENCY) + k * COLUMN_SECONDS for n, k in shapes)


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
