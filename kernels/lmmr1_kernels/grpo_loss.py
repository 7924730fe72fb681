"""The GRPO clipped-ratio loss with a k3 KL term, fused with the LM head's log-probs.

Per completion token t of sequence b (advantage A_b, policy log-prob logp, old log-prob
old, reference log-prob ref):

    ratio  = exp(logp - old)                     (old = logp.detach() when not given)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1  (Schulman's k3 estimator, >= 0)
    loss   = sum_t w_t * (pg + beta * kl)

The per-token weights w_t implement the aggregation (`loss_agg`):
    token_mean               1 / (masked tokens in the batch)             (DAPO)
    seq_mean_token_mean      1 / (B * masked tokens of sequence b)        (GRPO)
    seq_mean_token_sum_norm  1 / (B * T), T the padded length, a constant (Dr. GRPO)

The loss is an elementwise function of logp, so d loss / d logp is known in the forward
pass. Each chunk's logits are therefore turned into their gradient right away (in place)
and chained into grad_hidden / grad_weight; backward only rescales by the upstream
gradient. Three GEMMs in all (forward, grad_hidden, grad_weight when the head trains),
and only one chunk of logits alive at a time. Metrics come out of the same pass.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend
from .logprobs import (accumulate_input_grads, chunk_buffers, chunk_logits, chunk_rows_for_bytes,
                       flatten_inputs, row_stats, softmax_grad_)

LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def token_weights(mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """Per-token weights `[B, T]` (fp32) whose weighted sum of per-token losses is the aggregated loss."""
    mask = mask.float()
    if loss_agg == "token_mean":
        return mask / mask.sum().clamp(min=1.0)
    if loss_agg == "seq_mean_token_mean":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * mask.shape[0])
    if loss_agg == "seq_mean_token_sum_norm":
        return mask / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {loss_agg!r}")


def per_token_terms(logp, old_logp, ref_logp, advantages, beta, epsilon_low, epsilon_high):
    """Per-token loss, its derivative w.r.t. logp, and the pieces the metrics need (all fp32, flat)."""
    ratio = torch.exp(logp - old_logp)
    lower, upper = 1.0 - epsilon_low, 1.0 + epsilon_high
    clipped_low = (advantages < 0) & (ratio < lower)
    clipped_high = (advantages > 0) & (ratio > upper)
    clipped = clipped_low | clipped_high
    loss = -torch.minimum(ratio * advantages, ratio.clamp(lower, upper) * advantages)
    grad = torch.where(clipped, torch.zeros_like(ratio), -advantages * ratio)
    if ref_logp is not None:
        delta = ref_logp - logp
        exp_delta = torch.exp(delta)
        kl = exp_delta - delta - 1.0
        loss = loss + beta * kl
        grad = grad + beta * (1.0 - exp_delta)
    else:
        kl = torch.zeros_like(logp)
    return loss, grad, ratio, kl, clipped_low, clipped_high


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, advantages, old_logp, ref_logp,
                beta, epsilon_low, epsilon_high, temperature, chunk_rows, backend):
        num_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        need_any = need_h or need_w or need_b

        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        sums = torch.zeros(6, dtype=torch.float32, device=hidden.device)  # kl, ratio, entropy, low, high, logp
        active = weights > 0
        logits_buffer, scratch = chunk_buffers(min(chunk_rows, num_rows), weight.shape[0], hidden, backend)
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            logits = chunk_logits(hidden[rows], weight, bias, out=logits_buffer)  # [n, V] fp32
            logp, lse, entropy = row_stats(backend, logits, targets[rows], temperature, with_entropy=True,
                                           scratch=scratch)
            old = logp if old_logp is None else old_logp[rows]
            ref = None if ref_logp is None else ref_logp[rows]
            terms, grad_logp, ratio, kl, low, high = per_token_terms(
                logp, old, ref, advantages[rows], beta, epsilon_low, epsilon_high)
            w, on = weights[rows], active[rows].float()
            loss += (w * terms).sum()
            sums += torch.stack([(kl * on).sum(), (ratio * on).sum(), (entropy * on).sum(),
                                 (low.float() * on).sum(), (high.float() * on).sum(), (logp * on).sum()])
            if need_any:
                grad_logits = softmax_grad_(backend, logits, targets[rows], lse, w * grad_logp, temperature)
                accumulate_input_grads(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias, rows)

        ctx.save_for_backward(grad_hidden,
                              grad_weight.to(weight.dtype) if need_w else None,
                              grad_bias.to(bias.dtype) if need_b else None)
        count = active.float().sum().clamp(min=1.0)
        metrics = sums / count
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        unit = bool(grad_loss == 1.0)  # the usual `loss.backward()`: hand the gradients over without a copy
        scale = lambda g: None if g is None else (g if unit else g * grad_loss.to(g.dtype))  # noqa: E731
        return (scale(grad_hidden), scale(grad_weight), scale(grad_bias),
                None, None, None, None, None, None, None, None, None, None, None)


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, old_logprobs: torch.Tensor | None = None,
              ref_logprobs: torch.Tensor | None = None, *, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, temperature: float = 1.0, loss_agg: str = "token_mean",
              bias: torch.Tensor | None = None, token_weight: torch.Tensor | None = None,
              backend: str = "auto", chunk_rows: int | None = None,
              chunk_bytes: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss over completion tokens, straight from hidden states.

    hidden [B, T, H] (the positions that predict `targets`); weight [V, H]; targets [B, T];
    mask [B, T] (1 for completion tokens that count); advantages [B];
    old_logprobs / ref_logprobs [B, T] float32 or None (ref None or beta == 0: no KL term).
    `token_weight [B, T]` overrides the aggregation weights (used to aggregate one loss over
    several micro-batches); by default they come from `loss_agg` over this call's mask.

    Chunks: `chunk_rows` rows if given, else as many as one fp32 `[rows, V]` block of `chunk_bytes`
    holds (default `DEFAULT_CHUNK_BYTES` for the device); the result does not depend on it.

    Returns `(loss, metrics)`; metrics are masked token means of `kl`, `ratio`, `entropy`,
    `clip_low` / `clip_high` (fraction of tokens whose clipped branch is active), `logp`.
    """
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
    if advantages.shape != targets.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(targets.shape[:1])}, got {tuple(advantages.shape)}")
    flat_hidden, flat_targets = flatten_inputs(hidden, targets, weight)
    backend = resolve_backend(backend, flat_hidden)
    weights = token_weight if token_weight is not None else token_weights(mask, loss_agg)
    weights = (weights * mask.float()).reshape(-1).contiguous()
    flat_adv = advantages.float()[:, None].expand(targets.shape).reshape(-1).contiguous()
    flatten = lambda x: None if x is None else x.detach().float().reshape(-1).contiguous()  # noqa: E731
    ref = flatten(ref_logprobs) if beta != 0.0 else None
    rows = chunk_rows or chunk_rows_for_bytes(flat_hidden.shape[0], weight.shape[0], chunk_bytes, flat_hidden.device)
    loss, stats = GRPOLossFunction.apply(flat_hidden, weight, bias, flat_targets, weights, flat_adv,
                                         flatten(old_logprobs), ref, float(beta), float(epsilon_low),
                                         float(epsilon_high), float(temperature), rows, backend)
    names = ("kl", "ratio", "entropy", "clip_low", "clip_high", "logp")
    return loss, {name: stats[i] for i, name in enumerate(names)}
