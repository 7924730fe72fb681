"""Micro-batches of the log-prob and training passes: how many rows (`micro_rows`: a count, capped by a token
budget), which columns (`micro_batches`, `cut`: each micro-batch up to its own longest completion), and the
back-off when a pass runs out of GPU memory (`halve_on_oom`)."""
from __future__ import annotations

import sys
from dataclasses import replace

import torch

from .config import TrainConfig
from .rollout import Rollout


class TrainingAborted(RuntimeError):
    """The run cannot go on (repeated non-finite steps, out of memory at micro-batch 1); checkpoints are kept."""


def micro_rows(cfg: TrainConfig, batch: Rollout, size: int) -> int:
    """Sequences per micro-batch: `size`, capped by the token budget over the padded sequence length."""
    if cfg.max_tokens_per_micro_batch:
        size = min(size, max(1, cfg.max_tokens_per_micro_batch // batch.input_ids.shape[1]))
    return size


def micro_batches(batch: Rollout, size: int):
    """`(rows, width)` per micro-batch of `size` rows: `width` is the micro-batch's own longest completion, so its
    passes skip the padding that longer completions elsewhere put on the whole batch (about 16 % of a step's
    training tokens at 4 x 8 completions of 130-400 tokens, measured on the real model's rollouts). Exact: a
    completion is a prefix of its row, and under causal attention the cut columns follow every real token."""
    real = batch.completion_mask.bool()
    for start in range(0, real.shape[0], size):
        rows = slice(start, start + size)
        columns = real[rows].any(0).nonzero()
        yield rows, int(columns[-1]) + 1 if len(columns) else 1


def cut(micro: Rollout, width: int) -> Rollout:
    """A micro-batch with its completions cut to `width` columns."""
    return replace(micro, completion_ids=micro.completion_ids[:, :width],
                   completion_mask=micro.completion_mask[:, :width],
                   logprobs=None if micro.logprobs is None else micro.logprobs[:, :width])


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
