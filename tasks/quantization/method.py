"""Which quantizer turns an expert matrix into codes: its configuration, and the data-free part.

    rtn    group-wise round-to-nearest (kernels/packing.quantize_rtn); data-free, per layer
    gptq   GPTQ per expert matrix with a Hessian from the tokens the router sends that expert, run
           sequentially over the layers (tasks/quantization/gptq_sequential.py); needs calibration text

`clip` adds the clipping search to the grid of each group (scan a shrink factor of the group's
range, keep the least-error one; the paper's reference code does this for RTN): for `rtn` by
the squared weight error, for `gptq` by the squared weight error weighted per input column by
the diagonal of the expert's Hessian, before GPTQ runs on that grid.

An expert that GPTQ cannot calibrate (fewer than `min_tokens` routed tokens) is rounded by
`round_matrix` instead, reported in the coverage table, and never zeroed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from expertbits.kernels.packing import QuantizedTensor, quantize_clipped, quantize_rtn

from ..errors import ExpertbitsError

METHODS = ("rtn", "gptq")
GPTQ_OPTIONS = ("damp", "act_order", "min_tokens", "weighted")


@dataclass(frozen=True)
class QuantizerConfig:
    method: str = "rtn"
    symmetric: bool = False  # every zero point at the middle code: exports without zero points
    clip: bool = False  # clipping search of each group's range
    damp: float = 0.01  # GPTQ: dampening, a fraction of the mean Hessian diagonal
    # the two GPTQ defaults were measured on the zoo's Mixtral and Qwen WordNet pairs (README, "GPTQ"):
    # each lowers KL at 2 and 3 bits, together by 12-18%
    act_order: bool = True  # GPTQ: columns in order of decreasing Hessian diagonal
    min_tokens: int = 16  # GPTQ: experts routed fewer calibration tokens fall back to `round_matrix`
    weighted: bool = True  # GPTQ: each token's Hessian term weighted by its routing weight

    def __post_init__(self):
        if self.method not in METHODS:
            raise ExpertbitsError(f"unknown quantizer {self.method!r}", f"choose one of {', '.join(METHODS)}", "quantizer")
        if not 0 < self.damp < 1:
            raise ExpertbitsError(f"GPTQ dampening {self.damp} is outside (0, 1)",
                                  "give a fraction of the mean Hessian diagonal, e.g. 0.01", "gptq_damp")
        if self.min_tokens < 1:
            raise ExpertbitsError(f"min_tokens must be at least 1, got {self.min_tokens}", "e.g. 16", "gptq_min_tokens")

    @property
    def calibrated(self) -> bool:
        """Whether quantization itself needs calibration text (not only the allocator)."""
        return self.method == "gptq"

    @property
    def label(self) -> str:
        """Short name for tables: 'rtn', 'gptq', 'rtn+clip+sym', ..."""
        return self.method + ("+clip" if self.clip else "") + ("+sym" if self.symmetric else "")

    @property
    def data_free(self) -> "QuantizerConfig":
        """What this quantizer falls back to without calibration data: RTN, with its clip and symmetry."""
        return QuantizerConfig(symmetric=self.symmetric, clip=self.clip)

    def round_matrix(self, w: torch.Tensor, bits: int, group_size: int,
                     importance: torch.Tensor | None = None) -> QuantizedTensor:
        """The data-free quantizer: RTN, or RTN with the clipping search (weighted by `importance`)."""
        if self.clip:
            return quantize_clipped(w, bits, group_size, self.symmetric, importance=importance)
        return quantize_rtn(w, bits, group_size, self.symmetric)

    def as_dict(self) -> dict:
        """What changes the codes this quantizer writes (cache keys, config.json): GPTQ's options only for GPTQ."""
        d = asdict(self)
        if not self.calibrated:
            for name in GPTQ_OPTIONS:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantizerConfig":
        return cls(**(d or {}))
