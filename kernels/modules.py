"""torch modules that run experts straight from packed weights (torch + triton only).

A loaded expertbits model keeps every routed expert in the packed format of `packing.py` and
never materialises the experts of a layer in floating point at once:

* `PackedLinear` stands in for one `nn.Linear` (Switch Transformers' per-expert `wi` / `wo`);
* `PackedExperts` stands in for transformers 5's fused experts module (`gate_up_proj` [E, 2F, H],
  `down_proj` [E, H, F]) of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2/V3, with the same
  `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` and the same arithmetic:
  for each expert that received tokens, act(x Gᵀ) ⊙ (x Uᵀ), then Dᵀ, times the routing weight.

Each product x Wᵀ goes through `packed_linear`: on a CUDA tensor the Triton dequantize-matmul
kernel (dequantizes in registers), elsewhere the pure-torch reference, which dequantizes only
that one matrix, uses it and drops it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .packing import QuantizedTensor


def packed_linear(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``x[..., K] @ dequantize(q)[N, K]ᵀ`` in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.is_cuda:
        from .dequant_matmul import dequant_matmul

        y = dequant_matmul(x2.contiguous(), q)
    else:
        y = x2.float() @ q.dequantize().T
    return y.to(x.dtype).reshape(*shape[:-1], q.shape[0])


class _Packed(nn.Module):
    """Holds QuantizedTensors as non-persistent buffers, so `.to(device)` moves them and
    `state_dict()` never pretends they are floating-point weights."""

    def _store(self, prefix: str, q: QuantizedTensor) -> None:
        for part in ("packed", "scales", "zeros"):
            self.register_buffer(f"{prefix}_{part}", getattr(q, part), persistent=False)
        self._meta[prefix] = (q.bits, q.group_size, q.shape)

    def _load(self, prefix: str) -> QuantizedTensor:
        bits, group_size, shape = self._meta[prefix]
        return QuantizedTensor(*(getattr(self, f"{prefix}_{p}") for p in ("packed", "scales", "zeros")),
                               bits, group_size, shape)


class PackedLinear(_Packed):
    """A bias-free `nn.Linear` whose weight is a QuantizedTensor."""

    # models that peek at `linear.weight.dtype` to cast activations (T5/Switch) skip it for non-tensors
    weight = None

    def __init__(self, q: QuantizedTensor):
        super().__init__()
        self._meta: dict[str, tuple] = {}
        self._store("w", q)
        self.bits = q.bits
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self._load("w"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class PackedExperts(_Packed):
    """The routed experts of one MoE layer, each gate/up/down at its own bit-width.

    `experts[e]` is (gate [F, H], up [F, H], down [H, F]) as QuantizedTensors.
    """

    def __init__(self, experts: list[tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]],
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self._meta: dict[str, tuple] = {}
        self.num_experts = len(experts)
        self.bits = [g.bits for g, _, _ in experts]
        for e, (gate, up, down) in enumerate(experts):
            if gate.shape != up.shape or down.shape != (gate.shape[1], gate.shape[0]):
                raise ValueError(f"expert {e}: gate {gate.shape}, up {up.shape}, down {down.shape} do not form "
                                 "an [F, H], [F, H], [H, F] gated MLP")
            for role, q in (("gate", gate), ("up", up), ("down", down)):
                self._store(f"e{e}_{role}", q)
        self.act_fn = act_fn

    def expert(self, e: int) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        return tuple(self._load(f"e{e}_{role}") for role in ("gate", "up", "down"))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # some routers mark dropped slots with an out-of-range index
                continue
            token, slot = torch.where(top_k_index == e)
            gate, up, down = self.expert(e)
            x = hidden_states[token]
            h = self.act_fn(packed_linear(x, gate)) * packed_linear(x, up)
            y = packed_linear(h, down) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}"
