"""Put the packed experts of an expertbits folder into the model transformers built.

One installer for both ways the folder is run: the loader (`load.py`) fills `PackedExperts` /
`PackedLinear` modules with packed tensors read up front, the layer-by-layer runner
(`streaming.py`) installs `LazyExperts` / `LazyLinear` modules that read an expert when it runs.
What is installed where, and every check that the folder and the model agree, is here:

    quantization_config.experts_modules   {layer: module name}, e.g. "model.layers.1.mlp.experts"
    quantization_config.modules           {matrix name: {layer, expert, role, shape, bits}}

    fused experts module (gate_up_proj / down_proj tensors: Mixtral, Qwen, OLMoE, DeepSeek, ...)
        -> fused(matrix names [(gate, up, down) per expert], act_fn)      one module per layer
    per-expert nn.Linear modules (Switch Transformers: experts.expert_<e>.wi / .wo)
        -> linear(matrix name)                                             one module per matrix

    quantization_config.dense_modules     {module name: {shape, bits}}   (the whole-model budget)
        -> dense(module name, its bias or None)                            one module per nn.Linear

An experts module the folder does not cover, a matrix the model does not have, or an expert
Linear left in floating point is an error naming the folder: never a model with random experts.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import CheckpointError

ROLES = ("gate", "up", "down")
Fused = Callable[[list[tuple[str, str, str]], nn.Module], nn.Module]  # (names per expert, act_fn) -> experts module
Linear = Callable[[str], nn.Module]  # matrix name -> module
Dense = Callable[[str, "torch.Tensor | None"], nn.Module]  # (module name, its bias) -> module


def install(model: nn.Module, qc: dict, folder: Path, fused: Fused, linear: Linear,
            installed: tuple[type, ...] = ()) -> int:
    """Replace every MoE layer's experts as `fused` and `linear` build them; returns the number of
    matrices installed. `installed`: module types an earlier call put there, replaced again."""
    by_layer: dict[str, dict[tuple[int, str], str]] = defaultdict(dict)
    for name, info in qc["modules"].items():
        by_layer[str(info["layer"])][info["expert"], info["role"]] = name
    count_installed = 0
    for layer, module_name in sorted(qc["experts_modules"].items(), key=lambda kv: int(kv[0])):
        experts = _submodule(model, module_name, folder, f"layer {layer}'s experts module")
        names = by_layer[layer]
        is_fused = isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) or (
            isinstance(experts, installed) and hasattr(experts, "num_experts"))
        count = _expert_count(experts, is_fused, module_name, folder)
        roles = ROLES if is_fused else sorted({r for _, r in names} | {"gate", "down"})
        missing = [(e, r) for e in range(count) for r in roles if (e, r) not in names]
        if missing or len(qc["expert_bits"].get(layer, ())) != count:
            raise CheckpointError(f"{folder}: layer {layer} has {count} experts in the model but the quantization config "
                                  f"lacks (expert, matrix) {missing[:4]}", "the folder is incomplete or was edited; quantize again")
        if is_fused:
            act = getattr(experts, "act_fn", None)
            if act is None or getattr(experts, "gate_up_proj_bias", None) is not None:
                raise CheckpointError(f"{folder}: {type(experts).__name__} at {module_name} is not a bias-free gated MLP",
                                      "this architecture's experts are not supported by the packed runtime yet")
            model.set_submodule(module_name, fused([tuple(names[e, r] for r in ROLES) for e in range(count)], act))
            count_installed += 3 * count
        else:
            for (e, role), name in sorted(names.items()):
                target = f"{module_name}.{name.split('.experts.', 1)[1]}"
                current = _submodule(model, target, folder, "expert matrix")
                shape = tuple(qc["modules"][name]["shape"])
                if not isinstance(current, installed) and (
                        not isinstance(current, nn.Linear) or current.bias is not None
                        or tuple(current.weight.shape) != shape):
                    raise CheckpointError(f"{folder}: {target} is {type(current).__name__} "
                                          f"{tuple(getattr(current, 'weight', torch.empty(0)).shape)}, expected a "
                                          f"bias-free Linear {shape}",
                                          "this architecture's experts are not supported by the packed runtime yet")
                model.set_submodule(target, linear(name))
                count_installed += 1
            left = [n for n, m in model.get_submodule(module_name).named_modules(prefix=module_name) if type(m) is nn.Linear]
            if left:
                raise CheckpointError(f"{folder}: expert matrices {left[:3]} have no packed weights",
                                      "the folder is incomplete or was edited; quantize again")
        # transformers (re)initialises every module it has not loaded; the MoE block and everything
        # between it and the packed modules hold nothing it could initialise any more
        parent = module_name.rpartition(".")[0]
        for name, module in model.get_submodule(parent).named_modules(prefix=parent):
            if name == parent or name.startswith(module_name):
                module._is_hf_initialized = True
    return count_installed


def _submodule(model: nn.Module, name: str, folder: Path, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as e:
        fix = ("the quantization config does not match the model; quantize again" if what in ("expert matrix", "dense layer") else
               "this transformers version lays the model out differently; use the version recorded in config.json")
        raise CheckpointError(f"{folder}: {what} {name} is not in the {type(model).__name__} transformers built",
                              fix) from e


def _expert_count(experts: nn.Module, fused: bool, module_name: str, folder: Path) -> int:
    """How many routed experts the model's experts module has (the config must cover them all)."""
    if isinstance(getattr(experts, "num_experts", None), int) and not isinstance(
            getattr(experts, "gate_up_proj", None), torch.Tensor):
        return experts.num_experts
    if fused:
        return experts.gate_up_proj.shape[0]
    raise CheckpointError(f"{folder}: cannot tell how many experts {module_name} ({type(experts).__name__}) holds",
                          "this architecture's experts are not supported by the packed runtime yet")


def install_dense(model: nn.Module, qc: dict, folder: Path, dense: Dense, installed: tuple[type, ...] = ()) -> int:
    """Replace every linear layer `dense_modules` lists (attention, shared experts, dense MLPs, the
    head) as `dense` builds it, handing over the layer's bias (loaded as stored, with the model's
    other weights); returns how many. `installed`: module types an earlier call put there."""
    for name, info in qc.get("dense_modules", {}).items():
        current = _submodule(model, name, folder, "dense layer")
        shape = tuple(info["shape"])
        have = (current.out_features, current.in_features) if isinstance(current, installed) else tuple(
            getattr(getattr(current, "weight", None), "shape", ()))
        if not isinstance(current, (nn.Linear, *installed)) or have != shape:
            raise CheckpointError(f"{folder}: {name} is {type(current).__name__} {have}, the folder packs a "
                                  f"Linear {shape} there", "the folder does not match the model; quantize again")
        bias = current.bias.data if isinstance(current.bias, torch.Tensor) else None
        model.set_submodule(name, dense(name, bias))
        model.get_submodule(name)._is_hf_initialized = True  # its bias is loaded, its weight is ours
    return len(qc.get("dense_modules", {}))
