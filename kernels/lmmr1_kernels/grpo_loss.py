"""The GRPO family's loss with a k3 KL term, fused with the LM head's log-probs.

Per completion token t of sequence b (advantage A_b, policy log-prob logp, old log-prob
old, reference log-prob ref):

    ratio  = exp(logp - old)                     (old = logp.detach() when not given)
    pg     = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl     = exp(ref - logp) - (ref - logp) - 1  (Schulman's k3 estimator, >= 0)
    loss   = sum_t w_t * (pg + beta * kl)

and the variants, under TRL's names:
    loss_type="cispo"                   pg = -sg(min(ratio, 1 + eps_high)) * A * logp  (MiniMax-M1)
    importance_sampling_level="sequence" ratio_t = s_b = exp(sum_t m_t (logp - old) / sum_t m_t)  (GSPO)
    top_entropy_quantile=q < 1          pg counts only on tokens whose entropy is in the top q of the
                                        call's masked tokens (Wang et al., "Beyond the 80/20 rule")

The per-token weights w_t implement the aggregation (`loss_agg`):
    token_mean               1 / (masked tokens in the batch)             (DAPO)
    seq_mean_token_mean      1 / (B * masked tokens of sequence b)        (GRPO)
    seq_mean_token_sum_norm  1 / (B * T), T the padded length, a constant (Dr. GRPO)

The token-level loss is an elementwise function of logp, so d loss / d logp is known in the
forward pass. Each chunk's logits are therefore turned into their gradient right away (in place)
and chained into grad_hidden / grad_weight; backward only rescales by the upstream gradient.
Three GEMMs in all (forward, grad_hidden, grad_weight when the head trains), and only one chunk of
logits alive at a time. Metrics come out of the same pass.

GSPO and the entropy quantile are not elementwise: a token's d loss / d logp depends on the whole
sequence (or the whole call). Since d loss / d hidden_t = (d loss / d logp_t) * (d logp_t / d hidden_t)
and the last factor is a vector of the hidden size, the pass writes d logp_t / d hidden_t into the
grad_hidden buffer (`[tokens, hidden]`, allocated anyway) and scales its rows once every token's
statistics are in: the same GEMMs and memory as the token-level loss, plus a few `[tokens]` vectors.
Only a trained LM head (grad_weight sums over tokens) needs a second pass that recomputes the logits.
"""
from __future__ import annotations

import torch

from .backend import resolve_backend
from .logprobs import (accumulate_input_grads, chunk_buffers, chunk_logits, chunk_rows_for_bytes,
                       flatten_inputs, logits_block_dtype, row_stats, softmax_grad_)

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


def per_token_terms(logp, old_logp, ref_logp, advantages, beta, epsilon_low, epsilon_high, loss_type="grpo",
                    log_ratio=None, pg_scale=None):
    """Per-token loss, its derivative w.r.t. logp, and the pieces the metrics need (all fp32, flat).

    `log_ratio` (default `logp - old_logp`) is the log importance weight: GSPO passes each token its
    sequence's; the derivative returned is then the one w.r.t. that weight's log (GSPO chains it through
    the sequence mean), except for CISPO, whose weight is detached. `pg_scale` (0/1) multiplies the
    policy-gradient term (the high-entropy-token mask); the KL term stays on every token."""
    ratio = torch.exp(logp - old_logp if log_ratio is None else log_ratio)
    lower, upper = 1.0 - epsilon_low, 1.0 + epsilon_high
    if loss_type == "cispo":  # -sg(min(ratio, 1 + eps_high)) * A * logp: no token loses its gradient
        clipped_low = torch.zeros_like(ratio, dtype=torch.bool)
        clipped_high = (advantages > 0) & (ratio > upper)  # TRL's cispo_clip_ratio
        weight = ratio.clamp(max=upper)
        loss, grad = -weight * advantages * logp, -weight * advantages
    else:
        clipped_low = (advantages < 0) & (ratio < lower)
        clipped_high = (advantages > 0) & (ratio > upper)
        loss = -torch.minimum(ratio * advantages, ratio.clamp(lower, upper) * advantages)
        grad = torch.where(clipped_low | clipped_high, torch.zeros_like(ratio), -advantages * ratio)
    if pg_scale is not None:
        loss, grad = loss * pg_scale, grad * pg_scale
    kl, kl_grad = k3_terms(logp, ref_logp)
    return loss + beta * kl, grad + beta * kl_grad, ratio, kl, clipped_low, clipped_high


def k3_terms(logp, ref_logp):
    """Schulman's k3 estimate of KL(policy || ref) per token and its derivative w.r.t. logp (zeros without ref)."""
    if ref_logp is None:
        zeros = torch.zeros_like(logp)
        return zeros, zeros
    delta = ref_logp - logp
    exp_delta = torch.exp(delta)
    return exp_delta - delta - 1.0, 1.0 - exp_delta


def high_entropy_mask(entropy: torch.Tensor, on: torch.Tensor, top_entropy_quantile: float) -> torch.Tensor:
    """1.0 for the masked-in tokens whose entropy is at least the (1 - q) quantile of the masked-in
    tokens' entropies (TRL's get_high_entropy_mask, within this call), else 0.0."""
    values = entropy[on > 0]
    if values.numel() == 0:
        return torch.zeros_like(entropy)
    threshold = torch.quantile(values, 1.0 - top_entropy_quantile)
    return ((entropy >= threshold) & (on > 0)).float()


def objective(logp, entropy, on, weights, advantages, old_logp, ref_logp, beta, epsilon_low, epsilon_high,
              loss_type, importance_sampling_level, top_entropy_quantile, seq_len):
    """The whole call's objective from its per-token statistics (flat `[B * T]`, fp32): returns the loss,
    d loss / d logp per token, and the per-token pieces of the metrics. Used chunk by chunk when the
    objective is elementwise (token level, every token), else once over all of the call's tokens."""
    old = logp if old_logp is None else old_logp
    pg_scale = None if top_entropy_quantile >= 1.0 else high_entropy_mask(entropy, on, top_entropy_quantile)
    log_ratio = None
    if importance_sampling_level == "sequence":  # s_b = exp(mean over b's tokens of (logp - old))
        count = on.view(-1, seq_len).sum(1, keepdim=True).clamp(min=1.0)  # [B, 1]
        log_ratio = (((logp - old) * on).view(-1, seq_len).sum(1, keepdim=True) / count).expand(-1, seq_len)
        log_ratio = log_ratio.reshape(-1)
    chained = log_ratio is not None and loss_type != "cispo"
    terms, grad, ratio, kl, low, high = per_token_terms(logp, old, None if chained else ref_logp, advantages, beta,
                                                        epsilon_low, epsilon_high, loss_type, log_ratio, pg_scale)
    grad = grad * weights
    if chained:
        # GSPO's policy term is a function of s_b alone, and d log s_b / d logp_t = on_t / n_b, so
        # d loss / d logp_t = (sum_t' w_t' d pg_t' / d log s_b) * on_t / n_b; the KL term stays per token.
        per_sequence = grad.view(-1, seq_len).sum(1, keepdim=True) / count  # [B, 1]
        kl, kl_grad = k3_terms(logp, ref_logp)
        terms = terms + beta * kl
        grad = per_sequence.expand(-1, seq_len).reshape(-1) * on + beta * kl_grad * weights
    return (weights * terms).sum(), grad, (kl, ratio, low.float(), high.float())


class GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, weights, on, advantages, old_logp, ref_logp, options,
                chunk_rows, backend):
        num_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        need_any = need_h or need_w or need_b
        # Elementwise objectives turn each chunk's logits into their gradient at once. The others (GSPO's
        # sequence ratio, the entropy quantile) need every token of the call first: with only hidden to
        # train, each row's gradient is taken for d loss / d logp = 1 (d logp_t / d hidden_t, [N, H], the
        # grad_hidden buffer itself) and rescaled once the coefficients are known: no extra GEMM. A trained
        # head (grad_weight sums over rows) takes a second pass that recomputes the logits instead.
        elementwise = options["importance_sampling_level"] == "token" and options["top_entropy_quantile"] >= 1.0
        rescale = not elementwise and not (need_w or need_b)
        args = lambda rows: (advantages[rows], None if old_logp is None else old_logp[rows],  # noqa: E731
                             None if ref_logp is None else ref_logp[rows], options["beta"], options["epsilon_low"],
                             options["epsilon_high"], options["loss_type"], options["importance_sampling_level"],
                             options["top_entropy_quantile"], options["seq_len"])

        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        sums = torch.zeros(6, dtype=torch.float32, device=hidden.device)  # kl, ratio, entropy, low, high, logp
        stats = [torch.empty(num_rows, dtype=torch.float32, device=hidden.device) for _ in range(3)]  # logp, lse, H
        logits_buffer, scratch = chunk_buffers(min(chunk_rows, num_rows), weight.shape[0], hidden, backend,
                                               logits_block_dtype(backend, weight, bias))
        for start in range(0, num_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, num_rows))
            logits = chunk_logits(hidden[rows], weight, bias, out=logits_buffer)  # [n, V]
            logp, lse, entropy = row_stats(backend, logits, targets[rows], temperature=options["temperature"],
                                           with_entropy=True, scratch=scratch)
            for buffer, value in zip(stats, (logp, lse, entropy)):
                buffer[rows] = value
            if elementwise:
                chunk_loss, grad_logp, parts = objective(logp, entropy, on[rows], weights[rows], *args(rows))
                loss += chunk_loss
                sums += metric_sums(parts, entropy, logp, on[rows])
            elif rescale:
                grad_logp = torch.ones_like(logp)
            if need_any and (elementwise or rescale):
                grad_logits = softmax_grad_(backend, logits, targets[rows], lse, grad_logp, options["temperature"])
                accumulate_input_grads(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias, rows)
        if not elementwise:
            logp, lse, entropy = stats
            loss, grad_logp, parts = objective(logp, entropy, on, weights, *args(slice(None)))
            sums = metric_sums(parts, entropy, logp, on)
            if rescale and need_h:
                grad_hidden.mul_(grad_logp.to(grad_hidden.dtype)[:, None])
            elif need_any:  # second pass: the coefficients are known now
                for start in range(0, num_rows, chunk_rows):
                    rows = slice(start, min(start + chunk_rows, num_rows))
                    logits = chunk_logits(hidden[rows], weight, bias, out=logits_buffer)
                    grad_logits = softmax_grad_(backend, logits, targets[rows], lse[rows], grad_logp[rows],
                                                options["temperature"])
                    accumulate_input_grads(grad_logits, hidden, weight, grad_hidden, grad_weight, grad_bias, rows)

        ctx.save_for_backward(grad_hidden,
                              grad_weight.to(weight.dtype) if need_w else None,
                              grad_bias.to(bias.dtype) if need_b else None)
        metrics = sums / on.sum().clamp(min=1.0)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        unit = bool(grad_loss == 1.0)  # the usual `loss.backward()`: hand the gradients over without a copy
        scale = lambda g: None if g is None else (g if unit else g * grad_loss.to(g.dtype))  # noqa: E731
        return (scale(grad_hidden), scale(grad_weight), scale(grad_bias),
                None, None, None, None, None, None, None, None, None)


def metric_sums(parts, entropy, logp, on) -> torch.Tensor:
    """Masked sums `[6]` of kl, ratio, entropy, clip_low, clip_high and logp over a set of tokens."""
    kl, ratio, low, high = parts
    return torch.stack([(kl * on).sum(), (ratio * on).sum(), (entropy * on).sum(), (low * on).sum(),
                        (high * on).sum(), (logp * on).sum()])


LOSS_TYPES = ("grpo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              advantages: torch.Tensor, old_logprobs: torch.Tensor | None = None,
              ref_logprobs: torch.Tensor | None = None, *, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, temperature: float = 1.0, loss_agg: str = "token_mean",
              loss_type: str = "grpo", importance_sampling_level: str = "token", top_entropy_quantile: float = 1.0,
              bias: torch.Tensor | None = None, token_weight: torch.Tensor | None = None,
              backend: str = "auto", chunk_rows: int | None = None,
              chunk_bytes: int | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO loss over completion tokens, straight from hidden states.

    hidden [B, T, H] (the positions that predict `targets`); weight [V, H]; targets [B, T];
    mask [B, T] (1 for completion tokens that count); advantages [B];
    old_logprobs / ref_logprobs [B, T] float32 or None (ref None or beta == 0: no KL term).
    `token_weight [B, T]` overrides the aggregation weights (used to aggregate one loss over
    several micro-batches); by default they come from `loss_agg` over this call's mask.

    Chunks: `chunk_rows` rows if given, else as many as one `[rows, V]` block (fp32, or bf16 on the Triton
    path with a frozen head: `logits_block_dtype`) of `chunk_bytes` holds (default `DEFAULT_CHUNK_BYTES` for
    the device); the result does not depend on it.

    Objectives, with TRL's names: `loss_type` "grpo" (the clipped ratio) or "cispo" (the importance
    weight clipped at 1 + epsilon_high and detached, times logp); `importance_sampling_level` "token"
    or "sequence" (GSPO: one ratio per row, exp of the masked mean of logp - old); `top_entropy_quantile`
    q < 1 keeps the policy term on the top q of this call's masked tokens by entropy (the KL term on all).

    Returns `(loss, metrics)`; metrics are masked token means of `kl`, `ratio` (the importance weight:
    a sequence's own for every token under GSPO), `entropy`, `clip_low` / `clip_high` (fraction of
    tokens whose clipped branch is active; CISPO: whose weight was clipped with A > 0), `logp`.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                         f"got {importance_sampling_level!r}")
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if mask.shape != targets.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must match targets {tuple(targets.shape)}")
    if advantages.shape != targets.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(targets.shape[:1])}, got {tuple(advantages.shape)}")
    flat_hidden, flat_targets = flatten_inputs(hidden, targets, weight)
    if not torch.is_grad_enabled():  # no backward can follow: the loss and metrics only, no gradient written
        # (inside the Function `needs_input_grad` reads requires_grad alone, so the gradient was computed anyway)
        flat_hidden, weight = flat_hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    backend = resolve_backend(backend, flat_hidden)
    weights = token_weight if token_weight is not None else token_weights(mask, loss_agg)
    weights = (weights * mask.float()).reshape(-1).contiguous()
    on = (mask > 0).float().reshape(-1).contiguous()
    flat_adv = advantages.float()[:, None].expand(targets.shape).reshape(-1).contiguous()
    flatten = lambda x: None if x is None else x.detach().float().reshape(-1).contiguous()  # noqa: E731
    ref = flatten(ref_logprobs) if beta != 0.0 else None
    rows = chunk_rows or chunk_rows_for_bytes(flat_hidden.shape[0], weight.shape[0], chunk_bytes, flat_hidden.device,
                                              logits_block_dtype(backend, weight, bias).itemsize)
    options = {"beta": float(beta), "epsilon_low": float(epsilon_low), "epsilon_high": float(epsilon_high),
               "temperature": float(temperature), "loss_type": loss_type,
               "importance_sampling_level": importance_sampling_level,
               "top_entropy_quantile": float(top_entropy_quantile), "seq_len": max(1, targets.shape[-1])}
    loss, stats = GRPOLossFunction.apply(flat_hidden, weight, bias, flat_targets, weights, on, flat_adv,
                                         flatten(old_logprobs), ref, options, rows, backend)
    names = ("kl", "ratio", "entropy", "clip_low", "clip_high", "logp")
    return loss, {name: stats[i] for i, name in enumerate(names)}
