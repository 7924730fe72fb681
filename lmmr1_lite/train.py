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
agree on a stop at every step boundary, and rank 0 alone writes the run directory.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_scheduler

from . import distributed, hub, models, rewards
from .checkpoint import (DamagedCheckpoint, apply_checkpoint, checkpoint_world_size, latest_checkpoint,
                         newest_readable_checkpoint, rank_rng_state, read_checkpoint, save_checkpoint)
from .config import ConfigError, TrainConfig, with_absolute_paths
from .data import load_splits, prepare
from .distributed import Distributed
from .evaluate import model_card
from .report import MetricsLog, completion_records, plot_rewards, write_completions
from .rundir import RankView, RunDirectory, check_output_dir
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


def run_base_model(cfg: TrainConfig, run_dir: Path, tokenizer, train_rows: list, image_processor, device,
                   dist: Distributed | None = None):
    """The run's base model. A random-init base (with its instruct prior, when configured) is first saved
    to <run>/base_model and then loaded from there like a downloaded checkpoint, quantised as configured,
    so the adapter's base is a real directory (eval, export, MGT --init) and --resume reloads it exactly.
    Under torchrun rank 0 builds and saves it; the other ranks wait, then load the same files (on several
    nodes the run directory must be on a filesystem every node sees)."""
    if not cfg.random_init:
        return models.load_base_model(cfg, device)
    saved = run_dir / "base_model"
    if (dist is None or dist.is_main) and not saved.is_dir():
        fresh = models.load_base_model(replace(cfg, quantization="none"), device)
        if cfg.instruct_prior_steps:
            loss = instruct_prior(fresh, tokenizer, train_rows, cfg, image_processor)
            print(f"instruct prior: {cfg.instruct_prior_steps} supervised steps on the answer format with random "
                  f"answers (final loss {loss:.3f})")
        models.save_base_model(fresh, tokenizer, saved, cfg.model)
        del fresh
    if dist is not None:
        dist.barrier("rank 0 building the random-init base model")
        distributed.agree(dist, None if saved.is_dir() else ConfigError(
            f"{saved}: not visible on this node; a random-init run on several nodes needs output_dir on a "
            "filesystem every node sees"))
    return models.load_base_model(replace(cfg, model=str(saved), random_init=False), device)


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
    dist = distributed.init(cfg)  # None for one process; a launch that cannot be right: one line, exit 2
    output_dir = cfg.output_dir or f"runs/{cfg.stage}-{datetime.now():%Y%m%d-%H%M%S}"
    if dist is not None:  # one run directory: rank 0's name (its timestamp)
        output_dir = dist.broadcast_object(output_dir, "the start-up")
    with ExitStack() as stack:
        error = run = init_adapter = None
        try:
            rewards.check_names(cfg.rewards)
            init_adapter, cfg = (None, cfg) if resume else resolve_init(cfg)
            cfg = with_absolute_paths(replace(cfg, output_dir=output_dir))
            hub.check_model_source(cfg.model, cfg.tokenizer)  # offline with a Hub id: one line now, not retries later
            if dist is None or dist.is_main:
                run = stack.enter_context(RunDirectory(Path(cfg.output_dir), resume, cfg.overwrite))
            else:
                run = RankView(Path(cfg.output_dir), resume)
        except ConfigError as err:
            error = err
        distributed.agree(dist, error)
        return _train(cfg, run, init_adapter, dist)


def _pick_checkpoint(cfg: TrainConfig, run_dir: Path, dist: Distributed | None) -> dict:
    """The checkpoint to resume: rank 0 picks the newest readable one (a damaged newer one: one line), the
    other ranks read that one. ConfigError when there is none or it is not before max_steps."""
    main = dist is None or dist.is_main
    checkpoint = newest_readable_checkpoint(run_dir, warn=lambda line: print(line, file=sys.stderr)) if main else None
    path = None if checkpoint is None else checkpoint["path"]
    if dist is not None:
        path = dist.broadcast_object(path, "the start-up")
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


def _train(cfg: TrainConfig, run, init_adapter: Path | None, dist: Distributed | None) -> Path:
    # ---- setup: everything is checked before anything in the run directory is written ------------
    run_dir = run.path
    main = dist is None or dist.is_main  # rank 0 (or the one process): the only writer
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    seed_everything(cfg.seed)
    checkpoint, error = None, None
    try:
        if run.resume:
            checkpoint = _pick_checkpoint(cfg, run_dir, dist)
        if main:
            check_output_dir(run_dir, needed_bytes=0)  # writable at all: fail now, not after loading a model
        device = dist.device if dist is not None else models.pick_device()
        train_rows, test_rows, data_report = load_splits(cfg)
        tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
        train_rows, test_rows = (prepare(rows, tokenizer, cfg.system_prompt, cfg.max_prompt_tokens, cfg.min_pixels,
                                         cfg.max_pixels, data_report, cfg.prompt_template)
                                 for rows in (train_rows, test_rows))
        if not train_rows:
            raise ConfigError(f"data {cfg.data}: no usable training rows ({data_report.line()})")
        image_processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    except ConfigError as err:
        error = err
    distributed.agree(dist, error)
    run.begin()  # from here on the run writes (an overwritten run's own files are removed first)
    policy = models.add_lora(run_base_model(cfg, run_dir, tokenizer, train_rows, image_processor, device, dist), cfg)
    if init_adapter is not None:
        models.load_adapter_weights(policy, init_adapter)
        distributed.print_main(dist, f"continuing the adapter {init_adapter}")
    lora_params = [p for p in policy.parameters() if p.requires_grad]
    if dist is not None:  # one starting adapter on every rank (LoRA's random init drew from each rank's RNG)
        dist.broadcast_tensors_(lora_params, "the adapter broadcast")
    lora_bytes = sum(p.numel() * p.element_size() for p in lora_params)
    error = None
    if main:
        try:
            check_output_dir(run_dir, needed_bytes=(cfg.keep_last + 2) * 4 * lora_bytes + 64 * 2**20)
        except ConfigError as err:
            error = err
    distributed.agree(dist, error)
    if main:
        cfg.save(run_dir / "config.yaml")
    if cfg.random_init:  # the adapter's base is the saved random model, not the config directory
        policy.peft_config["default"].base_model_name_or_path = str((run_dir / "base_model").resolve())
    optimizer = models.make_optimizer(lora_params, cfg)
    total_updates = cfg.max_steps * cfg.num_iterations
    scheduler = get_scheduler("constant_with_warmup" if cfg.lr_scheduler_type == "constant" else cfg.lr_scheduler_type,
                              optimizer, math.ceil(cfg.warmup_ratio * total_updates), total_updates)
    ctx = StepContext(policy, tokenizer, cfg, optimizer, scheduler, image_processor,
                      dist=dist)
    distributed.start_verifier_pool(cfg, dist)  # the answer-checking workers now, not inside step 1
    log = MetricsLog(run_dir, cfg.report_to, cfg.to_dict()) if main else None
    sampler = random.Random(cfg.seed)  # which prompts each step sees (the same on every rank)

    def draw() -> list:
        """One step's prompts (dynamic sampling draws again)."""
        return [sampler.choice(train_rows) for _ in range(cfg.prompts_per_step)]
    distributed.print_main(
        dist, f"lmmr1-lite: stage {cfg.stage}, model {cfg.model}{' (random init)' if cfg.random_init else ''}, "
        f"{sum(p.numel() for p in lora_params):,} LoRA parameters, device {device}, run dir {run_dir}"
        + (f", {world} ranks ({cfg.prompts_per_step // world} prompts each per step)" if dist is not None else ""))
    distributed.print_main(dist, f"data {cfg.data}: {data_report.line()}; {len(train_rows)} train / "
                                 f"{len(test_rows)} held-out prompts")
    if dist is not None:  # each rank samples its completions from a stream of its own
        seed_everything(distributed.rank_seed(cfg.seed, rank))

    if checkpoint is not None:
        state = apply_checkpoint(checkpoint, policy, optimizer, scheduler, sampler, rank, world)
        first_step, eval_before, skipped_steps = state["step"] + 1, state["eval_before"], state["skipped_steps"]
        distributed.print_main(dist, f"resuming from {checkpoint['path']} at step {first_step} of {cfg.max_steps}")
        saved_world = checkpoint_world_size(state)
        if saved_world != world:
            if rank > 0:
                seed_everything(distributed.rank_seed(cfg.seed, rank, state["step"]))
            distributed.print_main(
                dist, f"the checkpoint was written by {saved_world} process(es), this run has {world}: training "
                "continues with the same prompts per step, but sampling will differ from an uninterrupted run "
                "(each rank's random stream is its own)")
    else:
        first_step, skipped_steps = 1, 0
        eval_before = distributed.evaluate_sharded(policy, tokenizer, test_rows, cfg, image_processor, dist)
        if eval_before:
            distributed.print_main(dist, f"eval before: accuracy {eval_before['accuracy']:.3f}, "
                                         f"format {eval_before['format']:.3f}")
    consecutive_skips = 0

    def save(step: int) -> Path | None:
        """Every rank calls this (their RNG states go into rank 0's checkpoint); rank 0 writes."""
        rngs = dist.gather_object(rank_rng_state(sampler), "the checkpoint's RNG gather") if dist is not None else None
        if not main:
            return None
        return save_checkpoint(run_dir, step, policy, optimizer, scheduler, sampler,
                               {"eval_before": eval_before, "skipped_steps": skipped_steps}, cfg.keep_last, rngs)

    # ---- the loop ------------------------------------------------------------------------------
    bar = tqdm(range(first_step, cfg.max_steps + 1), desc=f"GRPO {cfg.stage}", unit="step", dynamic_ncols=True,
               initial=first_step - 1, total=cfg.max_steps, disable=not main)
    with StopFlag(announce=main) as stop:
        for step in bar:
            examples = draw()
            metrics, scored = grpo_step(ctx, examples if dist is None else dist.shard(examples), draw)
            skipped_steps += metrics["skipped"]
            consecutive_skips = consecutive_skips + 1 if metrics["skipped"] else 0
            if main:
                log.log({"step": step, **metrics, "skipped_steps": skipped_steps})
            if cfg.log_completions_every and step % cfg.log_completions_every == 0:
                records = completion_records(step, scored)
                if dist is not None:
                    gathered = dist.gather_object(records, "the completions gather")
                    records = [r for part in gathered for r in part] if main else None
                if main:
                    write_completions(run_dir / "completions.jsonl", records)
            bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics.get('rewards/accuracy/mean', 0):.2f}",
                            len=f"{metrics['completions/mean_length']:.0f}")
            if consecutive_skips >= cfg.max_consecutive_skips:  # the same on every rank: one global gradient
                last = latest_checkpoint(run_dir)
                if not main:
                    raise SystemExit(1)  # rank 0 says why
                raise TrainingAborted(f"{consecutive_skips} consecutive steps with a non-finite loss or gradient "
                                      f"(to step {step}); last good checkpoint: {last or 'none'}. Lower learning_rate "
                                      "or max_grad_norm, or check the data")
            stopping = dist.stop_ranks(stop.requested) if dist is not None else ([0] if stop.requested else [])
            if stopping:
                path = save(step)
                if dist is not None:
                    dist.barrier("the stop")  # every rank returns once the checkpoint is complete
                bar.close()
                if main:
                    log.close()
                    signalled = "" if dist is None or 0 in stopping else \
                        f" (a stop signal reached rank {', '.join(map(str, stopping))})"
                    print(f"stopped after step {step}{signalled}; checkpoint {path}\n"
                          f"resume with: {resume_command(run_dir, dist)}")
                return run_dir
            due = cfg.save_every and step % cfg.save_every == 0 or step == cfg.max_steps
            if due and not metrics["skipped"]:  # no checkpoint inside a non-finite streak: the last one stays "good"
                save(step)
    bar.close()

    # ---- finish ----------------------------------------------------------------------------------
    adapter_dir = run_dir / "adapter"
    if main:
        policy.save_pretrained(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
    eval_after = distributed.evaluate_sharded(policy, tokenizer, test_rows, cfg, image_processor, dist)
    if not main:
        return run_dir
    (run_dir / "eval.json").write_text(json.dumps({"before": eval_before, "after": eval_after}, indent=2))
    (adapter_dir / "README.md").write_text(model_card(cfg, adapter_dir, merged=False))  # over peft's template
    plot = plot_rewards(run_dir / "metrics.jsonl", run_dir / "reward_curve.png",
                        title=f"lmmr1-lite {cfg.stage}: {Path(cfg.model).name} on {cfg.data}", terms=list(cfg.rewards))
    log.close()
    if eval_after:
        print(f"eval after:  accuracy {eval_after['accuracy']:.3f} (before {eval_before['accuracy']:.3f}; "
              f"always giving the commonest answer: {eval_after['majority_answer_accuracy']:.3f}), "
              f"format {eval_after['format']:.3f} (before {eval_before['format']:.3f})")
    print(f"adapter: {adapter_dir}\nreward curve: {plot}\nmetrics: {run_dir / 'metrics.jsonl'}", file=sys.stdout)
    return run_dir


def resume_command(run_dir: Path, dist: Distributed | None) -> str:
    if dist is None:
        return f"lmmr1-lite train --resume {run_dir}"
    nodes = dist.world_size // dist.local_world_size
    launch = (f"torchrun --nnodes {nodes} --nproc-per-node {dist.local_world_size} --rdzv-backend c10d "
              "--rdzv-endpoint HOST:PORT" if nodes > 1 else f"torchrun --standalone --nproc-per-node {dist.world_size}")
    return f"{launch} $(which lmmr1-lite) train --resume {run_dir}"
