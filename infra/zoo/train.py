"""Training loop for the zoo's causal MoE language models, with routing balanced per layer.

transformers' load-balancing loss pools the router logits of all layers before balancing, which
lets individual layers starve experts (a probe left 5-7 of 16 experts per layer with under 1%
of the routing slots). Here every layer is balanced on its own:

    balance_l = E · Σ_e f_{l,e} · P_{l,e}     f: fraction of top-k slots routed to e, P: mean router prob
    z_l       = mean_t (logsumexp_e logits_{l,t,e})²          (router z-loss, as in ST-MoE)
    imp_l     = E · Σ_e P_{l,e}²                               (importance; 1 when uniform)
    loss      = LM loss + balance_coef · mean_l balance_l + z_coef · mean_l z_l
                        + importance_coef · mean_l imp_l

balance_l has no gradient towards an expert no token picks (f = 0), so under top-1 routing an
expert that dies early stays dead; the importance term raises its mean probability until it
wins tokens again (Switch-tiny lost one encoder expert without it).

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
    importance_coef: float = 0.0


@dataclass
class Stream:
    """A token stream to sample windows from, its share of each batch, optional per-token weights."""

    ids: torch.Tensor
    share: float = 1.0
    weights: torch.Tensor | None = None


def per_layer_balance(router_logits, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over layers of the balance loss, mean over layers of the router z-loss)."""
    balance, z = [], []
    for logits in router_logits:  # [tokens, experts] per layer
        logits = logits.float()
        experts = logits.shape[-1]
        probs = logits.softmax(-1)
        chosen = F.one_hot(logits.topk(top_k, dim=-1).indices, experts).sum(1).float()  # [T, E]
        balance.append(experts * (chosen.mean(0) / top_k * probs.mean(0)).sum())
        z.append(logits.logsumexp(-1).pow(2).mean())
    return torch.stack(balance).mean(), torch.stack(z).mean()


def per_layer_importance(router_logits) -> torch.Tensor:
    """Mean over layers of E · Σ_e (mean router probability of e)²."""
    imp = []
    for logits in router_logits:
        p = logits.float().softmax(-1).mean(0)
        imp.append(p.shape[-1] * p.square().sum())
    return torch.stack(imp).mean()


def _batch(streams: list[Stream], cfg: TrainConfig, gen: torch.Generator):
    counts = [round(cfg.batch * s.share / sum(x.share for x in streams)) for s in streams]
    counts[0] += cfg.batch - sum(counts)
    rows, weights = [], []
    for stream, n in zip(streams, counts):
        starts = torch.randint(0, len(stream.ids) - cfg.seq_len - 1, (n,), generator=gen).tolist()
        for s in starts:
            rows.append(stream.ids[s : s + cfg.seq_len])
            w = stream.weights[s : s + cfg.seq_len] if stream.weights is not None else torch.ones(cfg.seq_len)
            weights.append(w)
    return torch.stack(rows), torch.stack(weights)


def lr_at(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(model, cfg: TrainConfig, step_loss, log=print, log_every: int = 50) -> dict:
    """AdamW + warm-up/cosine + clipping around `step_loss(model, gen) -> (lm_loss, router_logits, top_k, tokens)`."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    model.train()
    start, seen = time.perf_counter(), 0
    lm = bal = z = float("nan")
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        lm_loss, router_logits, top_k, tokens = step_loss(model, gen)
        balance, zloss = per_layer_balance(router_logits, top_k)
        loss = lm_loss + cfg.balance_coef * balance + cfg.z_coef * zloss
        if cfg.importance_coef:
            loss = loss + cfg.importance_coef * per_layer_importance(router_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm, bal, z, seen = lm_loss.item(), balance.item(), zloss.item(), seen + tokens
        if log and (step % log_every == 0 or step == cfg.steps - 1):
            log(f"step {step + 1}/{cfg.steps} lm {lm:.3f} balance {bal:.3f} z {z:.2f} "
                f"({seen / (time.perf_counter() - start):.0f} tok/s)")
    model.eval()
    return {**asdict(cfg), "tokens": seen, "final_lm_loss": round(lm, 4), "final_balance": round(bal, 4),
            "final_z": round(z, 3), "wall_s": round(time.perf_counter() - start, 1)}


def train_causal(model, streams: list[Stream], cfg: TrainConfig, log=print) -> dict:
    """Next-token prediction on windows mixed from `streams`, per-token weighted."""
    top_k = model.config.num_experts_per_tok

    def step_loss(model, gen):
        ids, weights = _batch(streams, cfg, gen)
        out = model(input_ids=ids, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        w = weights[:, 1:].reshape(-1)
        return (ce * w).sum() / w.sum(), out.router_logits, top_k, ids.numel()

    return fit(model, cfg, step_loss, log)


def train_seq2seq(model, make_batch, cfg: TrainConfig, log=print) -> dict:
    """Encoder-decoder training on `make_batch(gen) -> (input_ids, attention_mask, labels)` (labels -100 = pad)."""
    def step_loss(model, gen):
        ids, mask, labels = make_batch(gen)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        logits = out.logits.float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        routers = [r.reshape(-1, r.shape[-1]) for r in (*out.encoder_router_logits, *out.decoder_router_logits)
                   if r is not None and r.dim() == 3]
        return lm, routers, 1, int(mask.sum()) + int((labels != -100).sum())

    return fit(model, cfg, step_loss, log)
