"""Calibration statistics: what the router does on real text, and what quantization costs each expert.

Held-out text is run through the full-precision model once. A forward pre-hook on every router
sees the router's input x (one row per token) and applies the router in fp32:

  frequency_e       share of tokens with e among their top-k experts
  routing_weight_e  mean softmax probability of e over the tokens routed to it
  hessian_trace_e   Σ_{routed tokens} ‖x‖² / tokens   (trace of the expert's input Gram matrix per
                    token: the GPTQ Hessian of its first layer, up to a factor 2)

Then every expert matrix is quantized by round-to-nearest at each bit-width to measure

  weight_error        ‖W − Q_b(W)‖²_F summed over the expert's matrices (data-free; PMQ's loss)
  routed_input_error  Σ_i h_i ‖W[:, i] − Q_b(W)[:, i]‖² for the matrices that read x (gate, up),
                      h_i = Σ_{routed} x_i² / tokens, i.e. the expected squared output error per
                      token; the down projection reads the expert's hidden activations, which
                      are not observed, so its weight error enters scaled by mean_i h_i.

Softmax top-k over W·x (+ b where the router has a bias, as Switch's `router_bias`) is the
routing rule of Mixtral, Qwen-MoE, OLMoE and Switch (k = 1); models with sigmoid or
bias-corrected routers (DeepSeek-V3) are approximated by it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from expertbits.kernels.packing import quantize_rtn

from .adapters import detect
from .checkpoint import Checkpoint
from .errors import CheckpointError

Progress = Callable[[float, str], None]


def top_k(config: dict) -> int:
    for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        if config.get(key):
            return int(config[key])
    return 1  # Switch routes every token to one expert


class RouterTap:
    """Accumulates routing statistics of one MoE layer from its router's inputs."""

    def __init__(self, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None):
        self.weight, self.k = weight.float(), k
        self.bias = bias.float() if bias is not None else torch.zeros(weight.shape[0])
        experts, hidden = weight.shape
        self.count = torch.zeros(experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(experts, dtype=torch.float64)
        self.x2 = torch.zeros(experts, hidden, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, module, args):
        x = args[0].detach().reshape(-1, self.weight.shape[1]).float()
        probs = torch.softmax(x @ self.weight.T + self.bias, dim=-1)
        chosen = probs.topk(self.k, dim=-1).indices
        mask = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
        self.count += mask.sum(0).double()
        self.prob_sum += (mask * probs).sum(0).double()
        self.x2 += (mask.T @ x.square()).double()
        self.tokens += x.shape[0]

    def h(self) -> torch.Tensor:
        """[E, H] per-token second moment of each expert's routed inputs."""
        return (self.x2 / max(self.tokens, 1)).float()


def router_module(model, key: str, weight: torch.Tensor, path: Path) -> torch.nn.Module:
    """The loaded module holding router `key`: by name, else by its exact weights, because
    transformers renames some layouts on load (e.g. Mixtral's block_sparse_moe → mlp)."""
    modules = dict(model.named_modules())
    by_name = modules.get(key.removesuffix(".weight"))
    if by_name is not None:
        return by_name
    target = weight.float()
    for module in modules.values():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape == target.shape and torch.equal(w.detach().float(), target):
            return module
    raise CheckpointError(f"{path}: no module of the loaded model holds router {key}",
                          "calibration hooks the router module; this layout is not supported yet")


def calibrate(ft_path: Path, text: str, *, seq_len: int, windows: int, bit_widths: tuple[int, ...],
              group_size: int, progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(expert_calibration, expert_qerror, info) for the checkpoint at `ft_path`."""
    with Checkpoint.open(ft_path) as ckpt:
        return _calibrate(ckpt, ft_path, text, seq_len=seq_len, windows=windows, bit_widths=bit_widths,
                          group_size=group_size, progress=progress)


def _calibrate(ckpt: Checkpoint, ft_path: Path, text: str, *, seq_len: int, windows: int, bit_widths: tuple[int, ...],
               group_size: int, progress: Progress | None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from transformers import AutoConfig, AutoTokenizer

    from .evaluate import _load, examples, token_windows

    model_info = detect(ckpt)
    seq2seq = bool(getattr(AutoConfig.from_pretrained(ft_path), "is_encoder_decoder", False))
    tokenizer = AutoTokenizer.from_pretrained(ft_path)
    pairs = examples(token_windows(text, tokenizer, seq_len, windows), tokenizer, seq2seq)
    model = _load(ft_path, seq2seq)
    taps, handles = {}, []
    try:
        for layer in model_info.layers:
            weight = ckpt.read(layer.router_key)
            bias_key = layer.router_key.removesuffix("weight") + "bias"
            bias = ckpt.read(bias_key) if bias_key in ckpt.tensors else None
            taps[layer.layer] = RouterTap(weight, top_k(ckpt.config), bias)
            handles.append(router_module(model, layer.router_key, weight, ft_path).register_forward_pre_hook(taps[layer.layer]))
        with torch.no_grad():
            for i, (inputs, _) in enumerate(pairs):
                model(**inputs)
                if progress:
                    progress(0.5 * (i + 1) / len(pairs), f"calibration: window {i + 1}/{len(pairs)}")
    finally:
        for h in handles:
            h.remove()
    del model

    calib, qerr = [], []
    for n, layer in enumerate(model_info.layers):
        tap = taps[layer.layer]
        if tap.tokens == 0:
            raise CheckpointError(f"{ft_path}: router of layer {layer.layer} saw no tokens during calibration",
                                  "this architecture's routers are not reached by a forward pass; please report it")
        h = tap.h()
        for e in range(layer.num_experts):
            routed = float(tap.count[e])
            calib.append({"layer": layer.layer, "expert": e, "frequency": routed / tap.tokens,
                          "routing_weight": float(tap.prob_sum[e]) / routed if routed else 0.0,
                          "hessian_trace": float(h[e].sum()), "tokens": tap.tokens})
        errors: dict[tuple[int, int], list[float]] = {}
        for m in layer.matrices:
            w = ckpt.read(m.key, m.index, m.rows).float()
            for b in bit_widths:
                d = (w - quantize_rtn(w, b, group_size).dequantize()).square()
                he = h[m.expert]
                routed_err = float(d.sum(0) @ he) if m.role in ("gate", "up") else float(d.sum()) * float(he.mean())
                acc = errors.setdefault((m.expert, b), [0.0, 0.0])
                acc[0] += float(d.sum())
                acc[1] += routed_err
        qerr += [{"layer": layer.layer, "expert": e, "bits": b, "weight_error": we, "routed_input_error": re}
                 for (e, b), (we, re) in sorted(errors.items())]
        if progress:
            progress(0.5 + 0.5 * (n + 1) / len(model_info.layers), f"quantization error: layer {layer.layer} done")
    info = {"calibration_tokens": int(sum(t.tokens for t in taps.values()) // max(len(taps), 1)),
            "windows": len(pairs), "seq_len": seq_len, "top_k": top_k(ckpt.config)}
    return pd.DataFrame(calib), pd.DataFrame(qerr), info
