"""One GRPO step as a unit: the phases that `train.py`, `bench/e2e_step.py` and the tests all call.

    batch = generate_rollouts(ctx, examples)          # B prompts x G completions
    scored = score_rollouts(ctx, batch, examples)     # rewards, group advantages, ref/old log-probs
    metrics = update_policy(ctx, scored)              # one optimizer update (micro-batched)

`grpo_step(ctx, examples)` runs the three, with `num_iterations` updates and the out-of-memory back-off,
and returns the step's metrics under TRL's names where TRL has the quantity.

Under torchrun (`ctx.dist`, see distributed.py) `examples` are this rank's share of the step's prompts;
the update aggregates the loss with the global denominator (`batch_totals`) and sums the gradients over
the ranks (one all-reduce), so it equals the one-process update on the same rollouts; the returned
metrics are merged over the ranks (`merge_rows`). With `ctx.dist` None nothing here talks to anyone.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lmmr1_kernels import grpo_loss, token_logprobs, token_weights

from . import models, rewards
from .config import TrainConfig
from .data import Example, build_messages
from .micro_batching import TrainingAborted  # noqa: F401  (train, cli and distributed import it from here)
from .micro_batching import cut, halve_on_oom, micro_batches, micro_rows
from .rollout import Rollout, adapter_merged, generate


@dataclass
class StepContext:
    """What every phase of a step needs; the two batch sizes shrink on CUDA out-of-memory and stay shrunk."""
    policy: object
    tokenizer: object
    cfg: TrainConfig
    optimizer: object = None
    scheduler: object = None
    image_processor: object = None
    stop_ids: list = field(default_factory=list)  # besides cfg.stop_tokens (strings); default: EOS
    generation_batch_size: int = 0
    micro_batch_size: int = 0
    logprob_batch_size: int = 0  # rows per forward of the no-grad passes once an out-of-memory halved it; 0: any
    dist: object = None  # distributed.Distributed under torchrun; None for one process (a world of one is None)

    def __post_init__(self):
        if self.dist is not None and self.dist.world_size == 1:
            self.dist = None  # no one to talk to: the one-process update and metrics, exactly (no exchange, no merge)
        if not self.stop_ids and self.tokenizer is not None:
            self.stop_ids = [self.tokenizer.eos_token_id]
        self.generation_batch_size = self.generation_batch_size or self.cfg.generation_batch_size \
            or self.cfg.prompts_per_step
        self.micro_batch_size = self.micro_batch_size or self.cfg.micro_batch_size


@dataclass
class ScoredRollout:
    """A rollout with everything computed per row before the update: row i belongs to prompt i // G."""
    batch: Rollout
    examples: list[Example]        # per row (each prompt's example repeated G times)
    rewards: torch.Tensor          # [N] total reward
    parts: dict                    # reward name -> [N] values
    counts: dict                   # verifier counts of this scoring
    advantages: torch.Tensor       # [N]
    ref_logp: torch.Tensor | None  # [N, C] adapter-disabled log-probs (None when beta = 0)
    old_logp: torch.Tensor | None  # [N, C] (None when num_iterations = 1)

    def groups(self, group_size: int) -> list["ScoredRollout"]:
        """One ScoredRollout per prompt (its `group_size` rows), before the log-prob passes."""
        return [ScoredRollout(self.batch.rows(rows), self.examples[rows], self.rewards[rows],
                              {name: values[rows] for name, values in self.parts.items()}, {},
                              self.advantages[rows], None, None)
                for rows in (slice(i, i + group_size) for i in range(0, len(self.examples), group_size))]

    @staticmethod
    def concat(parts: list["ScoredRollout"], counts: dict, pad_id: int) -> "ScoredRollout":
        """Rows of several ScoredRollouts (their log-probs not yet computed) as one, with `counts`."""
        return ScoredRollout(Rollout.concat([p.batch for p in parts], pad_id), [e for p in parts for e in p.examples],
                             torch.cat([p.rewards for p in parts]),
                             {name: [v for p in parts for v in p.parts[name]] for name in parts[0].parts}, counts,
                             torch.cat([p.advantages for p in parts]), None, None)


def group_advantages(rewards_: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """`rewards [B*G]` -> advantages `[B*G]`, normalised within each consecutive group of G."""
    grouped = rewards_.view(-1, group_size).double()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.view(-1).float()


def generate_rollouts(ctx: StepContext, examples: list[Example], deadline: float | None = None) -> Rollout:
    """G completions for each example, in chunks of `ctx.generation_batch_size` prompts (halved on OOM);
    `deadline` (`time.monotonic()`, for a benchmark's time budget): no decode step starts after it."""
    cfg = ctx.cfg
    messages = [build_messages(e, cfg.system_prompt, cfg.prompt_template) for e in examples]

    def run(size: int) -> Rollout:
        return Rollout.concat([
            generate(ctx.policy, ctx.tokenizer, messages[i:i + size], num_generations=cfg.num_generations,
                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=ctx.stop_ids,
                     stop_strings=cfg.stop_tokens, top_k=cfg.top_k, top_p=cfg.top_p,
                     image_processor=ctx.image_processor, cache_mode=cfg.decode_cache,
                     lora_autocast=cfg.lora_autocast, deadline=deadline)
            for i in range(0, len(messages), size)], ctx.tokenizer.pad_token_id)
    # the compiled decode step's CUDA graphs need the merged weights at the same addresses every step
    with adapter_merged(ctx.policy, keep=cfg.decode_cache == "compiled") if cfg.merge_for_rollouts else nullcontext():
        batch, ctx.generation_batch_size = halve_on_oom(run, ctx.generation_batch_size, "generation")
    return batch


def policy_hidden(ctx: StepContext, micro: Rollout) -> torch.Tensor:
    """`models.completion_hidden` of a micro-batch under the policy, its LoRA in bf16 when `lora_autocast`
    (the log-prob kernels that take these hidden states stay outside autocast)."""
    with models.lora_autocast(ctx.policy, ctx.cfg.lora_autocast):
        return models.completion_hidden(ctx.policy, micro, ctx.cfg.share_prompt)


@torch.no_grad()
def policy_logprobs(ctx: StepContext, batch: Rollout) -> torch.Tensor:
    """Per-token log-probs `[N, C]` of a rollout's completions under the current policy (or, inside
    `disable_adapter()`, the reference), no graph kept. No backward follows, so `micro_batch_size` (sized
    for one) does not apply: as many rows per forward as the token budget allows (all of them without
    one), each forward's completions scored in one kernel call; halved on CUDA out-of-memory."""
    cfg = ctx.cfg
    weight = models.lm_head_weight(ctx.policy)

    def run(size: int) -> torch.Tensor:
        out = []
        for rows, width in micro_batches(batch, size):
            micro = cut(batch.rows(rows), width)
            logp = token_logprobs(policy_hidden(ctx, micro), weight,
                                  micro.completion_ids, cfg.temperature, backend=cfg.logprob_backend,
                                  chunk_bytes=cfg.logprob_chunk_bytes or None)
            out.append(torch.nn.functional.pad(logp, (0, batch.completion_ids.shape[1] - width)))
        return torch.cat(out)
    rows = micro_rows(cfg, batch, ctx.logprob_batch_size or batch.completion_ids.shape[0])
    logp, worked = halve_on_oom(run, rows, "a log-prob pass")
    if worked < rows:
        ctx.logprob_batch_size = worked
    return logp


def reward_rollouts(ctx: StepContext, batch: Rollout, examples: list[Example]) -> ScoredRollout:
    """Rewards and group advantages of a rollout (its log-probs not yet computed)."""
    cfg = ctx.cfg
    per_row = [e for e in examples for _ in range(cfg.num_generations)]
    totals, parts, counts = rewards.score(
        batch.texts, per_row, cfg.rewards, completion_lengths=batch.completion_mask.sum(1).tolist(),
        max_completion_len=cfg.max_new_tokens, soft_punish_cache=cfg.soft_punish_cache)
    reward_t = torch.tensor(totals, dtype=torch.float32)
    advantages = group_advantages(reward_t, cfg.num_generations, cfg.scale_rewards).to(batch.completion_ids.device)
    return ScoredRollout(batch, per_row, reward_t, parts, counts, advantages, None, None)


def add_logprobs(ctx: StepContext, scored: ScoredRollout) -> ScoredRollout:
    """The reference (beta > 0) and old (num_iterations > 1) log-probs of a rewarded rollout."""
    ctx.policy.eval()
    if ctx.cfg.beta > 0:
        with ctx.policy.disable_adapter():
            scored.ref_logp = policy_logprobs(ctx, scored.batch)
    scored.old_logp = None
    if ctx.cfg.num_iterations > 1:  # only the rows that train read them (`rows_with_loss`); the others stay 0
        trained = rows_with_loss(ctx.cfg, scored.advantages)
        old = policy_logprobs(ctx, scored.batch.rows(trained))
        scored.old_logp = old.new_zeros(scored.batch.completion_ids.shape)
        scored.old_logp[trained] = old
    return scored


def score_rollouts(ctx: StepContext, batch: Rollout, examples: list[Example]) -> ScoredRollout:
    """Rewards, group advantages, and the reference (beta > 0) and old (num_iterations > 1) log-probs."""
    return add_logprobs(ctx, reward_rollouts(ctx, batch, examples))


def filtered_rollouts(ctx: StepContext, examples: list[Example], draw=None) -> tuple[ScoredRollout, dict]:
    """DAPO's dynamic sampling (verl's filter_groups): generate and reward, keep the groups whose rewards are not
    all equal, and draw `draw()` more prompts until `len(examples)` groups are kept, at most
    `max_num_gen_batches` rounds (`draw` None: one round). A step still short after the bound trains on its
    kept groups topped up with dropped ones (advantage 0), so it always ends, with a full batch.
    Returns the rewarded rollout and the counts: groups dropped, prompts drawn, rounds, groups short."""
    cfg, wanted = ctx.cfg, len(examples)
    kept, dropped, drawn, rounds = [], [], 0, 0
    while True:
        rounds, drawn = rounds + 1, drawn + len(examples)
        scored = reward_rollouts(ctx, generate_rollouts(ctx, examples), examples)
        counts = scored.counts if rounds == 1 else {k: counts[k] + v for k, v in scored.counts.items()}
        for group in scored.groups(cfg.num_generations):
            (kept if bool(group.rewards.max() > group.rewards.min()) else dropped).append(group)
        if len(kept) >= wanted or rounds >= cfg.max_num_gen_batches or draw is None:
            break
        examples = draw()
    short = max(0, wanted - len(kept))
    batch = ScoredRollout.concat(kept[:wanted] + dropped[:short], counts, ctx.tokenizer.pad_token_id)
    return batch, {"dynamic_sampling/groups_dropped": len(dropped), "dynamic_sampling/prompts_drawn": drawn,
                   "dynamic_sampling/groups_short": short, "num_gen_batches": rounds}


def truncated(cfg: TrainConfig, batch: Rollout) -> torch.Tensor:
    """`[N]` bool: the completions that hit max_new_tokens without a stop (TRL's "clipped")."""
    return batch.clipped if batch.clipped is not None else batch.completion_mask.sum(1) >= cfg.max_new_tokens


def loss_mask(cfg: TrainConfig, batch: Rollout) -> torch.Tensor:
    """`[N, C]` the completion tokens that carry loss: the completion mask, less every token of a truncated
    completion under `mask_truncated_completions` (DAPO's overlong filtering)."""
    mask = batch.completion_mask
    if cfg.mask_truncated_completions:
        mask = mask * (~truncated(cfg, batch)).to(mask.dtype)[:, None]
    return mask


def rows_with_loss(cfg: TrainConfig, advantages: torch.Tensor) -> torch.Tensor:
    """`[n]` the rows the training pass runs on. Without a KL term (beta = 0) a row whose advantage is 0 (every
    row of a group whose rewards are all equal) has loss 0 and gradient 0 under every objective here (each
    policy term is a multiple of A), so its forward and backward are skipped: the same update up to float
    rounding, a group's share of the pass less per such group (frac_reward_zero_std). Not with the entropy
    quantile, whose threshold is taken over the call's tokens. When no row carries loss the first still runs
    (its gradient is 0), so every LoRA parameter the pass reaches gets a gradient and the optimizer steps as
    before."""
    every = torch.arange(advantages.shape[0], device=advantages.device)
    if cfg.beta != 0 or cfg.top_entropy_quantile < 1.0:
        return every
    trained = (advantages != 0).nonzero().squeeze(1)
    return trained if trained.numel() else every[:1]


def batch_totals(ctx: StepContext, mask: torch.Tensor, trained: torch.Tensor) -> dict | None:
    """The whole batch's counts over every rank, for the loss aggregation's denominators: completion tokens,
    sequences, and the padded completion length (the longest rank's: the one-process batch is padded to it);
    and the loss tokens of the rows that train (`trained`), which weight the metrics. None for one process
    (the batch is the whole batch). One all-gather."""
    if ctx.dist is None:
        return None
    local = torch.tensor([float(mask.sum()), float(mask.shape[0]), float(mask.shape[1]), float(mask[trained].sum())],
                         dtype=torch.float64, device=mask.device)
    every = ctx.dist.all_gather_tensor(local, "the token-count exchange")  # [world, 4]
    return {"tokens": every[:, 0].sum().item(), "sequences": every[:, 1].sum().item(),
            "length": every[:, 2].max().item(), "trained_tokens": every[:, 3].sum().item()}


def global_token_weights(mask: torch.Tensor, loss_agg: str, totals: dict | None) -> torch.Tensor:
    """`token_weights(mask, loss_agg)` of the whole batch restricted to these rows: the same formulas, with the
    batch-wide counts of `totals` (one process: `token_weights` itself)."""
    if totals is None:
        return token_weights(mask, loss_agg)
    mask = mask.float()
    if loss_agg == "token_mean":
        return mask / max(totals["tokens"], 1.0)
    if loss_agg == "seq_mean_token_mean":
        return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * totals["sequences"])
    if loss_agg == "seq_mean_token_sum_norm":
        return mask / (totals["sequences"] * totals["length"])
    return token_weights(mask, loss_agg)  # raises: an unknown aggregation


def _loss_sums(ctx: StepContext, scored: ScoredRollout, micro_batch_size: int, mask: torch.Tensor,
               trained: torch.Tensor, totals: dict | None = None) -> dict:
    """Forward + backward over micro-batches of the rows `trained` (`rows_with_loss`) of the loss mask `mask`
    (`[N, C]`); metric sums stay on the device (one sync at the end) and are token-weighted over those rows.
    With `totals` (several ranks) the weights and token shares use the whole batch's counts, so the sums over
    the ranks of the gradients and of these sums are the whole batch's."""
    cfg, weight = ctx.cfg, models.lm_head_weight(ctx.policy)
    weights_all = global_token_weights(mask, cfg.loss_agg, totals)  # over the whole batch, not per micro-batch
    batch, mask, weights_all, advantages = (scored.batch.rows(trained), mask[trained], weights_all[trained],
                                            scored.advantages[trained])
    old_logp, ref_logp = (None if logp is None else logp[trained] for logp in (scored.old_logp, scored.ref_logp))
    total_tokens = mask.sum().clamp(min=1) if totals is None else max(totals["trained_tokens"], 1.0)
    keys = ("kl", "clip_low", "clip_high", "ratio", "entropy")
    sums = {key: torch.zeros((), device=mask.device) for key in ("loss",) + keys}
    size = micro_rows(cfg, batch, micro_batch_size)
    for rows, width in micro_batches(batch, size):
        micro, columns = cut(batch.rows(rows), width), (rows, slice(0, width))
        loss, metrics = grpo_loss(
            policy_hidden(ctx, micro), weight, micro.completion_ids,
            mask[columns], advantages[rows], None if old_logp is None else old_logp[columns],
            None if ref_logp is None else ref_logp[columns], beta=cfg.beta,
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, temperature=cfg.temperature,
            loss_type=cfg.loss_type, importance_sampling_level=cfg.importance_sampling_level,
            top_entropy_quantile=cfg.top_entropy_quantile, token_weight=weights_all[columns],
            backend=cfg.logprob_backend, chunk_bytes=cfg.logprob_chunk_bytes or None)
        loss.backward()
        share = mask[rows].sum() / total_tokens
        sums["loss"] += loss.detach()
        for key in keys:
            sums[key] += metrics[key].detach() * share
    return sums


def compute_gradients(ctx: StepContext, scored: ScoredRollout) -> dict:
    """The GRPO loss's gradient of the whole batch in the LoRA parameters' `.grad` (accumulated over
    micro-batches, which halve on CUDA out-of-memory), and its metric sums. Several ranks: each rank's
    share with the global denominators, then one all-reduce of the gradients and the sums together."""
    policy = ctx.policy
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()  # train mode: gradient checkpointing on (when configured)
    mask, trained = loss_mask(ctx.cfg, scored.batch), rows_with_loss(ctx.cfg, scored.advantages)
    totals = batch_totals(ctx, mask, trained)  # before the back-off: a collective runs once

    def run(size: int) -> dict:
        for p in lora_params:
            p.grad = None
        return _loss_sums(ctx, scored, size, mask, trained, totals)
    sums, ctx.micro_batch_size = halve_on_oom(run, ctx.micro_batch_size, "the training pass")
    if ctx.dist is not None:
        keys = list(sums)
        sums = dict(zip(keys, ctx.dist.all_reduce_gradients(lora_params, [sums[k] for k in keys])))
    return sums


def update_policy(ctx: StepContext, scored: ScoredRollout) -> dict:
    """One optimizer update on the GRPO loss of `scored` (gradients accumulated over micro-batches, which
    halve on CUDA out-of-memory); returns its loss metrics. A non-finite loss or gradient skips the update."""
    policy, optimizer = ctx.policy, ctx.optimizer
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    sums = compute_gradients(ctx, scored)
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, ctx.cfg.max_grad_norm)
    out = {key: float(value) for key, value in sums.items()}
    out["skipped"] = not (math.isfinite(float(grad_norm)) and math.isfinite(out["loss"]))
    if out["skipped"]:
        optimizer.zero_grad(set_to_none=True)  # a non-finite step changes nothing
    else:
        optimizer.step()
    ctx.scheduler.step()
    out["grad_norm"] = float(grad_norm)
    return out


def rollout_metrics(scored: ScoredRollout, cfg: TrainConfig) -> dict:
    """Reward and completion statistics of a step, under TRL's names where TRL has the quantity:
    `reward_std` is the mean of the per-group standard deviations, `completions/clipped_ratio` the
    fraction of completions that hit max_new_tokens without a stop."""
    grouped = scored.rewards.view(-1, cfg.num_generations)
    group_std = grouped.std(dim=1)
    batch = scored.batch
    lengths = batch.completion_mask.sum(1).float()
    clipped = truncated(cfg, batch)
    row = {"reward": float(scored.rewards.mean()), "reward_std": float(group_std.mean()),
           "frac_reward_zero_std": float((group_std < 1e-6).float().mean())}
    for name, values in scored.parts.items():
        row[f"rewards/{name}/mean"] = sum(values) / len(values)
    row.update(scored.counts)
    row.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float(clipped.float().mean())})
    return row


# Metrics that are wall-clock readings: they differ between two runs that are otherwise bit-identical.
TIMING_METRICS = ("step_seconds", "generate_seconds", "score_seconds", "update_seconds", "tokens_per_second")

# How `merge_rows` combines one step's metrics over the ranks. Already global (computed after the gradient
# all-reduce, equal on every rank): taken from rank 0. Counts: summed. Per-group statistics: weighted by the
# groups of each rank; everything else numeric (rewards, lengths, rates over completions): by completions.
ALREADY_GLOBAL = ("loss", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                  "cispo_clip_ratio", "ratio",
                  "entropy", "grad_norm", "skipped", "lr")
SUMMED = ("reward_timeouts", "reward_errors", "reward_rejected", "dynamic_sampling/groups_dropped",
          "dynamic_sampling/prompts_drawn", "dynamic_sampling/groups_short")
PER_GROUP = ("reward_std", "frac_reward_zero_std")
SMALLEST = ("completions/min_length", "micro_batch_size")
LARGEST = ("num_gen_batches", "completions/max_length", "step_seconds", "generate_seconds", "score_seconds", "update_seconds")


def merge_rows(parts: list[tuple[dict, dict]]) -> dict:
    """One metrics row from every rank's `(row, weights)`, weights `{"completions", "groups", "tokens"}`:
    means weighted by counts, sums summed, extremes of extremes; `tokens_per_second` is every rank's
    tokens over the slowest rank's step time."""
    rows = [row for row, _ in parts]
    merged = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if key in ALREADY_GLOBAL or not isinstance(value, (int, float)) or isinstance(value, bool):
            merged[key] = value
        elif key in SUMMED:
            merged[key] = sum(values)
        elif key in SMALLEST:
            merged[key] = min(values)
        elif key in LARGEST:
            merged[key] = max(values)
        else:
            weight = "groups" if key in PER_GROUP else "completions"
            merged[key] = sum(v * w[weight] for v, (_, w) in zip(values, parts)) / sum(w[weight] for _, w in parts)
    if "tokens_per_second" in merged:
        merged["tokens_per_second"] = sum(w["tokens"] for _, w in parts) / merged["step_seconds"]
    return merged


def clock() -> float:
    """Wall seconds, after the GPU's queued work has finished (phase timings must not end at a launch)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def grpo_step(ctx: StepContext, examples: list[Example], draw=None) -> tuple[dict, ScoredRollout]:
    """Generate, score, and `num_iterations` updates for one step's examples; returns (metrics, scored).
    Under torchrun `examples` are this rank's share, `scored` is this rank's, and the metrics are the
    whole step's (merged over the ranks; every rank gets them). With `filter_groups`, `draw()` gives
    more prompts (as many again) for dynamic sampling; generation then includes the rewards' time."""
    start = clock()
    sampling = {}
    if ctx.cfg.filter_groups:
        rewarded, sampling = filtered_rollouts(ctx, examples, draw)
        generated = clock()
    else:
        batch = generate_rollouts(ctx, examples)
        generated = clock()
        rewarded = reward_rollouts(ctx, batch, examples)
    scored = add_logprobs(ctx, rewarded)
    batch = scored.batch
    scored_at = clock()
    any_skipped, sums = False, {}
    for _ in range(ctx.cfg.num_iterations):
        sums = update_policy(ctx, scored)
        any_skipped = any_skipped or sums["skipped"]
    end = clock()
    seconds = end - start
    lengths = batch.completion_mask.sum(1).float()
    row = rollout_metrics(scored, ctx.cfg)
    row.update(sampling)
    if ctx.cfg.loss_type == "cispo":  # TRL's name: the fraction of tokens whose weight was clipped, A > 0
        row["cispo_clip_ratio"] = sums["clip_high"]
    else:
        row.update({"clip_ratio/low_mean": sums["clip_low"], "clip_ratio/high_mean": sums["clip_high"],
                    "clip_ratio/region_mean": sums["clip_low"] + sums["clip_high"]})
    row.update({"loss": sums["loss"], "kl": sums["kl"],
                "ratio": sums["ratio"], "entropy": sums["entropy"], "grad_norm": sums["grad_norm"],
                "skipped": any_skipped, "lr": ctx.scheduler.get_last_lr()[0],
                "micro_batch_size": ctx.micro_batch_size, "step_seconds": seconds,
                "generate_seconds": generated - start, "score_seconds": scored_at - generated,
                "update_seconds": end - scored_at,
                "tokens_per_second": float(lengths.sum() + batch.prompt_mask.sum()) / seconds})
    if ctx.dist is not None:
        weights = {"completions": len(lengths), "groups": len(lengths) // ctx.cfg.num_generations,
                   "tokens": float(lengths.sum() + batch.prompt_mask.sum())}
        row = merge_rows(ctx.dist.all_gather_object((row, weights), "the metrics exchange"))
    return row, scored
