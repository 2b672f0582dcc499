"""How fast a model runs where it is served: prefill and decode tokens per second at batch 1.

    prefill   one forward over a prompt of `prompt` tokens (KV cache on), timed after a warm-up
    decode    `new` greedy steps after that prompt, one token each, through the KV cache

Timed with the device synchronised before each clock read. The evaluation stage measures the
quantized folder as `expertbits.load` serves it (on a GPU: its experts through the fused MoE
kernel) beside the full-precision checkpoint loaded by transformers, when that fits in the
device's free memory; a model that does not fit is reported as such, never measured streamed
(a streamed model's speed is the disk's, not the model's). Figures are measurements of one run:
they go into throughput.json and the logs, never into a cache key.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..placement import MARGIN_BYTES, Placement, synchronize

PROMPT, NEW = 512, 64


def measure(model, placement: Placement, *, prompt: int = PROMPT, new: int = NEW, seed: int = 0) -> dict:
    """Prefill and decode tokens/s of a causal LM already on the placement's device."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, prompt), generator=g).to(placement.device)
    with torch.no_grad():
        model(ids[:, :16], use_cache=True)  # warm-up: kernels compiled, caches allocated
        synchronize(placement)
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        synchronize(placement)
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # transformers 5's KV cache
        start = time.perf_counter()
        for _ in range(new):
            out = model(token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        synchronize(placement)
        decode = time.perf_counter() - start
    return {"prefill_tokens_per_s": round(prompt / prefill, 1), "decode_tokens_per_s": round(new / decode, 2),
            "prompt_tokens": prompt, "decode_tokens": new}


def compare(fp_path: Path, quantized, placement: Placement, *, prompt: int = PROMPT, new: int = NEW) -> dict:
    """{"device", "quantized": figures, "full_precision": figures or why not measured}: `quantized`
    is the served model already on the placement's device (the one evaluation ran), the full-precision
    checkpoint at `fp_path` is loaded here."""
    from ..model.streaming import is_seq2seq

    out = {"device": placement.name, "dtype": placement.dtype, "batch": 1}
    if is_seq2seq(fp_path):
        return dict(out, measured=False, why="encoder-decoder models (Switch) are not timed: their decode is the "
                                             "decoder's alone, no figure a user serves by")
    out["quantized"] = measure(quantized, placement, prompt=prompt, new=new)
    out["full_precision"] = _full_precision(fp_path, placement, prompt, new)
    return out


def _full_precision(path: Path, placement: Placement, prompt: int, new: int) -> dict:
    from transformers import AutoModelForCausalLM

    from ..checkpoints.reader import Checkpoint

    with Checkpoint.open(path) as ckpt:  # the headers: every stored tensor in the compute dtype
        weights = sum(math.prod(info.shape) for info in ckpt.tensors.values()) * placement.torch_dtype.itemsize
    free = torch.cuda.mem_get_info(torch.device(placement.device))[0] if placement.is_cuda else None
    if free is not None and weights + MARGIN_BYTES > free:
        return {"measured": False, "why": f"needs about {(weights + MARGIN_BYTES) / 2**30:.1f} GiB, "
                                          f"{free / 2**30:.1f} GiB free on {placement.device}"}
    host = _host_available()  # transformers builds it on the host first, then it is moved
    if host is not None and weights > host:
        return {"measured": False, "why": f"needs about {weights / 2**30:.1f} GiB of host memory to load, "
                                          f"{host / 2**30:.1f} GiB available"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.torch_dtype, trust_remote_code=False)
    try:
        return measure(model.to(placement.device).eval(), placement, prompt=prompt, new=new)
    finally:
        del model
        _release(placement)


def _host_available() -> int | None:
    """Host memory this process may still take: the machine's available memory, capped by its
    cgroup's limit (a container's) where there is one."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _release(placement: Placement) -> None:
    if placement.is_cuda:
        torch.cuda.empty_cache()


def describe(figures: dict) -> str:
    if not figures.get("measured", True):
        return f"speed not measured: {figures['why']}"
    q, fp = figures["quantized"], figures["full_precision"]
    line = (f"speed on {figures['device']} ({figures['dtype']}, batch 1): quantized prefill "
            f"{q['prefill_tokens_per_s']:.0f} tokens/s, decode {q['decode_tokens_per_s']:.1f} tokens/s")
    if fp.get("measured", True):
        line += (f"; full precision prefill {fp['prefill_tokens_per_s']:.0f} tokens/s, decode "
                 f"{fp['decode_tokens_per_s']:.1f} tokens/s")
    else:
        line += f"; full precision not measured: {fp['why']}"
    return line
