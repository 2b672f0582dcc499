"""Run a model larger than memory one decoder layer at a time (sequential onloading).

The model transformers would build is built on the meta device, where every parameter is a
shape without storage. Then:

* each MoE layer's routed experts become `LazyExperts` (or, for Switch's per-expert modules,
  `LazyLinear`s) that read one expert's weights when it runs: floating point from the
  checkpoint, or packed from an expertbits folder (the shipped artifact, byte for byte);
* every decoder layer (the model's `_no_split_modules` blocks), and every other module that owns
  weights (embeddings, final norm, lm_head), reads its weights from the safetensors files right
  before its forward and drops them right after.

So a forward over a batch of windows (with the KV cache off) runs the embedding once, then each
layer over all of them, keeping only the hidden states in between:

    memory ≈ one layer's non-expert weights + one expert + activations of the batch

With `device` (a CUDA device), every weight is read from the files on the host and copied to
the device right before its layer runs, and dropped after it in the same way: the GPU holds one
decoder layer, one expert and the activations (tasks/placement.py says which device and dtype).

Every tensor of the model is resolved to a stored tensor before anything runs; a parameter with
no tensor, or a stored tensor nothing uses, is an error naming the file, never a random or a
silently dropped weight. One code path serves every model, from the zoo's to Mixtral-8x7B.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from expertbits.kernels.modules import LazyExperts, LazyLinear, check_gated
from expertbits.kernels.packing import QuantizedTensor

from ..checkpoints.adapters import block_of, detect, load_renames
from ..checkpoints.reader import Checkpoint
from ..errors import CheckpointError
from .install import install, install_dense
from .packed_folder import packed_tensor, stored_keys


KEEP_BYTES = 256 << 20


@contextmanager
def streamed(path: Path, *, dtype: torch.dtype = torch.float32, keep_bytes: int = KEEP_BYTES,
             device: str = "cpu") -> Iterator[nn.Module]:
    """The model at `path` (a checkpoint folder or an expertbits-quantized folder), in eval mode,
    with its weights read layer by layer onto `device` while it runs (its inputs go there too:
    `to_device`). Files stay open until the block exits.

    A model whose non-expert weights fit in `keep_bytes` (in `dtype`) keeps each layer's weights
    once read, so many small forwards (a task's examples) do not reread them; a larger one drops
    them after every forward of the layer. Experts are read when used either way."""
    path = Path(path)
    with Checkpoint.open(path) as ckpt:
        yield _build(path, ckpt, dtype, keep_bytes, torch.device(device))


def to_device(inputs: dict, device: torch.device | str) -> dict:
    """A batch's tensors on the model's device (`batches` builds them on the host)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def is_seq2seq(path: Path) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(path, trust_remote_code=False), "is_encoder_decoder", False))


def _build(path: Path, ckpt: Checkpoint, dtype: torch.dtype, keep_bytes: int, device: torch.device) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    qc = ckpt.config.get("quantization_config") or {}
    packed = qc.get("quant_method") == "expertbits"
    if packed:
        from . import load  # noqa: F401  registers the marker model type with AutoConfig
        from .packed_folder import quantization_config

        quantization_config(path)  # a clear error for another format version
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # a checkpoint is data, never code
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is plain; the experts are installed below
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    _init_meta_buffers(model, path, device)
    used = _install_packed(model, ckpt, qc, path, device) if packed else _install_fp(model, ckpt, path, dtype, device)
    used |= _hook_units(model, ckpt, path, dtype, load_renames(config.model_type), keep_bytes, device)
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    # decoder layers beyond num_hidden_layers (DeepSeek-V3's multi-token prediction) are not the model's
    beyond = set(qc.get("kept_as_stored") or ()) if packed else set(detect(ckpt).kept_as_stored)
    unused = sorted(k for k in ckpt.tensors if k not in used and not any(p.search(k) for p in ignore)
                    and block_of(k) not in beyond)
    if unused:
        raise CheckpointError(f"{path}: {len(unused)} stored tensors belong to no module of the "
                              f"{type(model).__name__} transformers builds, e.g. {unused[:3]}",
                              "the checkpoint does not match its config.json; re-export it")
    return model


def _init_meta_buffers(model: nn.Module, path: Path, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) are computed, not stored: compute them for real."""
    for name, module in model.named_modules():
        meta = [b for b in module._non_persistent_buffers_set if getattr(module, b, None) is not None
                and getattr(module, b).is_meta]
        if meta:
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
            left = [b for b in meta if not torch.isfinite(getattr(module, b)).all()]
            if "RotaryEmbedding" not in type(module).__name__ or left:
                raise CheckpointError(f"{path}: {type(module).__name__} at {name or 'the model'} has computed buffers "
                                      f"{meta} that the layer-by-layer runner cannot derive",
                                      "this architecture is not supported by the streaming runner; please report it")
            if device.type != "cpu":  # computed on the host as always, then kept where the layers run
                for b in meta:
                    module._buffers[b] = module._buffers[b].to(device)


def _fused_experts(model: nn.Module, module_name: str, path: Path) -> nn.Module:
    try:
        experts = model.get_submodule(module_name)
    except AttributeError as e:
        raise CheckpointError(f"{path}: the experts module {module_name} is not in the {type(model).__name__} "
                              "transformers builds", "this layout is not supported yet; extend tasks/checkpoints/adapters.py") from e
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        if getattr(experts, "act_fn", None) is None or getattr(experts, "gate_up_proj_bias", None) is not None:
            raise CheckpointError(f"{path}: {type(experts).__name__} at {module_name} is not a bias-free gated MLP",
                                  "this architecture's experts are not supported yet")
        return experts
    return None  # per-expert nn.Linear modules (Switch Transformers)


def _set_linear(model: nn.Module, target: str, lazy: LazyLinear, path: Path) -> None:
    try:
        linear = model.get_submodule(target)
    except AttributeError as e:
        raise CheckpointError(f"{path}: {target} is not in the model transformers builds",
                              "the checkpoint does not match its config.json") from e
    if not isinstance(linear, nn.Linear) or linear.bias is not None or tuple(linear.weight.shape) != (
            lazy.out_features, lazy.in_features):
        raise CheckpointError(f"{path}: {target} is {type(linear).__name__} {tuple(linear.weight.shape)}, expected a "
                              f"bias-free Linear {(lazy.out_features, lazy.in_features)}",
                              "this architecture's experts are not supported yet")
    model.set_submodule(target, lazy)


def _install_fp(model: nn.Module, ckpt: Checkpoint, path: Path, dtype: torch.dtype, device: torch.device) -> set[str]:
    """Floating-point experts, read from the checkpoint (fused slices or per-expert tensors)."""
    used = set()
    for layer in detect(ckpt).layers:
        by_expert = defaultdict(dict)
        for m in layer.matrices:
            by_expert[m.expert][m.role] = m
            used.add(m.key)
        experts = _fused_experts(model, layer.experts_module, path)

        def read(m, ckpt=ckpt):
            return _place(ckpt.read(m.key, m.index, m.rows), dtype, device)

        if experts is not None:
            if experts.gate_up_proj.shape[0] != layer.num_experts:
                raise CheckpointError(f"{path}: layer {layer.layer} has {layer.num_experts} router rows but the model "
                                      f"has {experts.gate_up_proj.shape[0]} experts", "the checkpoint does not match its config.json")
            load = lambda e, by_expert=by_expert, read=read: tuple(read(by_expert[e][r]) for r in ("gate", "up", "down"))  # noqa: E731
            model.set_submodule(layer.experts_module, LazyExperts(layer.num_experts, experts.act_fn, load))
        else:
            for m in layer.matrices:
                shape = ckpt.tensors[m.key].shape
                target = f"{layer.experts_module}.{m.name.split('.experts.', 1)[1]}"
                _set_linear(model, target, LazyLinear(lambda m=m, read=read: read(m), tuple(shape)), path)
    return used


def _install_packed(model: nn.Module, ckpt: Checkpoint, qc: dict, path: Path, device: torch.device) -> set[str]:
    """Packed experts, read from the expertbits folder's shards exactly as stored, when they run."""
    entries = {**qc["modules"], **qc.get("dense_modules", {})}
    for name, info in entries.items():
        for key in stored_keys(name, info):
            if key not in ckpt.tensors:
                raise CheckpointError(f"{path}: quantization_config lists {name} but no shard holds {key}",
                                      "the quantized checkpoint is incomplete or was edited; quantize again")

    def read(name: str) -> QuantizedTensor:
        return packed_tensor(name, entries[name], qc["group_size"], lambda key: ckpt.read(key).to(device))

    def fused(names: list[tuple[str, str, str]], act) -> LazyExperts:
        for e, trio in enumerate(names):
            check_gated(e, *(qc["modules"][n]["shape"] for n in trio))
        return LazyExperts(len(names), act, lambda e: tuple(read(n) for n in names[e]))

    install(model, qc, path, fused, lambda name: LazyLinear(lambda: read(name), tuple(qc["modules"][name]["shape"])))
    # a dense layer's bias stays a parameter, read with its decoder layer's other weights
    install_dense(model, qc, path, lambda name, bias: LazyLinear(lambda: read(name), tuple(entries[name]["shape"]), bias),
                  installed=(LazyLinear,))
    return {key for name, info in entries.items() for key in stored_keys(name, info)}


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Decoder layers (outermost `_no_split_modules` blocks), then every other module owning weights."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(module).__name__ in blocks:
            units.append((name, module))
            inside.append(name)
        elif _own_tensors(module):
            units.append((name, module))
    if not any(type(m).__name__ in blocks for _, m in units):
        raise CheckpointError(f"{type(model).__name__} names no decoder-layer class the runner can find",
                              "this architecture is not supported by the streaming runner; please report it")
    return units


def _own_tensors(module: nn.Module, recurse: bool = False) -> list[tuple[nn.Module, str, bool]]:
    """(owner, local name, is_parameter) of the weights a unit loads: parameters and persistent buffers."""
    out = []
    for _, m in (module.named_modules() if recurse else [("", module)]):
        if isinstance(m, LazyExperts):
            continue
        out += [(m, n, True) for n, p in m._parameters.items() if p is not None]
        out += [(m, n, False) for n, b in m._buffers.items() if b is not None and n not in m._non_persistent_buffers_set]
    return out


def _hook_units(model: nn.Module, ckpt: Checkpoint, path: Path, dtype: torch.dtype,
                renames: tuple[tuple[str, str], ...], keep_bytes: int, device: torch.device) -> set[str]:
    tied = model.get_expanded_tied_weights_keys() if hasattr(model, "get_expanded_tied_weights_keys") else {}
    full = {id(m): n for n, m in model.named_modules()}

    def stored(name: str) -> str | None:
        if name in ckpt.tensors:
            return name
        for old, new in renames:
            if new in name and name.replace(new, old) in ckpt.tensors:
                return name.replace(new, old)
        return stored(tied[name]) if name in tied else None

    used, missing, plans = set(), [], []
    for unit_name, unit in _units(model):
        plan = []
        for owner, local, is_param in _own_tensors(unit, recurse=type(unit).__name__ in (model._no_split_modules or ())):
            name = f"{full[id(owner)]}.{local}".lstrip(".")
            key = stored(name)
            if key is None:
                missing.append(name)
                continue
            plan.append((owner, local, is_param, key, tuple(getattr(owner, local).shape)))
            used.add(key)
        plans.append((unit, plan))
    keep = sum(math.prod(shape) for _, plan in plans for *_, shape in plan) * dtype.itemsize <= keep_bytes
    for unit, plan in plans:
        unit.register_forward_pre_hook(_onload(ckpt, plan, dtype, path, device))
        if not keep:  # also after a forward that raised: a failed layer does not stay in memory
            unit.register_forward_hook(_offload(plan, dtype), always_call=True)
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} weights of the model have no stored tensor, e.g. {missing[:3]}",
                              "the checkpoint is incomplete or does not match its config.json; re-export it")
    return used


def _onload(ckpt: Checkpoint, plan: list, dtype: torch.dtype, path: Path, device: torch.device):
    def hook(module, args):
        for owner, local, is_param, key, shape in plan:
            if not getattr(owner, local).is_meta:
                continue  # kept from an earlier forward (a small model)
            t = ckpt.read(key)
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, the model expects {shape}",
                                      "the checkpoint does not match its config.json")
            t = _place(t, dtype, device) if t.is_floating_point() else t.to(device)
            if is_param:
                owner._parameters[local] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[local] = t
    return hook


def _offload(plan: list, dtype: torch.dtype):
    def hook(module, args, output):
        for owner, local, is_param, _, shape in plan:
            t = torch.empty(shape, dtype=getattr(owner, local).dtype, device="meta")
            if is_param:
                owner._parameters[local] = nn.Parameter(t, requires_grad=False)
            else:
                owner._buffers[local] = t
    return hook


def device_bytes(path: Path, dtype: torch.dtype, windows: int, seq_len: int, *, head: bool,
                 hessians: bool = False, dense: bool = False, dense_head: bool = False) -> int:
    """What a streamed forward of `windows` windows of `seq_len` tokens holds on its device at most, from the tensors'
    headers alone (nothing is read):

    * weights: every non-expert weight if they fit in `KEEP_BYTES` (kept), else the largest unit
      (a decoder layer's own weights, or the embeddings, or the head), in `dtype`;
    * one expert in `dtype`, and with `hessians` (GPTQ) its float32 copy, the Hessians of gate/up
      [H, H] and down [F, F] with what `kernels/gptq.py` holds beside each at its factorisation
      (the damped copy, the factor, its inverse, the upper factor: five of the larger in float32),
      and the float64 copies the error measurement makes (the Hessian, a matrix's error);
    * activations: the hidden states and attention of every token (eager attention's scores
      included), and one expert's hidden activation for every token;
    * with `head`, the float32 logits and their log-probabilities;
    * with `dense` (--dense-bits, quantization/dense.py), GPTQ's copies for the widest dense layer's
      input (a dense MLP's or shared expert's down projection can be wider than an expert's), and
      with `dense_head` (the head quantized too) its float32 weight and copies of its [H, H] Hessian.

    tasks/placement.MARGIN_BYTES comes on top (the CUDA context and the allocator)."""
    from ..checkpoints.adapters import DTYPE_BYTES

    floating = ("F64", "F32", "F16", "BF16")
    with Checkpoint.open(path) as ckpt:
        layers = detect(ckpt).layers
        config = ckpt.config
        experts = {m.key for layer in layers for m in layer.matrices}
        units: dict[str, int] = defaultdict(int)
        for k, info in ckpt.tensors.items():
            if k not in experts:
                units[block_of(k)] += math.prod(info.shape) * (dtype.itemsize if info.dtype in floating
                                                               else DTYPE_BYTES.get(info.dtype, 4))
        # the widest input of a dense linear layer inside a decoder layer (2-D floating weights)
        dense_k = max((info.shape[-1] for k, info in ckpt.tensors.items() if dense and k not in experts
                       and block_of(k) and len(info.shape) == 2 and info.dtype in floating), default=0)
        elements, ffn = 0, 0
        for layer in layers:
            ffn = max([ffn] + [ckpt.tensors[m.key].shape[-1] for m in layer.matrices if m.role == "down"])
            first = [m for m in layer.matrices if m.expert == 0]
            elements = max(elements, sum((m.rows[1] - m.rows[0] if m.rows else ckpt.tensors[m.key].shape[-2])
                                         * ckpt.tensors[m.key].shape[-1] for m in first))
    hidden = int(config.get("hidden_size") or config.get("d_model") or 0)
    total = sum(units.values())
    weights = total if total <= KEEP_BYTES else max(units.values(), default=0)
    expert = elements * (dtype.itemsize + (4 if hessians else 0))
    if hessians:
        big = max(hidden, ffn, dense_k)
        expert += 4 * (hidden * hidden + ffn * ffn) + 4 * 4 * big * big + 8 * (big * big + hidden * ffn)
    if dense_head:
        expert += 4 * int(config.get("vocab_size") or 0) * hidden + 5 * 4 * hidden * hidden
    heads = int(config.get("num_attention_heads") or config.get("num_heads") or 1)
    tokens = windows * seq_len
    activations = 4 * tokens * (12 * hidden + 3 * ffn) + 4 * heads * tokens * seq_len
    logits = 2 * 4 * tokens * int(config.get("vocab_size") or 0) if head else 0
    return weights + expert + activations + logits


def place_stage(device: str, path: Path, what: str, windows: int, seq_len: int, *, head: bool,
                hessians: bool = False, dense: bool = False, dense_head: bool = False):
    """The placement a streamed stage over the checkpoint at `path` runs on (placement.of_checkpoint),
    refused before it starts if `device_bytes` plus the CUDA margin would not fit in the GPU's free
    memory (on the CPU the host's memory is the meter's business)."""
    from ..placement import MARGIN_BYTES, of_checkpoint, require_free

    placement = of_checkpoint(device, path)
    if placement.is_cuda:
        need = device_bytes(path, placement.torch_dtype, windows, seq_len, head=head, hessians=hessians, dense=dense,
                            dense_head=dense_head)
        require_free(placement, need + MARGIN_BYTES, what)
    return placement


def _place(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stored tensor in the compute dtype on the device: on the host exactly `t.to(dtype)`;
    to a GPU the stored bytes are copied first and cast there (fewer bytes cross the bus when the
    stored dtype is the narrower, and the GPU casts faster)."""
    if device.type == "cpu":
        return t.to(dtype)
    return t.to(device, non_blocking=False).to(dtype)


def batches(pairs: list[tuple[dict, torch.Tensor]], pad_id: int, vocab: int,
            logits_bytes: int = 1 << 30) -> Iterator[tuple[dict, list[int]]]:
    """Examples stacked into as few forwards as keep the logits under `logits_bytes`: (inputs,
    indices of the examples). Every weight is read once per forward, so fewer is faster.

    Decoder-only windows have one length; encoder-decoder examples are right-padded (inputs with
    `pad_id` and an attention mask, labels with -100), which changes no real position's output."""
    longest = max(int(t.numel()) + 1 for _, t in pairs)
    per = max(1, logits_bytes // (4 * vocab * longest))
    for start in range(0, len(pairs), per):
        idx = list(range(start, min(start + per, len(pairs))))
        chunk = [pairs[i][0] for i in idx]
        if "labels" not in chunk[0]:  # no KV cache: it would hold every layer's keys and values
            yield {"input_ids": torch.cat([c["input_ids"] for c in chunk]), "use_cache": False}, idx
            continue
        n_in = max(c["input_ids"].shape[1] for c in chunk)
        n_out = max(c["labels"].shape[1] for c in chunk)
        ids = torch.full((len(chunk), n_in), pad_id)
        mask = torch.zeros(len(chunk), n_in, dtype=torch.long)
        labels = torch.full((len(chunk), n_out), -100)
        for b, c in enumerate(chunk):
            ids[b, : c["input_ids"].shape[1]] = c["input_ids"][0]
            mask[b, : c["input_ids"].shape[1]] = 1
            labels[b, : c["labels"].shape[1]] = c["labels"][0]
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}, idx
