"""GPTQ with routed, sequential calibration: each expert's Hessian from the tokens its router sends
it, each layer calibrated on the outputs of the layers before it, already quantized.

One streamed forward of the full-precision model over every calibration window (one batch, so a
MoE layer sees all of its calibration tokens at once). When a layer's router hands expert e its
tokens x [T_e, H]:

    gate, up  ← GPTQ against H_in  = Σ xᵀx                    (the tokens routed to e)
    a          = act(x Q(gate)ᵀ) ⊙ (x Q(up)ᵀ)                  (through the quantized gate and up)
    down      ← GPTQ against H_out = Σ aᵀa
    the expert's output is computed from the quantized weights

so the next layer's experts see what the quantized model will give them. An expert that gets
fewer than `min_tokens` tokens (or none) is rounded to nearest (RTN) instead and reported:
a Hessian of a handful of tokens overfits them, and no token is no information, never a reason
to zero a weight (what llm-compressor's routed-only GPTQ did).

Only the routed experts of fused-layout gated MoE layers (Mixtral, Qwen, OLMoE, DeepSeek) are
supported; Switch's per-expert modules are refused.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from expertbits.kernels.gptq import gptq
from expertbits.kernels.modules import LazyExperts
from expertbits.kernels.packing import QuantizedTensor, quantize_rtn

from .adapters import detect
from .checkpoint import Checkpoint
from .errors import CheckpointError


class _Calibrating(LazyExperts):
    """A layer's experts that quantize themselves with GPTQ on the tokens they are given."""

    def __init__(self, base: LazyExperts, layer, bits: dict[int, int], group_size: int, opts: dict, out: dict, seen: dict):
        super().__init__(base.num_experts, base.act_fn, base._read)
        self.layer, self.bits, self.group_size, self.opts, self.out, self.seen = layer, bits, group_size, opts, out, seen
        self.names = {(m.expert, m.role): m.name for m in layer.matrices}

    def expert_for(self, e: int, x: torch.Tensor) -> tuple:
        gate, up, down = (w.float() for w in self._read(e))
        bits, tokens = self.bits[e], x.shape[0]
        self.seen[self.layer.layer, e] = tokens
        if tokens < self.opts["min_tokens"]:
            q = tuple(quantize_rtn(w, bits, self.group_size, self.opts["symmetric"]) for w in (gate, up, down))
        else:
            xf = x.float()
            h_in = xf.T @ xf
            qg, qu = (gptq(w, h_in, bits, self.group_size, symmetric=self.opts["symmetric"], damp=self.opts["damp"],
                           act_order=self.opts["act_order"]) for w in (gate, up))
            a = (self.act_fn(xf @ qg.dequantize().T) * (xf @ qu.dequantize().T))
            qd = gptq(down, a.T @ a, bits, self.group_size, symmetric=self.opts["symmetric"], damp=self.opts["damp"],
                      act_order=self.opts["act_order"])
            q = (qg, qu, qd)
        for role, t in zip(("gate", "up", "down"), q):
            self.out[self.names[e, role]] = t
        return q


def sequential_gptq(ft_path: Path, text: str, alloc: pd.DataFrame, group_size: int, *, seq_len: int, windows: int,
                    symmetric: bool = False, damp: float = 0.01, act_order: bool = False,
                    min_tokens: int = 16) -> tuple[dict[str, QuantizedTensor], pd.DataFrame]:
    """(packed matrix by module name, coverage: one row per expert with its calibration tokens
    and the quantizer it got)."""
    from transformers import AutoTokenizer

    from .evaluate import examples, token_windows
    from .stream import batches, streamed

    bits_of = {(int(r.layer), int(r.expert)): int(r.bits) for r in alloc.itertuples()}
    with Checkpoint.open(ft_path) as ckpt:
        model_info = detect(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ft_path)
    pairs = examples(token_windows(text, tokenizer, seq_len, windows), tokenizer, False)
    out: dict[str, QuantizedTensor] = {}
    seen: dict[tuple[int, int], int] = {}
    opts = {"symmetric": symmetric, "damp": damp, "act_order": act_order, "min_tokens": min_tokens}
    with streamed(ft_path, keep_bytes=0) as model:
        if getattr(model.config, "is_encoder_decoder", False):
            raise CheckpointError(f"{ft_path}: GPTQ supports decoder-only MoE models", "use the RTN quantizer for Switch")
        for layer in model_info.layers:
            experts = model.get_submodule(layer.experts_module)
            if not isinstance(experts, LazyExperts):
                raise CheckpointError(f"{ft_path}: layer {layer.layer}'s experts are not a fused gated MLP",
                                      "use the RTN quantizer for this architecture")
            bits = {e: bits_of[layer.layer, e] for e in range(layer.num_experts)}
            model.set_submodule(layer.experts_module, _Calibrating(experts, layer, bits, group_size, opts, out, seen))
        chunks = list(batches(pairs, tokenizer.pad_token_id or 0, 1, logits_bytes=1 << 62))  # one batch: every token
        with torch.no_grad():
            model(**chunks[0][0])
        with Checkpoint.open(ft_path) as ckpt:  # experts no token reached: RTN, reported
            for m in model_info.matrices:
                if m.name not in out:
                    out[m.name] = quantize_rtn(ckpt.read(m.key, m.index, m.rows), bits_of[m.layer, m.expert],
                                               group_size, symmetric)
    coverage = pd.DataFrame([{"layer": layer.layer, "expert": e, "calibration_tokens": seen.get((layer.layer, e), 0),
                              "quantizer": "gptq" if seen.get((layer.layer, e), 0) >= min_tokens else "rtn-fallback"}
                             for layer in model_info.layers for e in range(layer.num_experts)])
    return out, coverage
