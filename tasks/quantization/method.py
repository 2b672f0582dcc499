"""Which quantizer turns an expert matrix into codes: its configuration, and the data-free part.

    rtn    group-wise round-to-nearest (kernels/packing.quantize_rtn); data-free, per layer
    gptq   GPTQ per expert matrix with a Hessian from the tokens the router sends that expert, run
           sequentially over the layers (tasks/quantization/gptq_sequential.py); needs calibration text

`rotate` quantizes each expert matrix in a rotated basis, W R with R a signed Hadamard on its
input dimension (kernels/hadamard.py), and the model rotates that matrix's input at run time;
the codes carry the rotation's signs, so every reader computes x Wᵀ = (x R)(W R)ᵀ. For GPTQ the
Hessian is rotated with it (Rᵀ H R). An input dimension with no power-of-two block of at least
16 is left unrotated.

`clip` adds the clipping search to the grid of each group (scan a shrink factor of the group's
range, keep the least-error one; the paper's reference code does this for RTN): for `rtn` by
the squared weight error, for `gptq` by the squared weight error weighted per input column by
the diagonal of the expert's Hessian, before GPTQ runs on that grid.

An expert that GPTQ cannot calibrate (fewer than `min_tokens` routed tokens) is rounded by
`round_matrix` instead, reported in the coverage table, and never zeroed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from expertbits.kernels import hadamard
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
    rotate: bool = False  # every expert matrix quantized as W R, R a signed Hadamard on its inputs

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
        return (self.method + ("+rot" if self.rotate else "") + ("+clip" if self.clip else "")
                + ("+sym" if self.symmetric else ""))

    @property
    def data_free(self) -> "QuantizerConfig":
        """What this quantizer falls back to without calibration data: RTN, with its rotation, clip and symmetry."""
        return QuantizerConfig(symmetric=self.symmetric, clip=self.clip, rotate=self.rotate)

    def signs(self, k: int) -> torch.Tensor | None:
        """The rotation signs of an input dimension of k, or None where this quantizer does not rotate it."""
        return hadamard.signs(k) if self.rotate and hadamard.rotatable(k) else None

    def round_matrix(self, w: torch.Tensor, bits: int, group_size: int,
                     importance: torch.Tensor | None = None) -> QuantizedTensor:
        """The data-free quantizer: RTN, or RTN with the clipping search (weighted by `importance`,
        per input column; a rotated matrix's columns are mixed, so its search is unweighted)."""
        s = self.signs(w.shape[1])
        if s is not None:  # rotated in fp32 whatever w's dtype: the codes are of the exact W R, as validation checks
            return replace(self._round(hadamard.rotate(w.float(), s), bits, group_size, None), signs=s.to(w.device))
        return self._round(w, bits, group_size, importance)

    def gptq_matrix(self, w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int) -> QuantizedTensor:
        """GPTQ of w [N, K] against its inputs' Gram matrix h [K, K]; rotated, of W R against Rᵀ H R."""
        from expertbits.kernels.gptq import gptq

        s = self.signs(w.shape[1])
        if s is not None:
            s = s.to(w.device)
            w, h = hadamard.rotate(w.float(), s), hadamard.rotate_hessian(h, s)
        q = gptq(w, h, bits, group_size, symmetric=self.symmetric, damp=self.damp, act_order=self.act_order, clip=self.clip)
        return q if s is None else replace(q, signs=s)

    def _round(self, w, bits, group_size, importance) -> QuantizedTensor:
        if self.clip:
            return quantize_clipped(w, bits, group_size, self.symmetric, importance=importance)
        return quantize_rtn(w, bits, group_size, self.symmetric)

    def as_dict(self) -> dict:
        """What changes the codes this quantizer writes (cache keys, config.json): GPTQ's options only
        for GPTQ; `rotate` only when set, so an unrotated run's keys and files are what they were."""
        d = asdict(self)
        if not self.calibrated:
            for name in GPTQ_OPTIONS:
                del d[name]
        if not self.rotate:
            del d["rotate"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "QuantizerConfig":
        return cls(**(d or {}))
