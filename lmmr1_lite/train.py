"""The GRPO loop. Read this file first.

Each step:
 1. sample B prompts; generate G completions each with HF `generate` and its KV cache
    (eval mode: gradient checkpointing is off while generating);
 2. score them with the rule-based rewards (weighted sum of named rewards);
 3. advantages normalised within each group of G: (r - mean) / (std + 1e-4) (`scale_rewards:
    group`) or r - mean (`none`); a group whose rewards are all equal has advantage 0;
 4. reference log-probs from the same weights with the LoRA adapter disabled (skipped when
    beta = 0); old log-probs only when num_iterations > 1 (otherwise the ratio is taken against
    the detached current log-probs, so it is 1 with the gradient of the policy gradient);
 5. num_iterations optimizer updates (AdamW, or paged 8-bit AdamW) of the LoRA parameters on the
    clipped-ratio loss with the k3 KL term, aggregated over the whole batch by `loss_agg`
    (token_mean by default) across micro-batches (capped by a token budget), with gradient-norm
    clipping and a warm-up + cosine (or linear/constant) schedule; a non-finite loss or gradient
    skips the update.
Log-probs always come from `lmmr1_kernels` (chunked over tokens; never `[tokens, vocab]` logits).
A random-init base (the tiny defaults) may first get an instruct prior (`instruct_prior_steps`, tiny.py):
RL starts from a model that answers in form, at chance, as LMM-R1 starts from an Instruct model.
Checkpoints, resume, signals and out-of-memory back-off are the loop's only other concerns
(see checkpoint.py and the README's "Runs that survive").
"""
from __future__ import annotations

import json
import math
import random
import shutil
import signal
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_scheduler

from lmmr1_kernels import grpo_loss, token_logprobs, token_weights

from . import models, rewards, verifier
from .checkpoint import check_output_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig
from .data import build_messages, load_splits, prepare
from .evaluate import evaluate_model
from .report import MetricsLog, plot_rewards
from .rollout import Rollout, generate, stop_token_ids
from .tiny import instruct_prior


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


@torch.no_grad()
def rollout_logprobs(policy, batch: Rollout, cfg: TrainConfig) -> torch.Tensor:
    """Per-token log-probs `[N, C]` of a rollout's completions, micro-batched, no graph kept."""
    weight = models.lm_head_weight(policy)
    out = []
    rows = micro_rows(cfg, batch, cfg.micro_batch_size)
    for start in range(0, batch.completion_ids.shape[0], rows):
        micro = batch.rows(slice(start, start + rows))
        out.append(token_logprobs(models.completion_hidden(policy, micro), weight, micro.completion_ids,
                                  cfg.temperature, backend=cfg.logprob_backend))
    return torch.cat(out)


def resolve_init(cfg: TrainConfig) -> Path | None:
    """The adapter directory a run continues from (MGT continues the FRE adapter), or None.

    Continuing the FRE adapter rather than merging it and starting a new one is the LoRA analogue of
    LMM-R1 continuing from the FRE checkpoint: one adapter, one reference (the base), and the KL term
    still measures the distance from the base model. The adapter's own base is used (for a random-init
    FRE run, its saved base_model/), so the weights match."""
    if cfg.init == "none" or (cfg.init is None and cfg.stage != "mgt"):
        return None
    if cfg.init is None:
        found = sorted(Path("runs").glob("fre-*/adapter/adapter_config.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            models.warn_once("stage mgt: no FRE run in runs/ to start from; starting from the base model "
                             "(run `lmmr1-lite train --stage fre` first, or pass --init RUN_DIR)")
            return None
        adapter = found[-1].parent
    else:
        path = Path(cfg.init)
        adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"init {cfg.init}: neither a run directory with adapter/ nor an adapter directory")
    cfg.init = str(adapter)
    cfg.random_init = False  # the adapter's base has weights of its own; a new random one would not match
    if (adapter.parent / "base_model").is_dir():  # a random-init FRE run: continue on its exact base
        cfg.model = str(adapter.parent / "base_model")
    else:
        cfg.model = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] or cfg.model
    return adapter


def run_base_model(cfg: TrainConfig, run_dir: Path, tokenizer, train_rows: list, image_processor, device):
    """The run's base model. A random-init base (with its instruct prior, when configured) is first saved
    to <run>/base_model and then loaded from there like a downloaded checkpoint, quantised as configured,
    so the adapter's base is a real directory (eval, export, MGT --init) and --resume reloads it exactly."""
    if not cfg.random_init:
        return models.load_base_model(cfg, device)
    saved = run_dir / "base_model"
    if not saved.is_dir():
        fresh = models.load_base_model(replace(cfg, quantization="none"), device)
        if cfg.instruct_prior_steps:
            loss = instruct_prior(fresh, tokenizer, train_rows, cfg, image_processor)
            print(f"instruct prior: {cfg.instruct_prior_steps} supervised steps on the answer format with random "
                  f"answers (final loss {loss:.3f})")
        models.save_base_model(fresh, tokenizer, saved, cfg.model)
        del fresh
    return models.load_base_model(replace(cfg, model=str(saved), random_init=False), device)


def make_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """The run directory: new (refusing one that holds a run, unless overwrite) or, on resume, the old one."""
    run_dir = Path(cfg.output_dir or f"runs/{cfg.stage}-{datetime.now():%Y%m%d-%H%M%S}")
    holds_run = (run_dir / "metrics.jsonl").exists() or (run_dir / "config.yaml").exists()
    if holds_run and not resume:
        if not cfg.overwrite:
            raise ConfigError(f"output_dir {run_dir} already holds a run; resume it with --resume {run_dir}, "
                              "pass --overwrite to replace it, or choose another --output-dir")
        shutil.rmtree(run_dir)
    cfg.output_dir = str(run_dir)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TrainingAborted(RuntimeError):
    """The run cannot go on (repeated non-finite steps, out of memory at micro-batch 1); checkpoints are kept."""


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: stop at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def update_policy(policy, batch: Rollout, advantages, old_logp, ref_logp, cfg: TrainConfig, optimizer, scheduler,
                  micro_batch_size: int) -> dict:
    """One optimizer update on the GRPO loss of `batch` (gradients accumulated over micro-batches);
    returns its loss metrics. A non-finite loss or gradient norm skips the update."""
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    weight = models.lm_head_weight(policy)
    mask = batch.completion_mask
    weights_all = token_weights(mask, cfg.loss_agg)  # aggregation over the whole batch, not per micro-batch
    n = mask.shape[0]
    micro_batch_size = micro_rows(cfg, batch, micro_batch_size)
    policy.train()  # train mode: gradient checkpointing on (when configured)
    optimizer.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "kl": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio": 0.0, "entropy": 0.0}
    for start in range(0, n, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        micro = batch.rows(rows)
        loss, metrics = grpo_loss(
            models.completion_hidden(policy, micro), weight, micro.completion_ids, micro.completion_mask,
            advantages[rows], None if old_logp is None else old_logp[rows],
            None if ref_logp is None else ref_logp[rows], beta=cfg.beta, epsilon_low=cfg.epsilon_low,
            epsilon_high=cfg.epsilon_high, temperature=cfg.temperature, token_weight=weights_all[rows],
            backend=cfg.logprob_backend)
        loss.backward()
        share = micro.completion_mask.sum().item() / max(1, mask.sum().item())
        sums["loss"] += loss.item()
        for key in ("kl", "clip_low", "clip_high", "ratio", "entropy"):
            sums[key] += metrics[key].item() * share
    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, cfg.max_grad_norm)
    sums["skipped"] = not (torch.isfinite(grad_norm) and math.isfinite(sums["loss"]))
    if sums["skipped"]:
        optimizer.zero_grad(set_to_none=True)  # a non-finite step changes nothing
    else:
        optimizer.step()
    scheduler.step()
    sums["grad_norm"] = float(grad_norm)
    return sums


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or, with resume, continue) GRPO for one stage; returns the run directory."""
    # ---- setup ---------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    rewards.check_names(cfg.rewards)
    init_adapter = None if resume else resolve_init(cfg)
    run_dir = make_run_dir(cfg, resume)
    check_output_dir(run_dir, needed_bytes=0)  # writable at all: fail now, not after loading a model
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise ConfigError(f"{run_dir}: no complete checkpoint to resume from")
    device = models.pick_device()
    train_rows, test_rows, data_report = load_splits(cfg.data, cfg.train_size, cfg.eval_size, cfg.seed, cfg.on_bad_row)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    train_rows, test_rows = (prepare(rows, tokenizer, cfg.system_prompt, cfg.max_prompt_tokens, cfg.min_pixels,
                                     cfg.max_pixels, data_report, cfg.prompt_template) for rows in (train_rows, test_rows))
    if not train_rows:
        raise ConfigError(f"data {cfg.data}: no usable training rows ({data_report.line()})")
    image_processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    policy = models.add_lora(run_base_model(cfg, run_dir, tokenizer, train_rows, image_processor, device), cfg)
    if init_adapter is not None:
        models.load_adapter_weights(policy, init_adapter)
        print(f"continuing the adapter {init_adapter}")
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
    check_output_dir(run_dir, needed_bytes=(cfg.keep_last + 2) * 4 * lora_bytes + 64 * 2**20)
    cfg.save(run_dir / "config.yaml")
    if cfg.random_init:  # the adapter's base is the saved random model, not the config directory
        policy.peft_config["default"].base_model_name_or_path = str((run_dir / "base_model").resolve())
    optimizer = models.make_optimizer(lora_params, cfg)
    total_updates = cfg.max_steps * cfg.num_iterations
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type,
                              optimizer, math.ceil(cfg.warmup_ratio * total_updates), total_updates)
    stop_ids = stop_token_ids(tokenizer, cfg.stop_tokens)
    verifier.pool(cfg.reward_timeout)  # start the answer-checking workers now, not inside step 1
    log = MetricsLog(run_dir, cfg.report_to, cfg.to_dict())
    sampler = random.Random(cfg.seed)  # which prompts each step sees
    print(f"lmmr1-lite: stage {cfg.stage}, model {cfg.model}{' (random init)' if cfg.random_init else ''}, "
          f"{sum(p.numel() for p in lora_params):,} LoRA parameters, device {device}, run dir {run_dir}")
    print(f"data {cfg.data}: {data_report.line()}; {len(train_rows)} train / {len(test_rows)} held-out prompts")

    if checkpoint is not None:
        state = load_checkpoint(checkpoint, policy, optimizer, scheduler, sampler)
        first_step, eval_before, skipped_steps = state["step"] + 1, state["eval_before"], state["skipped_steps"]
        print(f"resuming from {checkpoint} at step {first_step} of {cfg.max_steps}")
    else:
        first_step, skipped_steps = 1, 0
        eval_before = evaluate_model(policy, tokenizer, test_rows, cfg, image_processor=image_processor)
        if eval_before:
            print(f"eval before: accuracy {eval_before['accuracy']:.3f}, format {eval_before['format']:.3f}")
    micro_batch_size = cfg.micro_batch_size
    generation_batch_size = cfg.generation_batch_size or cfg.prompts_per_step
    consecutive_skips = 0

    def save(step: int) -> Path:
        return save_checkpoint(run_dir, step, policy, optimizer, scheduler, sampler,
                               {"eval_before": eval_before, "skipped_steps": skipped_steps}, cfg.keep_last)

    # ---- the loop ------------------------------------------------------------------------------
    bar = tqdm(range(first_step, cfg.max_steps + 1), desc=f"GRPO {cfg.stage}", unit="step", dynamic_ncols=True,
               initial=first_step - 1, total=cfg.max_steps)
    with StopFlag() as stop:
        for step in bar:
            t0 = time.perf_counter()
            examples = [sampler.choice(train_rows) for _ in range(cfg.prompts_per_step)]
            messages = [build_messages(e, cfg.system_prompt, cfg.prompt_template) for e in examples]
            # 1. rollouts, in chunks of prompts
            batch, generation_batch_size = halve_on_oom(lambda size: Rollout.concat([
                generate(policy, tokenizer, messages[i:i + size], num_generations=cfg.num_generations,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=stop_ids,
                         image_processor=image_processor)
                for i in range(0, len(messages), size)], tokenizer.pad_token_id), generation_batch_size, "generation")
            t_gen = time.perf_counter() - t0
            # 2. rewards
            answers = [e.answer for e in examples for _ in range(cfg.num_generations)]
            totals, parts, reward_counts = rewards.score(batch.texts, answers, cfg.rewards)
            reward_t = torch.tensor(totals, dtype=torch.float32)
            # 3. advantages
            advantages = group_advantages(reward_t, cfg.num_generations, cfg.scale_rewards).to(device)
            # 4. reference and old log-probs (no graph)
            policy.eval()
            ref_logp = None
            if cfg.beta > 0:
                with policy.disable_adapter():
                    ref_logp = rollout_logprobs(policy, batch, cfg)
            old_logp = rollout_logprobs(policy, batch, cfg) if cfg.num_iterations > 1 else None
            # 5. updates
            any_skipped = False
            for _ in range(cfg.num_iterations):  # an out-of-memory retry repeats only the update that failed
                sums, micro_batch_size = halve_on_oom(
                    lambda size: update_policy(policy, batch, advantages, old_logp, ref_logp, cfg, optimizer,
                                               scheduler, size), micro_batch_size, "the training pass")
                any_skipped = any_skipped or sums["skipped"]
            sums["skipped"] = any_skipped
            skipped_steps += sums["skipped"]
            consecutive_skips = consecutive_skips + 1 if sums["skipped"] else 0

            # ---- logging -----------------------------------------------------------------------
            seconds = time.perf_counter() - t0
            lengths = batch.completion_mask.sum(1).float()
            row = {"step": step, "reward_mean": float(reward_t.mean()), "reward_std": float(reward_t.std()),
                   **{name: sum(v) / len(v) for name, v in parts.items()}, **reward_counts,
                   "loss": sums["loss"], "kl": sums["kl"], "clip_frac": sums["clip_low"] + sums["clip_high"],
                   "clip_frac_low": sums["clip_low"], "clip_frac_high": sums["clip_high"], "ratio": sums["ratio"],
                   "entropy": sums["entropy"], "grad_norm": sums["grad_norm"], "skipped": sums["skipped"],
                   "skipped_steps": skipped_steps, "lr": scheduler.get_last_lr()[0],
                   "micro_batch_size": micro_batch_size, "completion_len": float(lengths.mean()),
                   "step_seconds": seconds, "generate_seconds": t_gen,
                   "tokens_per_second": float(lengths.sum() + batch.prompt_mask.sum()) / seconds}
            log.log(row)
            bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                            len=f"{row['completion_len']:.0f}")
            if consecutive_skips >= cfg.max_consecutive_skips:
                last = latest_checkpoint(run_dir)
                raise TrainingAborted(f"{consecutive_skips} consecutive steps with a non-finite loss or gradient "
                                      f"(to step {step}); last good checkpoint: {last or 'none'}. Lower learning_rate "
                                      "or max_grad_norm, or check the data")
            if stop.requested:
                path = save(step)
                bar.close()
                log.close()
                print(f"stopped after step {step}; checkpoint {path}\nresume with: lmmr1-lite train --resume {run_dir}")
                return run_dir
            due = cfg.save_every and step % cfg.save_every == 0 or step == cfg.max_steps
            if due and not sums["skipped"]:  # no checkpoint inside a non-finite streak: the last one stays "good"
                save(step)
    bar.close()

    # ---- finish ----------------------------------------------------------------------------------
    adapter_dir = run_dir / "adapter"
    policy.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    eval_after = evaluate_model(policy, tokenizer, test_rows, cfg, image_processor=image_processor)
    (run_dir / "eval.json").write_text(json.dumps({"before": eval_before, "after": eval_after}, indent=2))
    plot = plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward_curve.png",
                        title=f"lmmr1-lite {cfg.stage}: {Path(cfg.model).name} on {cfg.data}")
    log.close()
    if eval_after:
        print(f"eval after:  accuracy {eval_after['accuracy']:.3f} (before {eval_before['accuracy']:.3f}; "
              f"always giving the commonest answer: {eval_after['majority_answer_accuracy']:.3f}), "
              f"format {eval_after['format']:.3f} (before {eval_before['format']:.3f})")
    print(f"adapter: {adapter_dir}\nreward curve: {plot}\nmetrics: {run_dir / 'metrics.jsonl'}", file=sys.stdout)
    return run_dir
