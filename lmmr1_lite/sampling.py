"""The sampler of the rollouts' decode loop (`next_tokens`): one token per row from a row of logits.

Temperature, top-k and top-p as HF's warpers define them, vision placeholders suppressed, then an
inverse-CDF draw with ONE uniform per row: sums of 1024-token blocks of the softmax (accumulated in
fp64) pick a block, an fp64 cumulative sum inside that block picks the token, and the log of the
drawn token's softmax entry is its log-prob. Its cost is about one softmax; a Gumbel-max draw needs
V random numbers (and two logs) per row, which is what makes `multinomial` (its `exponential_` draw)
slow; bench/sampling.py measures all three.
"""
from __future__ import annotations

import torch

SAMPLE_BLOCK = 1024  # tokens per block of the two-level inverse-CDF draw
# Bytes of one fp32 `[rows, vocab]` scratch block while sampling. On CPU a block under glibc's largest
# mmap threshold (32 MiB) is served from the heap again after the first step instead of fresh zeroed
# pages each time; 16 MiB is about 27 rows of Qwen's vocabulary.
SAMPLE_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}


def sample_chunk_rows(rows: int, vocab: int, device_type: str) -> int:
    """Rows `next_tokens` samples at once by default: SAMPLE_CHUNK_BYTES of fp32 logits, at least one."""
    budget = SAMPLE_CHUNK_BYTES["cuda" if device_type == "cuda" else "cpu"]
    return min(rows, max(1, budget // (4 * vocab)))


def scratch_bytes_per_logit(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> int:
    """Peak bytes `next_tokens` allocates per logit of a chunk (`[rows, V]`), beyond the logits themselves:
    their fp32 copy and its softmax (8); the temperature-scaled copy when temperature != 1 (4); with top-k
    or top-p the filtered copy and its softmax (8); top-p's fallback that sorts whole rows (when the 1,024
    likeliest tokens hold less than top_p) adds the sorted scores, their int64 indices, their cumulative
    softmax and the removal masks (20). Measured on this CPU at 64 x 151,936 (tests/test_sampling.py):
    8.2, 12.2 (T 0.7), 16.2 (top-k 50) and 36.1 (top-p 0.9 through the sort)."""
    filtering = 0 < top_k or top_p < 1.0
    return 8 + (4 if temperature != 1.0 else 0) + (8 if filtering else 0) + (20 if top_p < 1.0 else 0)


def inverse_cdf_sample(weights: torch.Tensor, uniforms: torch.Tensor, block: int = SAMPLE_BLOCK):
    """One draw per row from unnormalised non-negative `weights [n, V]` (fp32), with `uniforms [n]`
    (fp64, in [0, 1)). Returns `(tokens [n] int64, total [n] fp64)`, total the row sum of the weights.

    Two levels, so nothing of size V is written: sums of `block`-token blocks (fp32, pairwise, then
    accumulated in fp64) choose the block the uniform falls in, an fp64 cumulative sum inside that
    block chooses the token. A token of weight 0 is never chosen (its cumulative sum equals its
    predecessor's, so a `right=True` search stops earlier); a row of all zeros returns total 0."""
    n, vocab = weights.shape
    block = max(1, min(block, vocab))
    full = vocab // block * block
    sums = [weights[:, :full].reshape(n, -1, block).sum(-1)] if full else []
    if full < vocab:
        sums.append(weights[:, full:].sum(-1, keepdim=True))
    block_cdf = torch.cumsum(torch.cat(sums, dim=1).double(), dim=1)  # [n, blocks]
    total = block_cdf[:, -1].contiguous()
    target = (uniforms.to(torch.float64) * total)[:, None]
    chosen = torch.searchsorted(block_cdf, target, right=True)
    # a product that rounded up to the total: take the last block with weight
    chosen = torch.minimum(chosen, torch.searchsorted(block_cdf, total[:, None], right=False))
    chosen = chosen.clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(target))
    cols = chosen * block + torch.arange(block, device=weights.device)  # [n, block]
    inside = weights.gather(1, cols.clamp(max=vocab - 1)).to(torch.float64).masked_fill_(cols >= vocab, 0.0)
    inside_cdf = torch.cumsum(inside, dim=1)
    # the block's fp64 cumulative sum can end a rounding error below its fp32 sum: then the last
    # token of the block with weight is taken
    offset = torch.searchsorted(inside_cdf, target - before, right=True)
    offset = torch.minimum(offset, torch.searchsorted(inside_cdf, inside_cdf[:, -1:].contiguous(), right=False))
    return (chosen * block + offset.clamp_(max=block - 1)).squeeze(1), total


def filter_top_k_top_p_(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's TopKLogitsWarper then TopPLogitsWarper on temperature-scaled `scores [n, V]`, in place:
    removed tokens become -inf. top-k keeps every token scoring at least the k-th score; top-p
    removes the lowest tokens whose cumulative probability stays at or below 1 - top_p (the most
    likely token always stays). Top-p looks at the 1024 most likely tokens first and sorts the whole
    row only when they hold less than top_p of the mass."""
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        head, head_idx = torch.topk(probs, min(1024, vocab), dim=-1)  # descending
        if bool((head.sum(-1) >= top_p).all()):
            # keep a token iff the mass ranked strictly above it is < top_p, i.e. its ascending
            # cumulative probability 1 - above is > 1 - top_p (HF's rule, from the other end)
            above = torch.cumsum(head, dim=-1) - head
            keep = above < top_p
            keep[:, 0] = True
            kept = torch.full_like(scores, float("-inf"))
            kept.scatter_(1, head_idx, torch.where(keep, scores.gather(1, head_idx), float("-inf")))
            scores.copy_(kept)
        else:
            sorted_scores, sorted_idx = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p)
            remove[:, -1] = False
            scores.masked_fill_(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def _next_tokens_chunk(logits, inv_t, greedy, top_k, top_p, suppress, uniforms, block):
    z = logits.float()
    scaled = z * inv_t if inv_t != 1.0 else z
    # the full temperature softmax (no suppression, no filtering): the training pass's distribution.
    # log(p) of a normal fp32 p is within ~2e-7 of log_softmax; p under 2^-126 is recomputed below.
    probs = torch.softmax(scaled, dim=-1)
    if greedy:
        tokens = (z.index_fill(1, suppress, float("-inf")) if suppress is not None else z).argmax(-1)
    else:
        filtering = (0 < top_k < scaled.shape[-1]) or top_p < 1.0
        if filtering:
            kept = scaled.clone() if suppress is None else scaled.index_fill(1, suppress, float("-inf"))
            weights = torch.softmax(filter_top_k_top_p_(kept, top_k, top_p), dim=-1)
        else:  # the full softmax with the suppressed tokens' weight removed: no second pass over V
            # in place: a suppressed token is never drawn, so `probs` stays right for the tokens drawn
            weights = probs if suppress is None else probs.index_fill_(1, suppress, 0.0)
        tokens, total = inverse_cdf_sample(weights, uniforms, block)
        empty = total <= 0  # every allowed token underflowed next to a suppressed one: renormalise
        if bool(empty.any()):
            masked = scaled[empty].index_fill(1, suppress, float("-inf"))
            tokens[empty], _ = inverse_cdf_sample(torch.softmax(masked, dim=-1), uniforms[empty], block)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1)
    logp = torch.log(chosen)
    tiny = chosen < torch.finfo(torch.float32).tiny
    if bool(tiny.any()):
        logp[tiny] = (scaled[tiny].gather(1, tokens[tiny, None]).squeeze(1)
                      - torch.logsumexp(scaled[tiny], dim=-1))
    return tokens, logp


def next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, greedy: bool = False, top_k: int = 0,
                top_p: float = 1.0, suppress: torch.Tensor | None = None, generator: torch.Generator | None = None,
                block: int = SAMPLE_BLOCK, chunk_rows: int | None = None):
    """The next token of each row of `logits [n, V]` and its log-prob: `(tokens [n], logp [n] fp32)`.

    Sampled from softmax(logits / temperature) after `suppress` (token ids never produced), top-k and
    top-p, exactly as HF's processors define them; greedy: the argmax of the suppressed logits, as HF
    greedy search. `logp` is log_softmax(logits / temperature)[token] over the full vocabulary (no
    suppression, no filtering), the training pass's definition. One fp64 uniform per row is drawn
    from `generator` (the global RNG by default); `logits` is not modified. Rows are processed in
    chunks of `chunk_rows` (default: SAMPLE_CHUNK_BYTES of fp32 scratch)."""
    n, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(n, dtype=torch.long, device=device)
    logp = torch.empty(n, dtype=torch.float32, device=device)
    uniforms = None if greedy else torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    if suppress is not None:
        suppress = torch.as_tensor(suppress, dtype=torch.long, device=device)
        suppress = suppress if suppress.numel() else None
    rows = chunk_rows or sample_chunk_rows(n, vocab, device.type)
    for start in range(0, n, rows):
        part = slice(start, min(n, start + rows))
        tokens[part], logp[part] = _next_tokens_chunk(
            logits[part], 1.0 / temperature, greedy, top_k, top_p, suppress,
            None if uniforms is None else uniforms[part], block)
    return tokens, logp
