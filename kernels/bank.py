"""How the fused MoE kernel finds every expert of a layer: `ExpertBank`, one buffer per matrix
role with per-expert offset and width tables (torch only: building and slicing a bank needs no
Triton), and which activations the kernel fuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import hadamard
from .packing import QuantizedTensor, packed_width

FUSED_ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.relu}


@dataclass(frozen=True)
class ExpertBank:
    """One matrix role (gate, up or down) of all E experts of a layer, packed back to back.

    Every expert's matrix has the same shape [N, K] and group size; each has its own width bₑ::

        packed  int32 | e0: N × words(b0) | e1: N × words(b1) | ... |   words(b) = ⌈K / ⌊32/b⌋⌉
                        ^ word_offset[0]   ^ word_offset[1]
        scales  fp16  | e0: N × G | e1: N × G | ... |                   G = ⌈K / group_size⌉
        zeros   uint8 | (same layout as scales)                         group_offset[e] = e·N·G

    Expert e's block is exactly the [N, words] / [N, G] arrays of its QuantizedTensor (see
    packing.py), so `expert(e)` is a view, and a bank holds no byte twice.

    A rotated bank (`signs`, int8 [K]: every expert's codes are of W R, hadamard.py) shares one
    rotation across its experts, so the kernel's caller rotates each input row once for all of them.
    """

    packed: torch.Tensor        # int32 [Σₑ N·words(bₑ)]
    scales: torch.Tensor        # fp16 [E·N·G]
    zeros: torch.Tensor         # uint8 [E·N·G]
    word_offset: torch.Tensor   # int64 [E]
    group_offset: torch.Tensor  # int64 [E]
    bits_table: torch.Tensor    # int32 [E]
    bits: tuple[int, ...]       # the same widths, on the host
    group_size: int
    shape: tuple[int, int]      # (N, K) of every expert's matrix
    signs: torch.Tensor | None = None  # int8 [K]: the input rotation every expert's codes were taken in

    @classmethod
    def stack(cls, experts: Sequence[QuantizedTensor]) -> "ExpertBank":
        """The bank of `experts` (one QuantizedTensor per expert, any widths; copies their bytes)."""
        if not experts:
            raise ValueError("an expert bank needs at least one expert")
        shape, group_size = tuple(experts[0].shape), experts[0].group_size
        for e, q in enumerate(experts):
            if tuple(q.shape) != shape or q.group_size != group_size:
                raise ValueError(f"expert {e} is {tuple(q.shape)} with group size {q.group_size}; every expert of a bank "
                                 f"must match expert 0's {shape} with group size {group_size}")
            if (q.signs is None) != (experts[0].signs is None) or (q.signs is not None and not q.signs.is_meta and
                                                                    not torch.equal(q.signs.to(experts[0].signs.device),
                                                                                    experts[0].signs)):
                raise ValueError(f"expert {e}'s input rotation differs from expert 0's; a bank's experts share one")
        n, k = shape
        words = [n * packed_width(k, q.bits) for q in experts]
        device = experts[0].packed.device
        word_offset = torch.tensor([0, *words[:-1]], dtype=torch.int64).cumsum(0)
        groups = n * -(-k // group_size)
        return cls(torch.cat([q.packed.reshape(-1) for q in experts]),
                   torch.cat([q.scales.reshape(-1) for q in experts]),
                   torch.cat([q.zeros.reshape(-1) for q in experts]),
                   word_offset.to(device), (torch.arange(len(experts), dtype=torch.int64) * groups).to(device),
                   torch.tensor([q.bits for q in experts], dtype=torch.int32, device=device),
                   tuple(q.bits for q in experts), group_size, shape, experts[0].signs)

    @property
    def num_experts(self) -> int:
        return len(self.bits)

    def expert(self, e: int) -> QuantizedTensor:
        """Expert e's matrix as a QuantizedTensor of views into the bank."""
        n, k = self.shape
        bits, g = self.bits[e], -(-k // self.group_size)
        w0, words = n * sum(packed_width(k, b) for b in self.bits[:e]), packed_width(k, bits)  # host-side: no sync
        return QuantizedTensor(self.packed[w0: w0 + n * words].view(n, words),
                               self.scales[e * n * g: (e + 1) * n * g].view(n, g),
                               self.zeros[e * n * g: (e + 1) * n * g].view(n, g), bits, self.group_size, self.shape,
                               self.signs)

    TENSORS = ("packed", "scales", "zeros", "word_offset", "group_offset", "bits_table")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The bank's tensors by field name (and `signs` when rotated)."""
        out = {f: getattr(self, f) for f in self.TENSORS}
        if self.signs is not None:
            out["signs"] = self.signs
        return out

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x R for the bank's rotation (x itself when it has none)."""
        return hadamard.rotate_input(x, self.signs)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "ExpertBank":
        """The same bank over other storage of the same tensors (e.g. moved to another device)."""
        return ExpertBank(**tensors, bits=self.bits, group_size=self.group_size, shape=self.shape)

    def to(self, device: torch.device | str) -> "ExpertBank":
        return self.with_tensors({f: t.to(device) for f, t in self.tensors().items()})

    @property
    def weight_bytes(self) -> int:
        """Bytes a pass over every expert reads: packed words, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros))


def activation_name(act: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The name in FUSED_ACTIVATIONS of the function `act` computes (checked on a probe, whatever
    its class), else None: the kernel fuses only these."""
    # explicit dtype and device: models are built under a default dtype and a meta device context
    probe = torch.linspace(-8, 8, 161, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        out = act(probe)
    for name, fn in FUSED_ACTIVATIONS.items():
        if out.shape == probe.shape and torch.allclose(out.float(), fn(probe), rtol=1e-5, atol=1e-6):
            return name
    return None
