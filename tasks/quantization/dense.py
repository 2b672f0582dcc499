"""The whole-model budget: the dense linear layers (attention, shared experts, dense MLPs and,
when asked, the head) quantized by GPTQ beside the routed experts, into the same packed format.

    --dense-bits 4                          every linear layer of every decoder layer at 4 bits,
                                            except the gates (kept as stored: the routers, which the
                                            allocation reads, and Qwen's shared-expert gate; they
                                            decide routing and are a few thousand weights)
    --dense-override '*.o_proj=8,*.shared_expert.*=keep,lm_head=8'
                                            a width for the modules a glob matches (the module
                                            names of the model transformers builds); `keep` leaves
                                            them as stored; the last match wins. The head is
                                            quantized only when an override names it.

Without any of these only the routed experts are quantized (the default), so comparisons with
other tools stay like for like. GPTQ runs each dense layer on its first forward, on the inputs
the model quantized so far gives it (the sequential calibration of gptq_sequential.py): its
Hessian is the Gram matrix of every calibration token's input (q, k and v share one), and the
layer's output is then computed from the quantized weights. The head sees the final hidden states.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from expertbits.kernels.modules import packed_linear
from expertbits.kernels.packing import SUPPORTED_BITS, QuantizedTensor

from ..checkpoints.adapters import MoELayer, block_of
from ..errors import CheckpointError, ExpertbitsError
from .method import QuantizerConfig

KEEP = "keep"
Dense = tuple[QuantizedTensor, str]  # a packed dense layer and the key of the stored weight it replaces


@dataclass(frozen=True)
class DenseWidths:
    """Which dense linear layers are quantized, at which width (None: kept as stored)."""

    bits: int | None = None  # every decoder layer's dense linear layers
    overrides: tuple[tuple[str, int | None], ...] = ()  # (glob on the module name, width), the last match wins

    def __post_init__(self):
        for b in [self.bits, *(b for _, b in self.overrides)]:
            if b is not None and b not in SUPPORTED_BITS:
                raise ExpertbitsError(f"dense width {b} is not one the packed format stores",
                                      f"choose one of {', '.join(map(str, SUPPORTED_BITS))}, or `keep`", "dense_bits")

    @classmethod
    def parse(cls, bits: int | None, overrides: list[str] | tuple[str, ...] = ()) -> "DenseWidths":
        """From --dense-bits and each --dense-override 'GLOB=BITS' or 'GLOB=keep'."""
        parsed = []
        for text in overrides:
            pattern, sep, value = text.rpartition("=")
            value = value.strip().lower()
            if not sep or not pattern.strip() or not (value == KEEP or value.isdigit()):
                raise ExpertbitsError(f"dense override {text!r} is not GLOB=BITS or GLOB=keep",
                                      "e.g. --dense-override '*.o_proj=8' or --dense-override lm_head=8", "dense_override")
            parsed.append((pattern.strip(), None if value == KEEP else int(value)))
        return cls(bits, tuple(parsed))

    @property
    def active(self) -> bool:
        return self.bits is not None or any(b is not None for _, b in self.overrides)

    def width(self, name: str, *, head: bool = False) -> int | None:
        """The width of module `name`: the last override that matches it, else --dense-bits (never for the head)."""
        for pattern, b in reversed(self.overrides):
            if fnmatch.fnmatchcase(name, pattern):
                return b
        return None if head else self.bits

    def as_dict(self) -> dict:
        return {"bits": self.bits, "overrides": [list(o) for o in self.overrides]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DenseWidths":
        d = d or {}
        return cls(d.get("bits"), tuple((p, b) for p, b in d.get("overrides", ())))


@dataclass(frozen=True)
class DenseLinear:
    name: str  # the module's name in the model transformers builds
    key: str  # its stored weight tensor
    bits: int


def dense_linears(model: nn.Module, layers: list[MoELayer], widths: DenseWidths, stored: set[str],
                  renames: tuple[tuple[str, str], ...], path: Path) -> list[DenseLinear]:
    """Every linear layer `widths` quantizes: the decoder layers' nn.Linear modules that are not
    routers or routed experts, and the head if an override names it. A tied head is refused
    (quantizing it would quantize the embeddings it shares its weight with)."""
    routers = {_loaded(layer.router_key.removesuffix(".weight"), renames) for layer in layers}
    gates = re.compile(r".*[._]gate$")  # routers and gates like Qwen's shared_expert_gate: kept as stored
    experts = tuple(layer.experts_module + "." for layer in layers)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in routers or gates.fullmatch(name) or name.startswith(experts):
            continue
        is_head = module is head
        if not is_head and not block_of(name + "."):
            continue
        bits = widths.width(name, head=is_head)
        if bits is None:
            continue
        if is_head and getattr(model.config, "tie_word_embeddings", False):
            glob = next(p for p, _ in reversed(widths.overrides) if fnmatch.fnmatchcase(name, p))
            raise CheckpointError(f"{path}: the head ({name}) shares its weight with the token embeddings "
                                  "(tie_word_embeddings), so it cannot be quantized alone",
                                  f"keep it: add {name}=keep after the override {glob!r} that matches it")
        key = _stored(name + ".weight", stored, renames)
        if key is None:
            raise CheckpointError(f"{path}: {name} has no stored weight", "the checkpoint does not match its config.json")
        out.append(DenseLinear(name, key, bits))
    unmatched = [p for p, _ in widths.overrides if not any(fnmatch.fnmatchcase(d.name, p) for d in out)
                 and not any(fnmatch.fnmatchcase(n, p) for n, m in model.named_modules() if type(m) is nn.Linear)]
    if unmatched:
        raise CheckpointError(f"{path}: dense override {unmatched[0]!r} matches no linear layer of the model",
                              "name modules as the model transformers builds does, e.g. model.layers.*.self_attn.o_proj")
    return out


def _loaded(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        name = name.replace(old, new)
    return name


def _stored(key: str, stored: set[str], renames: tuple[tuple[str, str], ...]) -> str | None:
    if key in stored:
        return key
    for old, new in renames:
        if new in key and key.replace(new, old) in stored:
            return key.replace(new, old)
    return None


class DenseGPTQ:
    """Forward hooks that quantize each dense linear layer by GPTQ on its first forward and
    replace its output by the quantized layer's, so later layers see the quantized model."""

    def __init__(self, targets: list[DenseLinear], cfg: QuantizerConfig, group_size: int):
        self.targets = {t.name: t for t in targets}
        self.cfg, self.group_size = cfg, group_size
        self.packed: dict[str, QuantizedTensor] = {}
        self.done: set[str] = set()
        self._gram: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, its Gram matrix): q, k, v share one

    def attach(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, target in self.targets.items():
            module = model.get_submodule(name)
            if module is not head:  # the head is never run in calibration: `quantize_head` takes its inputs
                module.register_forward_hook(self._hook(target))

    def _hook(self, target: DenseLinear):
        def hook(module: nn.Linear, args, output):
            if target.name in self.done:
                raise CheckpointError(f"{target.name} ran twice in one calibration forward",
                                      "this architecture reuses a layer; it is not supported by --dense-bits")
            return self.quantize(target, module, args[0])
        return hook

    def quantize(self, target: DenseLinear, module: nn.Linear, x: torch.Tensor, output: bool = True) -> torch.Tensor | None:
        """GPTQ of `module` against the Gram matrix of inputs x; returns its quantized output on x
        (with `output`: the head's logits are never needed)."""
        if self._gram is None or self._gram[0] is not x:
            xf = x.reshape(-1, x.shape[-1]).float()
            self._gram = (x, xf.T @ xf)  # the input is held, so `is` cannot match a reused address
        q = self.cfg.gptq_matrix(module.weight.float(), self._gram[1], target.bits, self.group_size)
        self.packed[target.name] = q.to("cpu")
        self.done.add(target.name)
        if not output:
            return None
        y = packed_linear(x, q)
        return y if module.bias is None else y + module.bias.to(y.dtype)

    def quantize_head(self, model: nn.Module, hidden: torch.Tensor) -> None:
        """The head, if it is a target, against the final hidden states `hidden`."""
        head = model.get_output_embeddings()
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name in self.targets:
            onload = [h for h in head._forward_pre_hooks.values()]  # the runner reads its weight right before it runs
            for h in onload:
                h(head, (hidden,))
            self.quantize(self.targets[name], head, hidden, output=False)

    def take(self, block: str | None = None) -> dict[str, QuantizedTensor]:
        """The packed layers of decoder layer `block` (all that are left, if None), handed over once."""
        names = [n for n in self.packed if block is None or block_of(n + ".") == block]
        self._gram = None
        return {n: self.packed.pop(n) for n in names}

    def missing(self) -> list[str]:
        return sorted(set(self.targets) - self.done)
