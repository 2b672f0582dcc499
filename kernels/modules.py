"""torch modules that run experts straight from packed weights (torch + triton only).

A loaded expertbits model keeps every routed expert in the packed format of `packing.py` and
never materialises the experts of a layer in floating point at once:

* `PackedLinear` stands in for one `nn.Linear` (Switch Transformers' per-expert `wi` / `wo`);
* `PackedExperts` stands in for transformers 5's fused experts module (`gate_up_proj` [E, 2F, H],
  `down_proj` [E, H, F]) of Mixtral, Qwen2/3-MoE, OLMoE and DeepSeek-V2/V3, with the same
  `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])` and the same arithmetic:
  for each expert that received tokens, act(x Gᵀ) ⊙ (x Uᵀ), then Dᵀ, times the routing weight.

`LazyExperts` and `LazyLinear` are the same computations with weights (floating-point or packed)
read only when used: how a model larger than memory is run one layer at a time (tasks/model/streaming.py).

Each packed product x Wᵀ goes through `packed_linear`: on a CUDA tensor the Triton dequantize-matmul
kernel (dequantizes in registers), elsewhere the pure-torch reference, which dequantizes only
that one matrix, uses it and drops it.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .bank import ExpertBank, activation_name
from .packing import QuantizedTensor

log = logging.getLogger(__name__)


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """``x @ wᵀ`` for a floating-point weight or a packed one, in x's dtype."""
    if isinstance(w, QuantizedTensor):
        return packed_linear(x, w)
    return nn.functional.linear(x, w.to(x.dtype))


def packed_linear(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``x[..., K] @ dequantize(q)[N, K]ᵀ`` in x's dtype; a rotated q as (x R)(W R)ᵀ, its input
    rotated first (hadamard.py) and its codes read as stored."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.is_cuda:
        from .dequant_matmul import dequant_matmul  # rotates a rotated q's input itself

        y = dequant_matmul(x2.contiguous(), q)
    else:  # rotated in fp32, as the codes were taken
        y = q.rotate_input(x2.float()) @ q.stored().dequantize().T
    return y.to(x.dtype).reshape(*shape[:-1], q.shape[0])


def _as_buffer(name: str, t: torch.Tensor) -> torch.Tensor:
    """fp16 scales are kept as their int16 bit pattern: `model.float()` / `.bfloat16()` convert
    every floating buffer, and the format's scales must stay fp16 (bf16 would round them)."""
    return t.view(torch.int16) if name.endswith("scales") else t


def _from_buffer(name: str, t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float16) if name.endswith("scales") else t


class _Packed(nn.Module):
    """Holds QuantizedTensors as non-persistent buffers, so `.to(device)` moves them and
    `state_dict()` never pretends they are floating-point weights."""

    def _store(self, prefix: str, q: QuantizedTensor) -> None:
        for part in ("packed", "scales", "zeros", "signs"):
            self.register_buffer(f"{prefix}_{part}", _as_buffer(part, getattr(q, part)), persistent=False)
        self._meta[prefix] = (q.bits, q.group_size, q.shape)

    def _load(self, prefix: str) -> QuantizedTensor:
        bits, group_size, shape = self._meta[prefix]
        return QuantizedTensor(*(_from_buffer(p, getattr(self, f"{prefix}_{p}")) for p in ("packed", "scales", "zeros")),
                               bits, group_size, shape, getattr(self, f"{prefix}_signs"))


class PackedLinear(_Packed):
    """An `nn.Linear` whose weight is a QuantizedTensor; its bias, if any, an ordinary parameter
    (loaded with the model's other weights, as stored)."""

    # models that peek at `linear.weight.dtype` to cast activations (T5/Switch) skip it for non-tensors
    weight = None

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self._meta: dict[str, tuple] = {}
        self._store("w", q)
        self.bits = q.bits
        self.out_features, self.in_features = q.shape
        self.bias = _bias(bias, q.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self._load("w"))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _bias(bias: torch.Tensor | None, n: int) -> nn.Parameter | None:
    if bias is None:
        return None
    if tuple(bias.shape) != (n,):
        raise ValueError(f"a bias of shape {tuple(bias.shape)} for a linear layer of {n} outputs")
    return nn.Parameter(bias, requires_grad=False)


class GatedExperts(nn.Module):
    """The routed experts of one MoE layer as transformers 5's fused experts module computes them:
    `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`, and for each expert that
    received tokens act(x Gᵀ) ⊙ (x Uᵀ), then Dᵀ, times the routing weight.

    Subclasses say where expert e's (gate [F, H], up [F, H], down [H, F]) come from; each may be a
    tensor or a QuantizedTensor, and only one expert's weights are in hand at a time.
    `on_hidden(e, token, hidden)`, when set, sees each expert's hidden activation (calibration).
    """

    def __init__(self, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.num_experts, self.act_fn = num_experts, act_fn
        self.on_hidden: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None

    def expert(self, e: int) -> tuple:
        raise NotImplementedError

    def expert_for(self, e: int, x: torch.Tensor, weight: torch.Tensor) -> tuple:
        """Expert e's weights for its tokens x [T_e, H] routed with combine weights `weight` [T_e];
        a calibrating subclass may derive them from x."""
        return self.expert(e)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:  # some routers mark dropped slots with an out-of-range index
                continue
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            gate, up, down = self.expert_for(e, x, top_k_weights[token, slot])
            h = self.act_fn(linear(x, gate)) * linear(x, up)
            if self.on_hidden is not None:
                self.on_hidden(e, token, h)
            y = linear(h, down) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
            del gate, up, down  # before the next expert is read: one expert's weights at a time
        return out


class LazyExperts(GatedExperts):
    """Experts read when used: `load(e)` returns expert e's (gate, up, down) and they are dropped
    after its tokens are done, so a layer never holds more than one expert's weights."""

    def __init__(self, num_experts: int, act_fn: Callable[[torch.Tensor], torch.Tensor], load: Callable[[int], tuple]):
        super().__init__(num_experts, act_fn)
        self._read = load

    def expert(self, e: int) -> tuple:
        return self._read(e)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, weights read when used"


class LazyLinear(nn.Module):
    """An `nn.Linear` whose weight (a tensor or a QuantizedTensor) is read when used; its bias, if
    any, an ordinary parameter (the layer-by-layer runner loads it with its decoder layer)."""

    weight = None  # see PackedLinear

    def __init__(self, load: Callable[[], torch.Tensor | QuantizedTensor], shape: tuple[int, int],
                 bias: torch.Tensor | None = None):
        super().__init__()
        self._read = load
        self.out_features, self.in_features = shape
        self.bias = _bias(bias, shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self._read())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight read when used"


class PackedExperts(GatedExperts):
    """The routed experts of one MoE layer, each gate/up/down at its own bit-width, held packed in
    one `ExpertBank` per role (see fused_moe.py: `expert(e)` is a view into them).

    `experts[e]` is (gate [F, H], up [F, H], down [H, F]) as QuantizedTensors. On CUDA tensors the
    layer runs as the fused kernel's two launches (SiLU or ReLU experts); elsewhere, or for an
    activation the kernel does not fuse (a warning says so), as GatedExperts' per-expert loop.
    """

    ROLES = ("gate", "up", "down")

    def __init__(self, experts: list[tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]],
                 act_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(len(experts), act_fn)
        for e, (gate, up, down) in enumerate(experts):
            check_gated(e, gate.shape, up.shape, down.shape)
        self.bits = [g.bits for g, _, _ in experts]
        self.activation = activation_name(act_fn)
        self._layout: dict[str, dict] = {}  # widths, group size, shape: no tensors (those are the buffers)
        for i, role in enumerate(self.ROLES):
            bank = ExpertBank.stack([matrices[i] for matrices in experts])
            for field, t in bank.tensors().items():  # buffers, so `.to(device)` moves them
                self.register_buffer(f"{role}_{field}", _as_buffer(field, t), persistent=False)
            self._layout[role] = dict(bits=bank.bits, group_size=bank.group_size, shape=bank.shape)
        gate_signs, up_signs = (getattr(self, f"{role}_signs", None) for role in ("gate", "up"))
        if (gate_signs is None) != (up_signs is None) or (
                gate_signs is not None and not gate_signs.is_meta and not torch.equal(gate_signs, up_signs)):
            raise ValueError("gate and up read the same input and must share its rotation")

    def bank(self, role: str) -> ExpertBank:
        return ExpertBank(**{f: _from_buffer(f, getattr(self, f"{role}_{f}")) for f in ExpertBank.TENSORS},
                          signs=getattr(self, f"{role}_signs", None), **self._layout[role])

    def expert(self, e: int) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        return tuple(self.bank(role).expert(e) for role in self.ROLES)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if hidden_states.is_cuda and self.on_hidden is None:
            if self.activation is not None:
                from .fused_moe import fused_moe  # Triton only where it runs

                return fused_moe(hidden_states, top_k_index, top_k_weights, *(self.bank(r) for r in self.ROLES),
                                 self.activation)
            if not getattr(self, "_warned", False):
                self._warned = True
                log.warning("%s: the fused MoE kernel has no fused form of activation %r; these experts run one by "
                            "one through the dequantize-matmul kernel", self, self.act_fn)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, bits={self.bits}, activation={self.activation}"


def check_gated(e: int, gate: tuple, up: tuple, down: tuple) -> None:
    if tuple(gate) != tuple(up) or tuple(down) != (gate[1], gate[0]):
        raise ValueError(f"expert {e}: gate {tuple(gate)}, up {tuple(up)}, down {tuple(down)} do not form "
                         "an [F, H], [F, H], [H, F] gated MLP")
