"""Training loop for the zoo's MoE models, with routing balanced per layer.

transformers' load-balancing loss pools the router logits of all layers before balancing, which
lets individual layers starve experts (a probe left 5-7 of 16 experts per layer with under 1%
of the routing slots). Here every layer is balanced on its own:

    balance_l = E · Σ_e f_{l,e} · P_{l,e}     f: fraction of top-k slots routed to e, P: mean router prob
    z_l       = mean_t (logsumexp_e logits_{l,t,e})²          (router z-loss, as in ST-MoE)
    loss      = LM loss + balance_coef · mean_l balance_l + z_coef · mean_l z_l

With `balance_per_stream`, balance_l is averaged over the batch's data streams instead of taken
over the whole batch: a fine-tune's new domain must use every expert by itself, not only with
the pretraining replay beside it (pooled, the code fine-tune left one expert at 0.12 of its fair
share on code). `balance_per_sequence` goes further and balances every sequence, as DeepSeek-V3's
sequence-wise loss, for Switch-tiny, whose balance over whole batches still let single
sequences put most of their tokens on one expert.

Top-1 routing needs more: an expert no token picks gets no gradient from balance_l (f = 0),
and once the router's probabilities are near uniform balance_l is ≈ 1 whatever f is, so a
Switch model trained with these losses alone kept a dead encoder expert. Routers that carry a
bias (Switch's `router_bias`) are therefore balanced without a loss, as in DeepSeek-V3: after
every step each bias moves by `bias_step` towards its layer's mean load,

    b_{l,e} += bias_step · sign(mean_e' n_{l,e'} − n_{l,e})      n: tokens routed to e this step

and the bias is saved with the model, so inference routes exactly as training did: provided
training runs the same network as inference. T5's dropout (0.1, on in training only) made a
router balanced under dropout starve an expert at inference (on one training batch the least-used
expert of an encoder layer got 0.87 of its share in train mode, 0.03 with dropout set to 0 and
in eval mode), so the zoo's Switch trains without dropout.

Data are token streams mixed by weight (e.g. 60% fine-tuning text, 40% pretraining replay); a
stream may carry per-token loss weights (e.g. ×5 on a task's label tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch: int = 16
    seq_len: int = 256
    seed: int = 0
    warmup: float = 0.05  # fraction of steps
    min_lr: float = 0.1  # cosine floor, as a fraction of lr
    weight_decay: float = 0.1
    balance_coef: float = 0.01
    z_coef: float = 1e-3
    balance_per_stream: bool = False  # causal: balance each data stream of the batch on its own
    balance_per_sequence: bool = False  # seq2seq: balance each sequence on its own (DeepSeek-V3's sequence-wise loss)
    bias_step: float = 0.0  # sign-update step of router biases (aux-loss-free balancing); 0 = off


@dataclass
class Stream:
    """A token stream to sample windows from, its share of each batch, optional per-token weights."""

    ids: torch.Tensor
    share: float = 1.0
    weights: torch.Tensor | None = None


def per_layer_balance(router_logits, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over layers and token groups of the balance loss, mean over layers of the router z-loss).

    `router_logits` holds one entry per layer: a [tokens, experts] tensor, or a list of them
    (token groups such as streams or sequences, each balanced on its own)."""
    balance, z = [], []
    for layer in router_logits:
        parts = [layer] if isinstance(layer, torch.Tensor) else list(layer)
        for logits in parts:
            logits = logits.float()
            experts = logits.shape[-1]
            chosen = F.one_hot(logits.topk(top_k, dim=-1).indices, experts).sum(1).float()  # [T, E]
            balance.append(experts * (chosen.mean(0) / top_k * logits.softmax(-1).mean(0)).sum())
        z.append(torch.cat(parts).float().logsumexp(-1).pow(2).mean())
    return torch.stack(balance).mean(), torch.stack(z).mean()


def router_biases(model) -> list[torch.nn.Parameter]:
    """The biases of the model's routers, in the order its outputs list router logits."""
    return [m.bias for name, m in model.named_modules()
            if name.endswith("router.classifier") and getattr(m, "bias", None) is not None]


@torch.no_grad()
def update_biases(biases, router_logits, top_k: int, step: float) -> None:
    """Move each expert's bias towards its layer's mean load (see the module docstring)."""
    for bias, layer in zip(biases, router_logits, strict=True):
        logits = layer if isinstance(layer, torch.Tensor) else torch.cat(list(layer))
        load = logits.topk(top_k, dim=-1).indices.flatten().bincount(minlength=bias.numel()).float()
        bias += step * torch.sign(load.mean() - load)


def _batch(streams: list[Stream], cfg: TrainConfig, gen: torch.Generator):
    """(ids [B, T], weights [B, T], row slices of each stream)."""
    counts = [round(cfg.batch * s.share / sum(x.share for x in streams)) for s in streams]
    counts[0] += cfg.batch - sum(counts)
    rows, weights, spans = [], [], []
    for stream, n in zip(streams, counts):
        spans.append(slice(len(rows), len(rows) + n))
        starts = torch.randint(0, len(stream.ids) - cfg.seq_len - 1, (n,), generator=gen).tolist()
        for s in starts:
            rows.append(stream.ids[s : s + cfg.seq_len])
            w = stream.weights[s : s + cfg.seq_len] if stream.weights is not None else torch.ones(cfg.seq_len)
            weights.append(w)
    return torch.stack(rows), torch.stack(weights), spans


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, cfg: TrainConfig, step_loss, log=print, log_every: int = 50) -> dict:
    """AdamW + warm-up/cosine + clipping around
    `step_loss(model, gen) -> (lm_loss, router_logits, top_k, tokens)`, router logits as `per_layer_balance` takes them."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    biases = router_biases(model) if cfg.bias_step else []
    if cfg.bias_step and not biases:
        raise ValueError("bias_step needs routers with a bias (e.g. SwitchTransformersConfig(router_bias=True)); "
                         "this model's routers have none")
    for b in biases:
        b.requires_grad_(False)  # moved by update_biases only, never by the optimizer or weight decay
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    model.train()
    start, seen = time.perf_counter(), 0
    lm = bal = z = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        lm_loss, router_logits, top_k, tokens = step_loss(model, gen)
        balance, zloss = per_layer_balance(router_logits, top_k)
        loss = lm_loss + cfg.balance_coef * balance + cfg.z_coef * zloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if biases:
            update_biases(biases, router_logits, top_k, cfg.bias_step)
        lm, bal, z, seen = lm_loss.item(), balance.item(), zloss.item(), seen + tokens
        if log and (step % log_every == 0 or step == cfg.steps - 1):
            spread = f" bias ±{max(b.abs().max().item() for b in biases):.2f}" if biases else ""
            log(f"step {step + 1}/{cfg.steps} lm {lm:.3f} balance {bal:.3f} z {z:.2f}{spread} "
                f"({seen / (time.perf_counter() - start):.0f} tok/s)")
    model.eval()
    return {**asdict(cfg), "tokens": seen, "final_lm_loss": round(lm, 4), "final_balance": round(bal, 4),
            "final_z": round(z, 3), "wall_s": round(time.perf_counter() - start, 1)}


def train_causal(model, streams: list[Stream], cfg: TrainConfig, log=print) -> dict:
    """Next-token prediction on windows mixed from `streams`, per-token weighted."""
    if cfg.balance_per_sequence:
        raise ValueError("balance_per_sequence is for seq2seq training; causal training balances per stream")
    top_k = model.config.num_experts_per_tok

    def step_loss(model, gen):
        ids, weights, spans = _batch(streams, cfg, gen)
        out = model(input_ids=ids, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        w = weights[:, 1:].reshape(-1)
        routers = out.router_logits
        if cfg.balance_per_stream:
            t = ids.shape[1]  # router logits are [batch · seq, experts], row-major
            routers = [[r[s.start * t : s.stop * t] for s in spans if s.stop > s.start] for r in routers]
        return (ce * w).sum() / w.sum(), routers, top_k, ids.numel()

    return fit(model, cfg, step_loss, log)


def train_seq2seq(model, make_batch, cfg: TrainConfig, log=print) -> dict:
    """Encoder-decoder training on `make_batch(gen) -> (input_ids, attention_mask, labels)` (labels -100 = pad).

    Padding positions are left out of the routing statistics: a short task example padded to the
    batch's longest input would otherwise count as load on whichever expert routes `<pad>`."""
    if cfg.balance_per_stream:
        raise ValueError("balance_per_stream is for causal training on streams; seq2seq balances per sequence")

    def step_loss(model, gen):
        ids, mask, labels = make_batch(gen)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        logits = out.logits.float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        routers = [(r, mask.bool()) for r in out.encoder_router_logits if r is not None and r.dim() == 3]
        routers += [(r, labels != -100) for r in out.decoder_router_logits if r is not None and r.dim() == 3]
        if cfg.balance_per_sequence:
            routers = [[r[b][keep[b]] for b in range(len(r)) if keep[b].any()] for r, keep in routers]
        else:
            routers = [r[keep] for r, keep in routers]
        return lm, routers, 1, int(mask.sum()) + int((labels != -100).sum())

    return fit(model, cfg, step_loss, log)
