"""The GRPO loop. Read this file first; the step's phases are functions of `step.py`
(`grpo_step`), which the benchmarks and tests call too.

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
    skips the update. Options, off by default: CISPO (`loss_type`), GSPO's sequence ratio
    (`importance_sampling_level`), high-entropy tokens only (`top_entropy_quantile`), DAPO's overlong
    filtering (`mask_truncated_completions`), soft overlong punishment (the `soft_overlong` reward) and
    dynamic sampling (`filter_groups`: groups of equal rewards are dropped and more prompts drawn,
    at most `max_num_gen_batches` rounds).
Log-probs always come from `lmmr1_kernels` (chunked over tokens; never `[tokens, vocab]` logits).
A random-init base (the tiny defaults) may first get an instruct prior (`instruct_prior_steps`, tiny.py):
RL starts from a model that answers in form, at chance, as LMM-R1 starts from an Instruct model.
Checkpoints, resume, signals and out-of-memory back-off are the loop's only other concerns
(see checkpoint.py and the README's "Runs that survive").

Under torchrun (`distributed.py`, README "More than one GPU") every rank runs this loop: the same prompts
are drawn on every rank and split, the update is the one-process update on all ranks' rollouts, the ranks
agree on a stop at every step boundary, and rank 0 alone writes the run directory (`RunDirectory`'s
`@rank0_only` methods). One process is a world of one (`OneProcess`), so the code below never asks.

`train` = `_setup` (checks, then policy, optimizer, starting point) + `_loop` (the steps) + `_finish`.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_scheduler

from . import distributed, hub, models, rewards
from .checkpoint import (DamagedCheckpoint, apply_checkpoint, checkpoint_world_size, latest_checkpoint,
                         newest_readable_checkpoint, rank_rng_state, read_checkpoint)
from .config import ConfigError, TrainConfig, with_absolute_paths
from .data import load_splits, prepare
from .distributed import Distributed
from .report import completion_records
from .rundir import RunDirectory
from .step import StepContext, TrainingAborted, grpo_step
from .tiny import instruct_prior


def resolve_init(cfg: TrainConfig) -> tuple[Path | None, TrainConfig]:
    """The adapter directory a run continues from (MGT continues the FRE adapter), or None, and the config
    to run with (a new one: the adapter's own base model).

    Continuing the FRE adapter rather than merging it and starting a new one is the LoRA analogue of
    LMM-R1 continuing from the FRE checkpoint: one adapter, one reference (the base), and the KL term
    still measures the distance from the base model. The adapter's own base is used (for a random-init
    FRE run, its saved base_model/), so the weights match."""
    if cfg.init == "none" or (cfg.init is None and cfg.stage != "mgt"):
        return None, cfg
    if cfg.init is None:
        found = sorted(Path("runs").glob("fre-*/adapter/adapter_config.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            models.warn_once("stage mgt: no FRE run in runs/ to start from; starting from the base model "
                             "(run `lmmr1-lite train --stage fre` first, or pass --init RUN_DIR)")
            return None, cfg
        adapter = found[-1].parent.resolve()
    else:
        path = Path(cfg.init)
        adapter = path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"init {cfg.init}: neither a run directory with adapter/ nor an adapter directory")
    if (adapter.parent / "base_model").is_dir():  # a random-init FRE run: continue on its exact base
        model = str((adapter.parent / "base_model").resolve())
    else:
        try:
            model = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] or cfg.model
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"init {adapter}: adapter_config.json is unreadable or names no base model") from None
    # the adapter's base has weights of its own; a new random one would not match
    return adapter, replace(cfg, init=str(adapter), random_init=False, model=model)


def run_base_model(cfg: TrainConfig, run: RunDirectory, tokenizer, train_rows: list, image_processor,
                   dist: Distributed):
    """The run's base model. A random-init base (with its instruct prior, when configured) is first saved
    to <run>/base_model and then loaded from there like a downloaded checkpoint, quantised as configured,
    so the adapter's base is a real directory (eval, export, MGT --init) and --resume reloads it exactly.
    Under torchrun rank 0 builds and saves it; the other ranks wait, then load the same files (on several
    nodes the run directory must be on a filesystem every node sees)."""
    if not cfg.random_init:
        return models.load_base_model(cfg, dist.device)

    def build():
        fresh = models.load_base_model(replace(cfg, quantization="none"), dist.device)
        if cfg.instruct_prior_steps:
            loss = instruct_prior(fresh, tokenizer, train_rows, cfg, image_processor)
            print(f"instruct prior: {cfg.instruct_prior_steps} supervised steps on the answer format with random "
                  f"answers (final loss {loss:.3f})")
        return fresh, tokenizer
    run.save_base_model(build, cfg.model)
    saved = run.path / "base_model"
    dist.barrier("rank 0 building the random-init base model")
    dist.agree(None if saved.is_dir() else ConfigError(
        f"{saved}: not visible on this node; a random-init run on several nodes needs output_dir on a "
        "filesystem every node sees"))
    return models.load_base_model(replace(cfg, model=str(saved), random_init=False), dist.device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StopFlag:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: stop at once (KeyboardInterrupt).
    Under torchrun the ranks agree on the flag at every step boundary, so a signal to any rank stops them
    all after the same step; only rank 0 speaks (`announce`)."""

    def __init__(self, announce: bool = True):
        self.requested = False
        self.announce = announce
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(press Ctrl-C again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or, with resume, continue) GRPO for one stage; returns the run directory. Under torchrun every
    rank calls this: one training, data-parallel (distributed.py); rank 0 alone writes the run directory."""
    dist = distributed.init(cfg)  # one process: a world of one; a launch that cannot be right: one line, exit 2
    output_dir = dist.broadcast_object(cfg.output_dir or f"runs/{cfg.stage}-{datetime.now():%Y%m%d-%H%M%S}",
                                       "the start-up")  # one run directory: rank 0's name (its timestamp)
    with ExitStack() as stack:
        def open_run(cfg: TrainConfig) -> tuple[Path | None, TrainConfig, RunDirectory]:
            rewards.check_names(cfg.rewards)
            init_adapter, cfg = (None, cfg) if resume else resolve_init(cfg)
            cfg = with_absolute_paths(replace(cfg, output_dir=output_dir))
            hub.check_model_source(cfg.model, cfg.tokenizer)  # offline with a Hub id: one line now, not retries later
            run = RunDirectory(Path(cfg.output_dir), resume, cfg.overwrite, writes=dist.is_main)
            return init_adapter, cfg, stack.enter_context(run)
        init_adapter, cfg, run = dist.check(open_run, cfg)
        t = _setup(cfg, run, init_adapter, dist)
        if _loop(t):
            _finish(t)
        return run.path


@dataclass
class Training:
    """What the loop carries from setup to finish."""
    cfg: TrainConfig
    dist: Distributed
    run: RunDirectory
    ctx: StepContext  # the policy, tokenizer, optimizer, scheduler and image processor
    train_rows: list
    test_rows: list
    sampler: random.Random  # which prompts each step sees (the same on every rank)
    first_step: int = 1
    eval_before: dict = field(default_factory=dict)
    skipped_steps: int = 0

    def draw(self) -> list:
        """One step's prompts, the same on every rank (dynamic sampling draws again)."""
        return [self.sampler.choice(self.train_rows) for _ in range(self.cfg.prompts_per_step)]

    def save(self, step: int) -> Path | None:
        """Every rank calls this (their RNG states go into the checkpoint); rank 0 writes it and gets its path."""
        rngs = self.dist.gather_object(rank_rng_state(self.sampler), "the checkpoint's RNG gather")
        ctx = self.ctx
        return self.run.save_checkpoint(step, ctx.policy, ctx.optimizer, ctx.scheduler, self.sampler,
                                        {"eval_before": self.eval_before, "skipped_steps": self.skipped_steps},
                                        self.cfg.keep_last, rngs)


# ---- setup: everything is checked before anything in the run directory is written ---------------------
def _setup(cfg: TrainConfig, run: RunDirectory, init_adapter: Path | None, dist: Distributed) -> Training:
    """The checks (resume point, output directory, data, tokenizer), then the first writes, the policy,
    optimizer and schedule, and where the loop starts (`_start_point`)."""
    seed_everything(cfg.seed)
    checkpoint, train_rows, test_rows, report, tokenizer, image_processor = dist.check(_inputs, cfg, run, dist)
    run.begin()  # from here on the run writes (an overwritten run's own files are removed first)
    ctx = _policy(cfg, run, init_adapter, dist, tokenizer, train_rows, image_processor)
    distributed.start_verifier_pool(cfg, dist)  # the answer-checking workers now, not inside step 1
    t = Training(cfg, dist, run, ctx, train_rows, test_rows, random.Random(cfg.seed))
    lora = sum(p.numel() for p in ctx.policy.parameters() if p.requires_grad)
    dist.print_main(
        f"lmmr1-lite: stage {cfg.stage}, model {cfg.model}{' (random init)' if cfg.random_init else ''}, "
        f"{lora:,} LoRA parameters, device {dist.device}, run dir {run.path}"
        + (f", {dist.world_size} ranks ({cfg.prompts_per_step // dist.world_size} prompts each per step)"
           if dist.world_size > 1 else ""))
    dist.print_main(f"data {cfg.data}: {report.line()}; {len(train_rows)} train / {len(test_rows)} held-out prompts")
    if dist.world_size > 1:  # each rank samples its completions from a stream of its own
        seed_everything(distributed.rank_seed(cfg.seed, dist.rank))
    _start_point(t, checkpoint)
    return t


def _inputs(cfg: TrainConfig, run: RunDirectory, dist: Distributed) -> tuple:
    """The checks made before anything is written: the checkpoint to resume (or None), a writable output
    directory, the data (prepared) and its report, the tokenizer and image processor."""
    checkpoint = _pick_checkpoint(cfg, run.path, dist) if run.resume else None
    run.check_space(needed_bytes=0)  # writable at all: fail now, not after loading a model
    train_rows, test_rows, report = load_splits(cfg)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    train_rows, test_rows = (prepare(rows, tokenizer, cfg.system_prompt, cfg.max_prompt_tokens, cfg.min_pixels,
                                     cfg.max_pixels, report, cfg.prompt_template) for rows in (train_rows, test_rows))
    if not train_rows:
        raise ConfigError(f"data {cfg.data}: no usable training rows ({report.line()})")
    image_processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    return checkpoint, train_rows, test_rows, report, tokenizer, image_processor


def _pick_checkpoint(cfg: TrainConfig, run_dir: Path, dist: Distributed) -> dict:
    """The checkpoint to resume: rank 0 picks the newest readable one (a damaged newer one: one line), the
    other ranks read that one. ConfigError when there is none or it is not before max_steps."""
    checkpoint = newest_readable_checkpoint(run_dir, warn=partial(print, file=sys.stderr)) if dist.is_main else None
    path = dist.broadcast_object(None if checkpoint is None else checkpoint["path"], "the start-up")
    if path is None:
        raise ConfigError(f"{run_dir}: no complete, readable checkpoint to resume from")
    if checkpoint is None:
        try:
            checkpoint = read_checkpoint(Path(path))
        except DamagedCheckpoint as err:
            raise ConfigError(str(err)) from None
    if checkpoint["state"]["step"] >= cfg.max_steps:
        raise ConfigError(f"--resume {run_dir}: its checkpoint is at step {checkpoint['state']['step']}; "
                          f"--max-steps (the total) must be above that to continue, got {cfg.max_steps}")
    return checkpoint


def _policy(cfg: TrainConfig, run: RunDirectory, init_adapter: Path | None, dist: Distributed, tokenizer,
            train_rows: list, image_processor) -> StepContext:
    """Base model + LoRA (rank 0's starting adapter on every rank), the disk check sized by the adapter,
    config.yaml and the metrics log, the optimizer and the learning-rate schedule."""
    policy = models.add_lora(run_base_model(cfg, run, tokenizer, train_rows, image_processor, dist), cfg)
    if init_adapter is not None:
        models.load_adapter_weights(policy, init_adapter)
        dist.print_main(f"continuing the adapter {init_adapter}")
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    dist.broadcast_tensors_(lora_params, "the adapter broadcast")  # LoRA's random init drew from each rank's RNG
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
    dist.check(run.check_space, needed_bytes=(cfg.keep_last + 2) * 4 * lora_bytes + 64 * 2**20)
    run.start(cfg)
    if cfg.random_init:  # the adapter's base is the saved random model, not the config directory
        policy.peft_config["default"].base_model_name_or_path = str((run.path / "base_model").resolve())
    optimizer = models.make_optimizer(lora_params, cfg)
    total_updates = cfg.max_steps * cfg.num_iterations
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type,
                              optimizer, math.ceil(cfg.warmup_ratio * total_updates), total_updates)
    return StepContext(policy, tokenizer, cfg, optimizer, scheduler, image_processor, dist=dist)


def _start_point(t: Training, checkpoint: dict | None) -> None:
    """Resume: the checkpoint's weights, optimizer, schedule, RNG states and counters. A new run: step 1, after
    the held-out evaluation before training."""
    cfg, dist, ctx = t.cfg, t.dist, t.ctx
    if checkpoint is None:
        t.eval_before = distributed.evaluate_sharded(ctx.policy, ctx.tokenizer, t.test_rows, cfg, ctx.image_processor,
                                                     dist)
        if t.eval_before:
            dist.print_main(f"eval before: accuracy {t.eval_before['accuracy']:.3f}, "
                            f"format {t.eval_before['format']:.3f}")
        return
    state = apply_checkpoint(checkpoint, ctx.policy, ctx.optimizer, ctx.scheduler, t.sampler, dist.rank,
                             dist.world_size)
    t.first_step, t.eval_before, t.skipped_steps = state["step"] + 1, state["eval_before"], state["skipped_steps"]
    dist.print_main(f"resuming from {checkpoint['path']} at step {t.first_step} of {cfg.max_steps}")
    saved_world = checkpoint_world_size(state)
    if saved_world != dist.world_size:
        if dist.rank > 0:  # rank 0 has its states back; the others start streams of their own
            seed_everything(distributed.rank_seed(cfg.seed, dist.rank, state["step"]))
        dist.print_main(f"the checkpoint was written by {saved_world} process(es), this run has {dist.world_size}: "
                        "training continues with the same prompts per step, but sampling will differ from an "
                        "uninterrupted run (each rank's random stream is its own)")


# ---- the loop ---------------------------------------------------------------------------------------------
def _loop(t: Training) -> bool:
    """Steps first_step..max_steps: draw the prompts (every rank the same ones, each takes its share), one GRPO
    step, its metrics row and completions, the non-finite-streak check, the stop check, the checkpoint.
    True at max_steps; False when a stop signal ended it (after its checkpoint)."""
    cfg, dist, run = t.cfg, t.dist, t.run
    consecutive_skips = 0
    with StopFlag(announce=dist.is_main) as stop, \
            tqdm(range(t.first_step, cfg.max_steps + 1), desc=f"GRPO {cfg.stage}", unit="step", dynamic_ncols=True,
                 initial=t.first_step - 1, total=cfg.max_steps, disable=not dist.is_main) as bar:
        for step in bar:
            metrics, scored = grpo_step(t.ctx, dist.shard(t.draw()), t.draw)
            t.skipped_steps += metrics["skipped"]
            consecutive_skips = consecutive_skips + 1 if metrics["skipped"] else 0
            run.log({"step": step, **metrics, "skipped_steps": t.skipped_steps})
            if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                run.write_completions(dist.gather_object(completion_records(step, scored), "the completions gather"))
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics.get('rewards/accuracy/mean', 0):.2f}",
                            len=f"{metrics['completions/mean_length']:.0f}")
            if consecutive_skips >= cfg.max_consecutive_skips:  # the same on every rank: one global gradient
                distributed.said_by_rank0(dist.rank, TrainingAborted(
                    f"{consecutive_skips} consecutive steps with a non-finite loss or gradient (to step {step}); "
                    f"last good checkpoint: {latest_checkpoint(run.path) or 'none'}. Lower learning_rate or "
                    "max_grad_norm, or check the data"), 1)
            stopping = dist.stop_ranks(stop.requested)
            if stopping:
                bar.close()
                _stop(t, step, stopping)
                return False
            due = cfg.save_every and step % cfg.save_every == 0 or step == cfg.max_steps
            if due and not metrics["skipped"]:  # no checkpoint inside a non-finite streak: the last one stays "good"
                t.save(step)
    return True


def _stop(t: Training, step: int, stopping: list[int]) -> None:
    """A stop signal reached `stopping` (ranks): a checkpoint of this step, then how to resume."""
    path = t.save(step)
    t.dist.barrier("the stop")  # every rank returns once the checkpoint is complete
    t.run.close()
    signalled = "" if 0 in stopping else f" (a stop signal reached rank {', '.join(map(str, stopping))})"
    t.dist.print_main(f"stopped after step {step}{signalled}; checkpoint {path}\n"
                      f"resume with: {t.dist.launcher} train --resume {t.run.path}")


# ---- finish ---------------------------------------------------------------------------------------------
def _finish(t: Training) -> None:
    """The adapter, the held-out evaluation after training, eval.json, the model card and the reward curve."""
    cfg, dist, run, ctx = t.cfg, t.dist, t.run, t.ctx
    run.save_adapter(ctx.policy, ctx.tokenizer)
    eval_after = distributed.evaluate_sharded(ctx.policy, ctx.tokenizer, t.test_rows, cfg, ctx.image_processor, dist)
    plot = run.finish(cfg, t.eval_before, eval_after)
    before = t.eval_before
    if eval_after:
        dist.print_main(f"eval after:  accuracy {eval_after['accuracy']:.3f} (before {before['accuracy']:.3f}; "
                        f"always giving the commonest answer: {eval_after['majority_answer_accuracy']:.3f}), "
                        f"format {eval_after['format']:.3f} (before {before['format']:.3f})")
    dist.print_main(f"adapter: {run.path / 'adapter'}\nreward curve: {plot}\nmetrics: {run.path / 'metrics.jsonl'}")
