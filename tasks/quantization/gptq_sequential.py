"""GPTQ with routed, sequential calibration: each expert's Hessian from the tokens its router sends
it, each layer calibrated on the outputs of the layers before it, already quantized.

One streamed forward of the model's decoder over every calibration window (one batch, so a MoE
layer sees all of its calibration tokens at once; the head is never run). When a layer's
router hands expert e its tokens x [T_e, H] (routing weights r [T_e]):

    gate, up  ← GPTQ against H_in  = Σ xᵀx                    (the tokens routed to e;
                                                                 `weighted`: Σ r·xᵀx)
    a          = act(x Q(gate)ᵀ) ⊙ (x Q(up)ᵀ)                  (through the quantized gate and up)
    down      ← GPTQ against H_out = Σ aᵀa
    the expert's output is computed from the quantized weights

so the next layer's experts see what the quantized model will give them. An expert that gets
fewer than `min_tokens` tokens (or none) is rounded by the data-free quantizer instead (RTN,
with the clipping search if `clip`) and reported in the coverage table: a Hessian of a handful
of tokens overfits them, and no token is no information, never a reason to zero a weight (what
llm-compressor's routed-only GPTQ did).

`gptq_errors` measures what GPTQ costs each expert at every width, for the solver allocators,
before any bits are chosen: the same per-expert Hessians, from the full-precision model (the
quantized layers do not exist yet), and the error a matrix's output suffers per routed token,
tr(ΔW H ΔWᵀ) / T_e with the full Hessian (GPTQ trades errors between correlated inputs, which a
diagonal would not see), and what the expert's contribution to the layer output loses per routed
token with all three matrices quantized, Σ_t r_t² ‖y_q(x_t) − y(x_t)‖² / T_e (`output_error`: through
the activation and down, in the residual stream's units, so comparable across layers). Which experts fall back is decided there by the full-precision routing;
the quantized model routes a few tokens differently, so an expert right at `min_tokens` may be
costed with one quantizer and quantized with the other.

With a CUDA placement (tasks/placement.py) the forward, the Hessians (float32) and their
factorisations run on the GPU, one decoder layer and one expert's weights there at a time; the
packed matrices come back to the host as each layer is written.

Only the routed experts of fused-layout gated MoE layers (Mixtral, Qwen, OLMoE, DeepSeek) are
supported; Switch's per-expert modules are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from expertbits.kernels.modules import LazyExperts
from expertbits.kernels.packing import QuantizedTensor

from ..checkpoints.adapters import MoELayer, block_of, detect
from ..checkpoints.reader import Checkpoint
from ..errors import CheckpointError
from ..placement import CPU, Placement
from .dense import Dense, DenseGPTQ, DenseWidths, dense_linears
from .method import QuantizerConfig

Progress = Callable[[float, str], None]
ROLES = ("gate", "up", "down")


class _Routed(LazyExperts):
    """One layer's experts, handed each expert's routed tokens before its forward."""

    def __init__(self, base: LazyExperts, layer: MoELayer, group_size: int, cfg: QuantizerConfig):
        super().__init__(base.num_experts, base.act_fn, base._read)
        self.layer, self.group_size, self.cfg = layer, group_size, cfg
        self.names = {(m.expert, m.role): m.name for m in layer.matrices}
        self.tokens: dict[int, int] = {}

    def _scaled(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Rows of t times √r, so that tᵀt sums r·t tᵀ (`weighted`), or t as is."""
        return t * weight.float().clamp(min=0).sqrt()[:, None] if self.cfg.weighted else t

    def h_in(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The Hessian of gate and up: the routed tokens' Gram matrix."""
        xs = self._scaled(x.float(), weight)
        return xs.T @ xs

    def h_out(self, x: torch.Tensor, weight: torch.Tensor, gate, up) -> torch.Tensor:
        """The Hessian of down: the Gram matrix of the hidden activation through `gate` and `up`
        (quantized or not)."""
        xf = x.float()
        a = self._scaled(self.act_fn(xf @ _dense(gate).T) * (xf @ _dense(up).T), weight)
        return a.T @ a

    def gptq(self, w: torch.Tensor, h: torch.Tensor, bits: int) -> QuantizedTensor:
        return self.cfg.gptq_matrix(w, h, bits, self.group_size)


def _dense(w) -> torch.Tensor:
    return w.dequantize() if isinstance(w, QuantizedTensor) else w.float()


class _Calibrating(_Routed):
    """Quantizes each expert with GPTQ on the tokens it is given; its forward runs the quantized weights."""

    def __init__(self, base: LazyExperts, layer: MoELayer, bits: dict[int, int], group_size: int, cfg: QuantizerConfig):
        super().__init__(base, layer, group_size, cfg)
        self.bits = bits
        self.packed: dict[str, QuantizedTensor] = {}

    def expert_for(self, e: int, x: torch.Tensor, weight: torch.Tensor) -> tuple:
        gate, up, down = (w.float() for w in self._read(e))
        bits = self.bits[e]
        self.tokens[e] = x.shape[0]
        if x.shape[0] < self.cfg.min_tokens:
            q = tuple(self.cfg.round_matrix(w, bits, self.group_size) for w in (gate, up, down))
        else:
            h_in = self.h_in(x, weight)
            qg, qu = self.gptq(gate, h_in, bits), self.gptq(up, h_in, bits)
            qd = self.gptq(down, self.h_out(x, weight, qg, qu), bits)
            q = (qg, qu, qd)
        for role, t in zip(ROLES, q):
            self.packed[self.names[e, role]] = t
        return q

    def finish(self) -> dict[str, QuantizedTensor]:
        """The layer's packed matrices, experts no token reached rounded by the data-free quantizer."""
        for e in range(self.num_experts):
            if e not in self.tokens:
                self.tokens[e] = 0
                for role, w in zip(ROLES, self._read(e)):
                    self.packed[self.names[e, role]] = self.cfg.round_matrix(w.float(), self.bits[e], self.group_size)
        out, self.packed = self.packed, {}
        return out


class _Measuring(_Routed):
    """Measures every expert's GPTQ error at each width; its forward runs the full-precision weights."""

    def __init__(self, base: LazyExperts, layer: MoELayer, widths: tuple[int, ...], group_size: int, cfg: QuantizerConfig):
        super().__init__(base, layer, group_size, cfg)
        self.widths = widths
        self.rows: list[dict] = []

    def expert_for(self, e: int, x: torch.Tensor, weight: torch.Tensor) -> tuple:
        gate, up, down = ws = tuple(w.float() for w in self._read(e))
        self.tokens[e] = tokens = x.shape[0]
        hs = self.h_in(x, weight), self.h_out(x, weight, gate, up)
        xf, r2 = x.float(), weight.double().square()
        y = self._mlp(xf, *ws)
        for b in self.widths:
            we = re = 0.0
            deq = []
            for w, h in zip(ws, (hs[0], hs[0], hs[1])):
                q = self.gptq(w, h, b) if tokens >= self.cfg.min_tokens else self.cfg.round_matrix(w, b, self.group_size)
                deq.append(q.dequantize())
                d = (w - deq[-1]).double()
                we += float(d.square().sum())
                re += float(torch.einsum("nk,kl,nl->", d, h.double(), d)) / tokens
            # what the layer's output loses per routed token: through the activation and down, times r
            oe = float(((self._mlp(xf, *deq) - y).double().square().sum(1) * r2).sum()) / tokens
            self.rows.append(self._row(e, b, we, re, oe))
        return ws

    def _mlp(self, x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return (self.act_fn(x @ gate.T) * (x @ up.T)) @ down.T

    def finish(self) -> list[dict]:
        for e in range(self.num_experts):
            if e not in self.tokens:  # never routed: no input statistics, as calibrate.layer_errors
                self.tokens[e] = 0
                ws = [w.float() for w in self._read(e)]
                for b in self.widths:
                    we = sum(float((w - self.cfg.round_matrix(w, b, self.group_size).dequantize()).double().square().sum())
                             for w in ws)
                    self.rows.append(self._row(e, b, we, 0.0, 0.0))
        return sorted(self.rows, key=lambda r: (r["expert"], r["bits"]))

    def _row(self, e: int, bits: int, we: float, re: float, oe: float) -> dict:
        return {"layer": self.layer.layer, "expert": e, "bits": bits, "symmetric_quant": self.cfg.symmetric,
                "quantizer": self.cfg.label, "weight_error": we, "routed_input_error": re, "output_error": oe}


def _run(ft_path: Path, text: str, seq_len: int, windows: int, wrap: Callable[[int, MoELayer, LazyExperts], _Routed],
         on_layer: Callable[[int, _Routed], None], progress: Progress | None, placement: Placement,
         dense: Callable[[nn.Module, list[MoELayer]], DenseGPTQ] | None = None) -> list[MoELayer]:
    """One streamed forward of the decoder over every window, each MoE layer's experts wrapped;
    `on_layer(position, experts)` once each MoE layer's decoder layer is done (its attention,
    routed and shared experts). `dense(model, layers)`: the hooks that quantize the dense layers."""
    from ..checkpoints.texts import text_examples
    from ..model.streaming import batches, is_seq2seq, streamed, to_device

    if is_seq2seq(ft_path):
        raise CheckpointError(f"{ft_path}: GPTQ supports decoder-only MoE models", "use --quantizer rtn for Switch")
    with Checkpoint.open(ft_path) as ckpt:
        layers = list(detect(ckpt).layers)
    tokenizer, pairs = text_examples(ft_path, text, seq_len, windows, False)
    with streamed(ft_path, keep_bytes=0, dtype=placement.torch_dtype, device=placement.device) as model:
        hooks = dense(model, layers) if dense else None
        for position, layer in enumerate(layers):
            experts = model.get_submodule(layer.experts_module)
            if not isinstance(experts, LazyExperts):
                raise CheckpointError(f"{ft_path}: layer {layer.layer}'s experts are not a fused gated MLP",
                                      "use --quantizer rtn for this architecture")
            wrapped = wrap(position, layer, experts)

            def done(module, args, output, position=position, wrapped=wrapped):
                on_layer(position, wrapped)
                if progress:
                    progress((position + 1) / len(layers), f"GPTQ: layer {layers[position].layer} done")

            model.get_submodule(block_of(layer.experts_module)).register_forward_hook(done)
            model.set_submodule(layer.experts_module, wrapped)
        inputs = next(iter(batches(pairs, tokenizer.pad_token_id or 0, 1, logits_bytes=1 << 62)))[0]  # one batch
        with torch.no_grad():
            # the decoder only: the head's logits are not needed (a quantized head takes the final hidden states)
            hidden = model.base_model(**to_device(inputs, placement.device))[0]
            if hooks is not None:
                hooks.quantize_head(model, hidden)
    return layers


def sequential_gptq(ft_path: Path, text: str, alloc: pd.DataFrame, group_size: int,
                    quantizer: QuantizerConfig = QuantizerConfig("gptq"), *, seq_len: int, windows: int,
                    dense: DenseWidths = DenseWidths(),
                    on_layer: Callable[[int, dict[str, QuantizedTensor], dict[str, Dense]], None] | None = None,
                    progress: Progress | None = None,
                    placement: Placement = CPU) -> tuple[dict[str, QuantizedTensor], pd.DataFrame, dict[str, Dense]]:
    """(packed expert matrix by module name, coverage: one row per expert with its calibration
    tokens and the quantizer it got, packed dense layers by module name with their stored weight's
    key). With `on_layer(position, packed, dense)`, each MoE layer's matrices and its decoder
    layer's dense ones go there as soon as the layer is done, and are not kept (memory: one layer's
    packed weights); the dense layers of other decoder layers and the head are returned."""
    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    out: dict[str, QuantizedTensor] = {}
    coverage: list[dict] = []
    state: dict[str, DenseGPTQ] = {}

    def hooks(model, layers):
        from ..checkpoints.adapters import load_renames

        with Checkpoint.open(ft_path) as ckpt:
            stored = set(ckpt.tensors)
        targets = dense_linears(model, layers, dense, stored, load_renames(model.config.model_type), ft_path)
        state["dense"] = DenseGPTQ(targets, quantizer, group_size)
        state["dense"].attach(model)
        return state["dense"]

    def take(block: str | None) -> dict[str, Dense]:
        if "dense" not in state:
            return {}
        d = state["dense"]
        return {n: (q, d.targets[n].key) for n, q in d.take(block).items()}

    def wrap(position, layer, experts):
        return _Calibrating(experts, layer, {e: bits_of[layer.layer, e] for e in range(layer.num_experts)}, group_size,
                            quantizer)

    def done(position, module: _Calibrating):
        packed = module.finish()
        for e in range(module.num_experts):
            tokens = module.tokens[e]
            coverage.append({"layer": module.layer.layer, "expert": e, "bits": module.bits[e], "calibration_tokens": tokens,
                             "quantizer": quantizer.label if tokens >= quantizer.min_tokens else
                             quantizer.data_free.label + "-fallback"})
        own = take(block_of(module.layer.experts_module))
        if on_layer:
            on_layer(position, packed, own)
        else:
            out.update({name: q.to("cpu") for name, q in packed.items()})
            rest.update(own)

    rest: dict[str, Dense] = {}
    layers = _run(ft_path, text, seq_len, windows, wrap, done, progress, placement, hooks if dense.active else None)
    if len({r["layer"] for r in coverage}) != len(layers):
        raise CheckpointError(f"{ft_path}: GPTQ calibration reached {len({r['layer'] for r in coverage})} of "
                              f"{len(layers)} MoE layers", "this architecture is not supported by GPTQ; use --quantizer rtn")
    if "dense" in state and state["dense"].missing():
        missing = state["dense"].missing()
        raise CheckpointError(f"{ft_path}: {len(missing)} dense layers never ran in the calibration forward, e.g. "
                              f"{missing[:3]}", "this architecture is not supported by --dense-bits; drop the option")
    rest.update(take(None))
    return out, pd.DataFrame(coverage), rest


def gptq_shards(ckpt: Checkpoint, src: Path, text: str, alloc: pd.DataFrame, group_size: int,
                quantizer: QuantizerConfig, out: Path, *, seq_len: int, windows: int, dense: DenseWidths = DenseWidths(),
                write: Callable[[dict], dict] = lambda part: part, progress: Progress | None = None,
                placement: Placement = CPU) -> list[dict]:
    """Every shard of `ckpt` (open, stored at `src`) with sequential GPTQ: each MoE layer's written
    into `out` as soon as its layer is calibrated and handed to `write` (the flow puts it in the
    store), each part with its layer's calibration coverage; then the other shards (embeddings,
    head, dense decoder layers: as stored, or with the dense layers `dense` quantizes)."""
    from . import writer

    parts: list[dict] = []

    def on_layer(position: int, packed: dict, own: dict) -> None:
        parts.append(write(writer.quantize_layer(ckpt, position, alloc, group_size, quantizer.symmetric, out,
                                                 quantizer=lambda m, w, bits: packed[m.name], dense=own)))

    _, coverage, rest = sequential_gptq(src, text, alloc, group_size, quantizer, seq_len=seq_len, windows=windows,
                                        dense=dense, on_layer=on_layer, progress=progress, placement=placement)
    for part, layer in zip(parts, dict.fromkeys(coverage.layer)):
        part["coverage"] = coverage[coverage.layer == layer].to_dict(orient="records")
    return parts + [write(p) for p in writer.write_rest(ckpt, out, rest)]


def quantize_checkpoint_gptq(src: Path, alloc: pd.DataFrame, group_size: int, quantizer: QuantizerConfig, text: str,
                             out: Path, *, seq_len: int, windows: int, dense: DenseWidths = DenseWidths(),
                             progress: Progress | None = None, placement: Placement = CPU) -> dict:
    """`writer.quantize_checkpoint` with sequential GPTQ: `gptq_shards` (every shard), then `finish`."""
    from . import writer

    out.mkdir(parents=True)
    with Checkpoint.open(src) as ckpt:
        writer.check_allocation(ckpt, alloc)
        parts = gptq_shards(ckpt, src, text, alloc, group_size, quantizer, out, seq_len=seq_len, windows=windows,
                            dense=dense, progress=progress, placement=placement)
    return writer.finish(src, alloc, group_size, quantizer.symmetric, parts, out, quantizer.as_dict(), dense.as_dict())


def gptq_errors(ft_path: Path, text: str, bit_widths: tuple[int, ...], group_size: int, quantizer: QuantizerConfig,
                *, seq_len: int, windows: int, progress: Progress | None = None,
                placement: Placement = CPU) -> list[dict]:
    """expert_qerror rows measured with GPTQ: weight error and routed output error per token, every
    expert at every width (see the module docstring)."""
    rows: list[dict] = []
    layers = _run(ft_path, text, seq_len, windows,
                  lambda position, layer, experts: _Measuring(experts, layer, tuple(bit_widths), group_size, quantizer),
                  lambda position, module: rows.extend(module.finish()), progress, placement)
    if len({r["layer"] for r in rows}) != len(layers):
        raise CheckpointError(f"{ft_path}: GPTQ calibration reached {len({r['layer'] for r in rows})} of {len(layers)} "
                              "MoE layers", "this architecture is not supported by GPTQ; use --quantizer rtn")
    return rows

