"""Stage 5, per layer: the fused MoE kernel on the shipped folder, with the model's own routing.

One streamed forward of the quantized model (the shipped folder, read as `streaming.streamed` reads
it) over one window of calibration text. At every MoE layer the experts module's inputs are
captured: the hidden states and the router's decisions (top-k experts and weights; Switch's
one-hot dispatch with its capacity drops). Then, per layer, the fused kernel
(`kernels.fused_moe`) runs on that layer's packed experts for

  * 'prefill': every token of the window (the tile path), and
  * 'decode':  its first `DECODE_TOKENS` tokens (the GEMV-style path),
  * on a GPU, 'prefill-bf16' (or -fp16): the prefill in the dtype the model is served in,
    within `HALF_RTOL`,

and is compared with `fused_moe_reference` (per-expert dequantize-then-matmul in float64). On the
full layer the model's own output (its per-expert torch path) is compared too.

In the Triton interpreter (no GPU) a real-size layer would take minutes per launch, so there the
kernel runs on the first `INTERPRETER_FFN` ffn units and `INTERPRETER_HIDDEN` output features of
every expert (the packed bytes re-packed exactly; the reference on the same slice); the table says
how much of each layer was checked.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch

from expertbits.kernels.bank import ExpertBank, activation_name
from expertbits.kernels.packing import QuantizedTensor, pack, unpack

from ..errors import CheckpointError
from ..model.packed_folder import iter_quantized, quantization_config

Progress = Callable[[float, str], None]

DECODE_TOKENS = 4
HALF_RTOL = 2e-2  # bf16/fp16 activations: h is rounded to 8 (bf16) or 11 (fp16) significant bits
INTERPRETER_FFN = 256
INTERPRETER_HIDDEN = 256


def validate_fused(qpath: Path, text: str, *, seq_len: int, rtol: float = 1e-4,
                   progress: Progress | None = None) -> list[dict]:
    """One row per (MoE layer, case) of the quantized folder `qpath`; see the module docstring."""
    from expertbits.kernels.dequant_matmul import interpreted

    captured, dtype = _capture(qpath, text, seq_len)
    qc = quantization_config(qpath)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for i, (layer, (x, index, weights, model_out, act)) in enumerate(sorted(captured.items())):
        banks = _banks(qpath, layer, qc)
        ffn, hidden = banks["gate"].shape
        f_keep, h_keep = (min(ffn, INTERPRETER_FFN), min(hidden, INTERPRETER_HIDDEN)) if interpreted() else (ffn, hidden)
        banks = {role: _slice(b, role, f_keep, h_keep).to(device) for role, b in banks.items()}
        name = activation_name(act)
        cases = [("prefill", len(x), torch.float32, rtol), ("decode", min(DECODE_TOKENS, len(x)), torch.float32, rtol)]
        if device == "cuda" and dtype in HALF_NAMES:  # the path the served model takes
            cases.append((f"prefill-{HALF_NAMES[dtype]}", len(x), dtype, HALF_RTOL))
        for case, count, x_dtype, tol in cases:
            # the model's own output (an fp32 forward) is compared on full layers, in fp32
            full = (f_keep, h_keep) == (ffn, hidden) and x_dtype == torch.float32
            rows.append(_check(layer, case, x[:count].to(x_dtype), index[:count], weights[:count],
                               model_out[:count] if full else None, banks, name, ffn, hidden, tol, device))
        if progress:
            progress((i + 1) / len(captured), f"fused kernel: layer {layer} checked")
    return rows


def summarize(table) -> dict:
    """The fused check's part of the validation summary (`passed` None: an activation the kernel
    does not fuse, counted apart)."""
    return {"fused_layers": int(table.layer.nunique()), "fused_failed": int((table.passed == False).sum()),  # noqa: E712
            "fused_not_applicable": int(table.passed.isna().sum()),
            "fused_max_rel_error": None if table.rel_error.isna().all() else float(table.rel_error.max()), "fused_sliced": bool((table.ffn_checked < table.ffn).any()
                                                                                      or (table.hidden_checked < table.hidden).any())}


def _check(layer: int, case: str, x, index, weights, model_out, banks: dict[str, ExpertBank], activation: str | None,
           ffn: int, hidden: int, rtol: float, device: str) -> dict:
    from expertbits.kernels.fused_moe import choose_launch, fused_moe, fused_moe_reference

    gate, up, down = banks["gate"], banks.get("up"), banks["down"]
    valid = index[(index >= 0) & (index < gate.num_experts)]
    row = {"layer": layer, "phase": case, "tokens": len(x), "pairs": int(valid.numel()),
           "experts_hit": int(valid.unique().numel()), "experts": gate.num_experts,
           "widths": ",".join(f"{b}:{gate.bits.count(b)}" for b in sorted(set(gate.bits))),
           "ffn_checked": gate.shape[0], "ffn": ffn, "hidden_checked": down.shape[0], "hidden": hidden,
           "activation": activation or "", "block_m": None, "gemv_path": None, "max_abs_error": None, "rel_error": None,
           "model_rel_error": None, "rtol": rtol, "passed": False}
    if activation is None:  # the loader runs such experts one by one (with a warning): not applicable, reported
        row["passed"] = None
        return row
    launch = choose_launch(len(x) * index.shape[1], gate.num_experts, (gate.shape, down.shape),
                           int(torch.bincount(valid).max()) if valid.numel() else 1)
    x, index, weights = x.to(device), index.to(device), weights.to(device)
    out = fused_moe(x, index, weights, gate, up, down, activation, launch=launch).double().cpu()
    ref = fused_moe_reference(x, index, weights, gate, up, down, activation).cpu()
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((out - ref).abs().max())
    row.update(block_m=launch.block_m, gemv_path=not launch.use_dot, max_abs_error=err, rel_error=err / scale,
               passed=err / scale <= rtol)
    if model_out is not None:
        row["model_rel_error"] = float((model_out.double() - ref).abs().max()) / scale
    return row


def _capture(qpath: Path, text: str, seq_len: int) -> tuple[dict[int, tuple], torch.dtype]:
    """Per MoE layer: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k], the layer's own
    output [T, H], its activation) from one streamed forward of the shipped model; and the
    model's serving dtype."""
    from ..checkpoints.texts import text_examples
    from ..model.streaming import batches, is_seq2seq, streamed

    qc = quantization_config(qpath)
    seq2seq = is_seq2seq(qpath)
    tokenizer, pairs = text_examples(qpath, text, seq_len, 1, seq2seq)
    captured: dict[int, tuple] = {}
    with streamed(qpath, keep_bytes=0) as model:
        for layer, module_name in qc["experts_modules"].items():
            experts = model.get_submodule(module_name)
            act = getattr(experts, "act_fn", None) or getattr(next(iter(experts.children()), None), "act", None)
            if act is None:
                raise CheckpointError(f"{qpath}: cannot find the activation of layer {layer}'s experts ({module_name})",
                                      "this architecture's experts are not supported by the fused kernel yet")

            params = inspect.signature(experts.forward)

            def hook(module, args, kwargs, output, layer=int(layer), act=act, params=params):
                hidden, index, weights = (a.detach() for a in params.bind(*args, **kwargs).arguments.values())
                if index.dim() == 3:  # Switch: one-hot dispatch [T, 1, E]; a token over capacity has none
                    hit = index.sum(-1) > 0
                    index = torch.where(hit, index.argmax(-1), -1)
                captured[layer] = (hidden.float(), index.long(), weights.reshape(index.shape).float(),
                                   output.detach().float(), act)

            experts.register_forward_hook(hook, with_kwargs=True)
        inputs = next(iter(batches(pairs, tokenizer.pad_token_id or 0, 1, logits_bytes=1 << 62)))[0]
        with torch.no_grad():
            model(**inputs)
    missing = sorted(set(map(int, qc["experts_modules"])) - set(captured))
    if missing:
        raise CheckpointError(f"{qpath}: the forward never reached the experts of layers {missing}",
                              "this architecture routes tokens in a way the fused check does not know; report it")
    return captured, served_dtype(qpath)


HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def served_dtype(qpath: Path) -> torch.dtype:
    """The dtype the checkpoint is served in: its config.json's `dtype` (`torch_dtype` in older
    files), fp32 when it names none. Read from the file: the streamed model is built in fp32 and
    transformers rewrites its config's dtype to match."""
    config = json.loads((Path(qpath) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _banks(qpath: Path, layer: int, qc: dict) -> dict[str, ExpertBank]:
    """The layer's packed matrices, one bank per role, read from the shipped shards."""
    by_role: dict[str, dict[int, QuantizedTensor]] = {}
    for _, info, q in iter_quantized(qpath, layer=layer):
        by_role.setdefault(info["role"], {})[info["expert"]] = q
    count = len(qc["expert_bits"][str(layer)])
    for role, per in by_role.items():
        if sorted(per) != list(range(count)):
            raise CheckpointError(f"{qpath}: layer {layer} has {role} matrices for experts {sorted(per)}, expected 0..{count - 1}",
                                  "the folder is incomplete or was edited; quantize again")
    return {role: ExpertBank.stack([per[e] for e in range(count)]) for role, per in by_role.items()}


def _slice(bank: ExpertBank, role: str, ffn: int, hidden: int) -> ExpertBank:
    """The bank cut to the first `ffn` ffn units and `hidden` output features: gate/up keep their
    first `ffn` rows; down its first `hidden` rows and first `ffn` columns (codes re-packed)."""
    n, k = bank.shape
    rows, cols = (ffn, k) if role in ("gate", "up") else (hidden, ffn)
    if (rows, cols) == (n, k):
        return bank
    groups = -(-cols // bank.group_size)
    cut = []
    for e in range(bank.num_experts):
        q = bank.expert(e)
        packed = q.packed[:rows] if cols == k else pack(unpack(q.packed[:rows], q.bits, k)[:, :cols], q.bits)
        # a rotated matrix cut to fewer inputs is rotated by the first `cols` signs, in the cut's own
        # blocks: a different R, but orthogonal, so kernel and reference must still agree
        cut.append(QuantizedTensor(packed.contiguous(), q.scales[:rows, :groups].contiguous(),
                                   q.zeros[:rows, :groups].contiguous(), q.bits, q.group_size, (rows, cols),
                                   None if q.signs is None else q.signs[:cols].contiguous()))
    return ExpertBank.stack(cut)
