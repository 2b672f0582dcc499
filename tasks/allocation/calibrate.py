"""Calibration statistics: what the router does on real text, and what quantization costs each expert.

Calibration text is run through the full-precision model once, streamed (tasks/model/streaming.py: one
decoder layer's weights and one expert in memory at a time, windows batched as memory allows). A forward pre-hook on every MoE
layer's experts module sees what the model itself hands its experts: the hidden states x (one row
per token) and the router's decision (which experts, with which combine weights). So every
architecture is calibrated with its own routing rule: softmax top-k (Mixtral, Qwen, OLMoE),
sigmoid scores with `e_score_correction_bias` and group-limited top-k (DeepSeek-V3), top-1 with
a router bias and expert capacity (Switch). Per expert e, over the tokens routed to it:

  routed_tokens_e    how many calibration tokens e received
  frequency_e        routed_tokens_e / tokens (share of tokens that chose e)
  routing_weight_e   mean combine weight the model gave e's output when it was routed
  hessian_trace_e    E[‖x‖² | routed to e]: the trace of the expert's input Gram matrix per routed
                     token (GPTQ's Hessian of its first layer, up to a factor 2); no frequency inside

Then every expert matrix is quantized at each bit-width by the run's quantizer (round-to-nearest,
optionally with the clipping search; GPTQ's errors come from tasks/quantization/gptq_sequential.py) to measure

  weight_error        ‖W − Q_b(W)‖²_F summed over the expert's matrices (data-free; PMQ's loss)
  routed_input_error  Σ_i h_i ‖W[:, i] − Q_b(W)[:, i]‖² summed over the expert's matrices, with
                      h_i = E[u_i² | routed to e] for that matrix's own input u: the token x for
                      gate/up (and Switch's wi), the expert's hidden activation act(x Gᵀ) ⊙ (x Uᵀ)
                      for down (act(x Wiᵀ) for Switch's wo). It is the expected squared output
                      error per routed token (diagonal of the input Gram matrix); how often the
                      expert is routed is the allocator's business (`routed-error` multiplies by
                      frequency once).

An expert that received no calibration token has routed_tokens 0, and is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from expertbits.kernels.modules import GatedExperts

from ..checkpoints.adapters import detect
from ..checkpoints.reader import Checkpoint
from ..errors import CheckpointError
from ..placement import CPU, Placement
from ..quantization.method import QuantizerConfig

Progress = Callable[[float, str], None]


def top_k(config: dict) -> int:
    for key in ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts"):
        if config.get(key):
            return int(config[key])
    return 1  # Switch routes every token to one expert


class ExpertsTap:
    """Accumulates routing statistics of one MoE layer from its experts module's inputs.

    `valid` ([tokens] of 0/1, set before each forward) marks the real tokens of a padded batch;
    padding is neither counted nor averaged."""

    def __init__(self, experts: torch.nn.Module, num_experts: int):
        self.num_experts, self.experts = num_experts, experts
        self.gated = isinstance(experts, GatedExperts)
        if self.gated:  # the hidden activation comes from the experts' own forward, not a recomputation
            experts.on_hidden = self.add_hidden
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.weight_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.x2: dict[int, torch.Tensor] = {}  # Σ x² over routed tokens, [H]
        self.a2: dict[int, torch.Tensor] = {}  # Σ a² of the hidden activation, [F]
        self.tokens = 0
        self.valid: torch.Tensor | None = None

    def routing(self, index: torch.Tensor, weights: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed mask, combine weight), both [T, E], on the routing's device."""
        if index.dim() == 3:  # Switch: a one-hot mask [T, 1, E] (all zero for a token over capacity), weights [T, 1]
            mask = index.reshape(tokens, self.num_experts).float()
            return mask, mask * weights.reshape(tokens, 1).float()
        index = index.reshape(tokens, -1)
        valid = (index >= 0) & (index < self.num_experts)  # some routers mark dropped slots out of range
        safe = torch.where(valid, index, 0)
        mask = torch.zeros(tokens, self.num_experts, device=index.device).scatter_add_(1, safe, valid.float())
        combine = torch.zeros(tokens, self.num_experts, device=index.device).scatter_add_(
            1, safe, weights.reshape(tokens, -1).float() * valid)
        return mask, combine

    def __call__(self, module, args):
        x, index, weights = args[:3]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        mask, combine = self.routing(index.detach(), weights.detach(), x.shape[0])
        real = torch.ones(x.shape[0], device=x.device) if self.valid is None else self.valid.reshape(-1).float().to(x.device)
        mask, combine = mask * real[:, None], combine * real[:, None]
        self.count += mask.sum(0).double().cpu()  # counts on the host; sums of x² stay on x's device
        self.weight_sum += combine.sum(0).double().cpu()
        with torch.no_grad():
            for e in mask.sum(0).nonzero().flatten().tolist():
                xe = x[mask[:, e] > 0]
                self.x2[e] = self.x2.get(e, 0) + xe.square().sum(0).double()
                if not self.gated:  # Switch: DenseActDense(wi, act, wo), the expert's own modules
                    expert = self.experts[f"expert_{e}"]
                    self.a2[e] = self.a2.get(e, 0) + expert.act(expert.wi(xe)).float().square().sum(0).double()
        self.tokens += int(real.sum())

    def add_hidden(self, e: int, token: torch.Tensor, hidden: torch.Tensor) -> None:
        if self.valid is not None:
            hidden = hidden[self.valid.reshape(-1).to(token.device)[token] > 0]
        self.a2[e] = self.a2.get(e, 0) + hidden.detach().float().square().sum(0).double()

    def moments(self, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(E[x² | routed], E[a² | routed]) for expert e, or None if it saw no token."""
        if self.count[e] == 0:
            return None
        return (self.x2[e].cpu() / self.count[e]).float(), (self.a2[e].cpu() / self.count[e]).float()


ERROR_ROWS = 128
Moments = dict[int, tuple[torch.Tensor, torch.Tensor] | None]  # expert -> (E[x² | routed], E[a² | routed]) or None


def calibrate(ft_path: Path, text: str, *, seq_len: int, windows: int, bit_widths: tuple[int, ...],
              group_size: int, symmetric: bool = False, quantizer: QuantizerConfig | None = None,
              progress: Progress | None = None, placement: Placement = CPU) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(expert_calibration, expert_qerror, info) for the checkpoint at `ft_path`; errors are those of
    the quantizer the run will use (default: RTN, `symmetric` or not). `route`, then `layer_errors`
    per layer (GPTQ: `gptq_sequential.gptq_errors`, one more forward)."""
    quantizer = quantizer or QuantizerConfig(symmetric=symmetric)
    calib, moments, info = route(ft_path, text, seq_len=seq_len, windows=windows, placement=placement,
                                 progress=(lambda f, m: progress(0.5 * f, m)) if progress else None)
    if quantizer.calibrated:
        from ..quantization.gptq_sequential import gptq_errors

        qerr = gptq_errors(ft_path, text, bit_widths, group_size, quantizer, seq_len=seq_len, windows=windows,
                           placement=placement, progress=(lambda f, m: progress(0.5 + 0.5 * f, m)) if progress else None)
        return calib, pd.DataFrame(qerr), info
    qerr = []
    with Checkpoint.open(ft_path) as ckpt:
        layers = detect(ckpt).layers
        for n, layer in enumerate(layers):
            qerr += layer_errors(ckpt, n, moments[layer.layer], bit_widths, group_size, quantizer, placement)
            if progress:
                progress(0.5 + 0.5 * (n + 1) / len(layers), f"quantization error: layer {layer.layer} done")
    return calib, pd.DataFrame(qerr), info


def route(ft_path: Path, text: str, *, seq_len: int, windows: int, progress: Progress | None = None,
          placement: Placement = CPU) -> tuple[pd.DataFrame, dict[int, Moments], dict]:
    """What the router does on the calibration text: (expert_calibration, per-layer moments, info),
    from streamed forwards of the full-precision model on the placement's device, as few as keep
    the logits under 1 GiB (one for every window on the zoo's models and on real shapes at the
    default 16 × 256 tokens)."""
    from ..checkpoints.texts import text_examples
    from ..model.streaming import batches, is_seq2seq, streamed, to_device

    with Checkpoint.open(ft_path) as ckpt:
        model_info = detect(ckpt)
        k = top_k(ckpt.config)
    seq2seq = is_seq2seq(ft_path)
    tokenizer, pairs = text_examples(ft_path, text, seq_len, windows, seq2seq)
    with streamed(ft_path, dtype=placement.torch_dtype, device=placement.device) as model:
        taps = {}
        for layer in model_info.layers:
            experts = model.get_submodule(layer.experts_module)  # the streaming runner checked it exists
            taps[layer.layer] = tap = ExpertsTap(experts, layer.num_experts)
            tap.decoder = seq2seq and layer.experts_module.startswith("decoder.")
            experts.register_forward_pre_hook(tap)
        with torch.no_grad():
            for inputs, idx in batches(pairs, tokenizer.pad_token_id or 0, model.config.vocab_size):
                for tap in taps.values():  # padding of encoder-decoder batches is not calibration text
                    tap.valid = ((inputs["labels"] != -100) if tap.decoder else inputs["attention_mask"]) \
                        if "labels" in inputs else None
                model(**to_device(inputs, placement.device))
                if progress:
                    progress((idx[-1] + 1) / len(pairs), f"calibration: window {idx[-1] + 1}/{len(pairs)}")

    calib, starved, moments = [], [], {}
    for layer in model_info.layers:
        tap = taps[layer.layer]
        if tap.tokens == 0:
            raise CheckpointError(f"{ft_path}: the experts of layer {layer.layer} saw no tokens during calibration",
                                  "this architecture's experts are not reached by a forward pass; please report it")
        moments[layer.layer] = {e: tap.moments(e) for e in range(layer.num_experts)}
        for e in range(layer.num_experts):
            routed = float(tap.count[e])
            if moments[layer.layer][e] is None:
                starved.append((layer.layer, e))
            calib.append({"layer": layer.layer, "expert": e, "frequency": routed / tap.tokens,
                          "routing_weight": float(tap.weight_sum[e]) / routed if routed else 0.0,
                          "hessian_trace": float(moments[layer.layer][e][0].sum()) if moments[layer.layer][e] else 0.0,
                          "routed_tokens": int(routed), "tokens": tap.tokens})
    info = {"calibration_tokens": int(sum(t.tokens for t in taps.values()) // max(len(taps), 1)),
            "windows": len(pairs), "seq_len": seq_len, "top_k": k,
            "uncalibrated_experts": [f"{layer}/{e}" for layer, e in starved]}
    return pd.DataFrame(calib), moments, info


def layer_errors(ckpt: Checkpoint, position: int, moments: Moments, bit_widths: tuple[int, ...], group_size: int,
                 quantizer: QuantizerConfig, placement: Placement = CPU) -> list[dict]:
    """expert_qerror rows of the `position`-th MoE layer: every expert matrix quantized at every
    width by the data-free quantizer, its weight error and its routed-input error (one unit of
    work: a Dask task), on the placement's device (one matrix there at a time)."""
    layer = detect(ckpt).layers[position]
    errors: dict[tuple[int, int], list[float]] = {}
    device = placement.device
    for m in layer.matrices:
        w = ckpt.read(m.key, m.index, m.rows).to(device)
        h = None if moments[m.expert] is None else moments[m.expert][1 if m.role == "down" else 0].to(device)
        for b in bit_widths:
            col = torch.zeros(w.shape[1], dtype=torch.float64, device=device)  # Σ over rows of the squared error, per column
            for i in range(0, w.shape[0], ERROR_ROWS):  # row blocks: temporaries stay in cache
                rows = w[i : i + ERROR_ROWS].float()
                col += (rows - quantizer.round_matrix(rows, b, group_size).dequantize()).square().sum(0)
            acc = errors.setdefault((m.expert, b), [0.0, 0.0])
            acc[0] += float(col.sum())
            acc[1] += float(col @ h.double()) if h is not None else 0.0
    return [{"layer": layer.layer, "expert": e, "bits": b, "symmetric_quant": quantizer.symmetric,
             "quantizer": quantizer.label, "weight_error": we, "routed_input_error": re}
            for (e, b), (we, re) in sorted(errors.items())]


def save_moments(moments: dict[int, Moments], path: Path) -> None:
    """Per-expert input moments as safetensors (`{layer}.{expert}.x2` [H], `.a2` [F]); an expert
    that saw no token has no entry."""
    from safetensors.torch import save_file

    tensors = {f"{layer}.{e}.{n}": t.contiguous() for layer, per in moments.items() for e, m in per.items()
               if m is not None for n, t in zip(("x2", "a2"), m)}
    save_file(tensors, path, metadata={"format": "pt"})


def load_moments(path: Path, layer: int, num_experts: int) -> Moments:
    """One layer's moments from `save_moments`' file (only that layer's bytes are read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        return {e: (f.get_tensor(f"{layer}.{e}.x2"), f.get_tensor(f"{layer}.{e}.a2")) if f"{layer}.{e}.x2" in keys else None
                for e in range(num_experts)}
