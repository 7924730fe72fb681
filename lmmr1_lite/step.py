"""One GRPO step as a unit: the phases that `train.py`, `bench/e2e_step.py` and the tests all call.

    batch = generate_rollouts(ctx, examples)          # B prompts x G completions
    scored = score_rollouts(ctx, batch, examples)     # rewards, group advantages, ref/old log-probs
    metrics = update_policy(ctx, scored)              # one optimizer update (micro-batched)

`grpo_step(ctx, examples)` runs the three, with `num_iterations` updates and the out-of-memory back-off,
and returns the step's metrics under TRL's names where TRL has the quantity.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch

from lmmr1_kernels import grpo_loss, token_logprobs, token_weights

from . import models, rewards
from .config import TrainConfig
from .data import Example, build_messages
from .rollout import Rollout, generate


class TrainingAborted(RuntimeError):
    """The run cannot go on (repeated non-finite steps, out of memory at micro-batch 1); checkpoints are kept."""


@dataclass
class StepContext:
    """What every phase of a step needs; the two batch sizes shrink on CUDA out-of-memory and stay shrunk."""
    policy: object
    tokenizer: object
    cfg: TrainConfig
    optimizer: object = None
    scheduler: object = None
    image_processor: object = None
    stop_ids: list = field(default_factory=list)
    generation_batch_size: int = 0
    micro_batch_size: int = 0

    def __post_init__(self):
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


def group_advantages(rewards_: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """`rewards [B*G]` -> advantages `[B*G]`, normalised within each consecutive group of G."""
    grouped = rewards_.view(-1, group_size).double()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.view(-1).float()


def micro_rows(cfg: TrainConfig, batch: Rollout, size: int) -> int:
    """Sequences per micro-batch: `size`, capped by the token budget over the padded sequence length."""
    if cfg.max_tokens_per_micro_batch:
        size = min(size, max(1, cfg.max_tokens_per_micro_batch // batch.input_ids.shape[1]))
    return size


def halve_on_oom(run, size: int, what: str) -> tuple[object, int]:
    """`run(size)`, halving `size` on CUDA out-of-memory down to 1; returns (result, size that worked)."""
    while True:
        try:
            return run(size), size
        except torch.OutOfMemoryError:
            if size == 1:
                raise TrainingAborted(f"out of GPU memory in {what} even at batch size 1: `lmmr1-lite plan --config "
                                      "<run>/config.yaml` shows where the memory goes; lower max_new_tokens, "
                                      "num_generations or max_pixels, or turn gradient_checkpointing on") from None
            size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"out of GPU memory in {what}: retrying this step with batch size {size}", file=sys.stderr)


def generate_rollouts(ctx: StepContext, examples: list[Example]) -> Rollout:
    """G completions for each example, in chunks of `ctx.generation_batch_size` prompts (halved on OOM)."""
    cfg = ctx.cfg
    messages = [build_messages(e, cfg.system_prompt, cfg.prompt_template) for e in examples]

    def run(size: int) -> Rollout:
        return Rollout.concat([
            generate(ctx.policy, ctx.tokenizer, messages[i:i + size], num_generations=cfg.num_generations,
                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=ctx.stop_ids,
                     image_processor=ctx.image_processor)
            for i in range(0, len(messages), size)], ctx.tokenizer.pad_token_id)
    batch, ctx.generation_batch_size = halve_on_oom(run, ctx.generation_batch_size, "generation")
    return batch


@torch.no_grad()
def policy_logprobs(ctx: StepContext, batch: Rollout) -> torch.Tensor:
    """Per-token log-probs `[N, C]` of a rollout's completions under the current policy (or, inside
    `disable_adapter()`, the reference), micro-batched, no graph kept."""
    cfg = ctx.cfg
    weight = models.lm_head_weight(ctx.policy)
    rows = micro_rows(cfg, batch, ctx.micro_batch_size)
    out = []
    for start in range(0, batch.completion_ids.shape[0], rows):
        micro = batch.rows(slice(start, start + rows))
        out.append(token_logprobs(models.completion_hidden(ctx.policy, micro), weight, micro.completion_ids,
                                  cfg.temperature, backend=cfg.logprob_backend))
    return torch.cat(out)


def score_rollouts(ctx: StepContext, batch: Rollout, examples: list[Example]) -> ScoredRollout:
    """Rewards, group advantages, and the reference (beta > 0) and old (num_iterations > 1) log-probs."""
    cfg = ctx.cfg
    per_row = [e for e in examples for _ in range(cfg.num_generations)]
    totals, parts, counts = rewards.score(batch.texts, per_row, cfg.rewards)
    reward_t = torch.tensor(totals, dtype=torch.float32)
    device = batch.completion_ids.device
    advantages = group_advantages(reward_t, cfg.num_generations, cfg.scale_rewards).to(device)
    ctx.policy.eval()
    ref_logp = None
    if cfg.beta > 0:
        with ctx.policy.disable_adapter():
            ref_logp = policy_logprobs(ctx, batch)
    old_logp = policy_logprobs(ctx, batch) if cfg.num_iterations > 1 else None
    return ScoredRollout(batch, per_row, reward_t, parts, counts, advantages, ref_logp, old_logp)


def _loss_sums(ctx: StepContext, scored: ScoredRollout, micro_batch_size: int) -> dict:
    """Forward + backward over micro-batches; metric sums stay on the device (one sync at the end)."""
    cfg, batch = ctx.cfg, scored.batch
    weight = models.lm_head_weight(ctx.policy)
    mask = batch.completion_mask
    weights_all = token_weights(mask, cfg.loss_agg)  # aggregation over the whole batch, not per micro-batch
    total_tokens = mask.sum().clamp(min=1)
    keys = ("kl", "clip_low", "clip_high", "ratio", "entropy")
    sums = {key: torch.zeros((), device=mask.device) for key in ("loss",) + keys}
    size = micro_rows(cfg, batch, micro_batch_size)
    for start in range(0, mask.shape[0], size):
        rows = slice(start, start + size)
        micro = batch.rows(rows)
        loss, metrics = grpo_loss(
            models.completion_hidden(ctx.policy, micro), weight, micro.completion_ids, micro.completion_mask,
            scored.advantages[rows], None if scored.old_logp is None else scored.old_logp[rows],
            None if scored.ref_logp is None else scored.ref_logp[rows], beta=cfg.beta,
            epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, temperature=cfg.temperature,
            token_weight=weights_all[rows], backend=cfg.logprob_backend)
        loss.backward()
        share = micro.completion_mask.sum() / total_tokens
        sums["loss"] += loss.detach()
        for key in keys:
            sums[key] += metrics[key].detach() * share
    return sums


def update_policy(ctx: StepContext, scored: ScoredRollout) -> dict:
    """One optimizer update on the GRPO loss of `scored` (gradients accumulated over micro-batches, which
    halve on CUDA out-of-memory); returns its loss metrics. A non-finite loss or gradient skips the update."""
    policy, optimizer = ctx.policy, ctx.optimizer
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()  # train mode: gradient checkpointing on (when configured)

    def run(size: int) -> dict:
        optimizer.zero_grad(set_to_none=True)
        return _loss_sums(ctx, scored, size)
    sums, ctx.micro_batch_size = halve_on_oom(run, ctx.micro_batch_size, "the training pass")
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


def rollout_metrics(scored: ScoredRollout, cfg: TrainConfig, stop_ids: list[int]) -> dict:
    """Reward and completion statistics of a step, under TRL's names where TRL has the quantity:
    `reward_std` is the mean of the per-group standard deviations, `completions/clipped_ratio` the
    fraction of completions that hit max_new_tokens without a stop token."""
    grouped = scored.rewards.view(-1, cfg.num_generations)
    group_std = grouped.std(dim=1)
    batch = scored.batch
    lengths = batch.completion_mask.sum(1).float()
    stopped = (torch.isin(batch.completion_ids, torch.tensor(stop_ids, device=batch.completion_ids.device))
               & batch.completion_mask.bool()).any(1)
    row = {"reward": float(scored.rewards.mean()), "reward_std": float(group_std.mean()),
           "frac_reward_zero_std": float((group_std < 1e-6).float().mean())}
    for name, values in scored.parts.items():
        row[f"rewards/{name}/mean"] = sum(values) / len(values)
    row.update(scored.counts)
    row.update({"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float((~stopped).float().mean())})
    return row


def grpo_step(ctx: StepContext, examples: list[Example]) -> tuple[dict, ScoredRollout]:
    """Generate, score, and `num_iterations` updates for one step's examples; returns (metrics, scored)."""
    start = time.perf_counter()
    batch = generate_rollouts(ctx, examples)
    generated = time.perf_counter()
    scored = score_rollouts(ctx, batch, examples)
    any_skipped, sums = False, {}
    for _ in range(ctx.cfg.num_iterations):
        sums = update_policy(ctx, scored)
        any_skipped = any_skipped or sums["skipped"]
    seconds = time.perf_counter() - start
    lengths = batch.completion_mask.sum(1).float()
    row = rollout_metrics(scored, ctx.cfg, ctx.stop_ids)
    row.update({"loss": sums["loss"], "kl": sums["kl"], "clip_ratio/low_mean": sums["clip_low"],
                "clip_ratio/high_mean": sums["clip_high"], "clip_ratio/region_mean": sums["clip_low"] + sums["clip_high"],
                "ratio": sums["ratio"], "entropy": sums["entropy"], "grad_norm": sums["grad_norm"],
                "skipped": any_skipped, "lr": ctx.scheduler.get_last_lr()[0],
                "micro_batch_size": ctx.micro_batch_size, "step_seconds": seconds,
                "generate_seconds": generated - start,
                "tokens_per_second": float(lengths.sum() + batch.prompt_mask.sum()) / seconds})
    return row, scored
