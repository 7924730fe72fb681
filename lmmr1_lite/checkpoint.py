"""Atomic checkpoints and exact resume.

A checkpoint `checkpoint-<step>/` holds the LoRA adapter (safetensors, PEFT format), the optimizer
and scheduler state (`trainer.pt`, tensors and numbers only: read back with `weights_only=True`),
and `trainer_state.json`: the step, every RNG state (python, numpy, torch CPU and CUDA, the prompt
sampler's) and the eval before training. It is written into `checkpoint-<step>.tmp/` and renamed
into place, and `trainer_state.json` is written last, so a kill at any instant leaves the previous
checkpoint complete and loadable. (GRPO here keeps no running reward statistics: advantages are
normalised within each group, so there is no normaliser state to save.)

Under torchrun rank 0 writes the checkpoint, which then also holds `world_size` and `rng_by_rank`: every
rank's RNG states (python, numpy, torch, CUDA, the prompt sampler's), gathered to rank 0, keyed by rank.
Resumed at the same world size, each rank gets its own back (bit-exact on CPU); at another world size
rank 0's states are restored, the prompt order continues, and the other ranks' sampling streams are new.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

STATE_FILE = "trainer_state.json"
TENSOR_FILE = "trainer.pt"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def rng_state(sampler: random.Random) -> dict:
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "sampler": _jsonable(sampler.getstate()),
    }
    return state


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def rank_rng_state(sampler: random.Random) -> dict:
    """One rank's every RNG state, JSON-able (the torch and CUDA generator states as byte lists)."""
    state = rng_state(sampler)
    state["torch"] = torch.get_rng_state().tolist()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rank_rng(state: dict, sampler: random.Random) -> None:
    restore_rng(state, sampler)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def restore_rng(state: dict, sampler: random.Random) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    sampler.setstate(_tuples(state["sampler"]))


def save_checkpoint(run_dir: Path, step: int, policy, optimizer, scheduler, sampler: random.Random,
                    extra: dict, keep_last: int, rng_by_rank: list[dict] | None = None) -> Path:
    """Write checkpoint-<step> atomically, then delete all but the newest `keep_last` complete ones.
    `rng_by_rank`: every rank's `rank_rng_state`, in rank order; kept only for several ranks (one process's
    states are `rng` and the tensors')."""
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
    tensors = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    torch.save(tensors, tmp / TENSOR_FILE)
    state = {"step": step, "rng": rng_state(sampler), **extra, "world_size": len(rng_by_rank or [None])}
    if rng_by_rank and len(rng_by_rank) > 1:
        state["rng_by_rank"] = {str(rank): rng for rank, rng in enumerate(rng_by_rank)}
    with open(tmp / STATE_FILE, "w") as handle:  # written last: its presence marks a complete checkpoint
        json.dump(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` or a folder without its state file does not count)."""
    found = []
    for path in run_dir.iterdir() if run_dir.is_dir() else []:
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file() and (path / TENSOR_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files cannot be read back (truncated, corrupted, or not ours)."""


def read_checkpoint(path: Path) -> dict:
    """Every file of a checkpoint read into memory, nothing applied yet: `{"state", "adapter", "tensors"}`.
    Raises DamagedCheckpoint with the file and what is wrong with it."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or "rng" not in state:
            raise ValueError("missing step or rng")
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{path / STATE_FILE}: unreadable ({type(err).__name__}: {str(err)[:80]})") from None
    try:
        adapter = load_file(path / "adapter_model.safetensors", device="cpu")
    except (OSError, SafetensorError, ValueError) as err:
        raise DamagedCheckpoint(f"{path / 'adapter_model.safetensors'}: unreadable ({str(err).splitlines()[0][:80]})") from None
    try:
        tensors = torch.load(path / TENSOR_FILE, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        reason = ("holds Python objects other than tensors and numbers; not loaded (weights_only)"
                  if "weights_only" in str(err).lower() or "unsupported global" in str(err).lower()
                  else f"truncated or corrupted ({str(err).splitlines()[0][:80]})")
        raise DamagedCheckpoint(f"{path / TENSOR_FILE}: {reason}") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise DamagedCheckpoint(f"{path / TENSOR_FILE}: truncated or corrupted "
                                f"({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''})") from None
    if not isinstance(tensors, dict) or not {"optimizer", "scheduler", "torch_rng"} <= set(tensors):
        raise DamagedCheckpoint(f"{path / TENSOR_FILE}: not an lmmr1-lite trainer state")
    return {"path": path, "state": state, "adapter": adapter, "tensors": tensors}


def newest_readable_checkpoint(run_dir: Path, warn=print) -> dict | None:
    """The newest complete checkpoint whose files all read back; a damaged newer one is skipped with one
    line saying so (it is left on disk for inspection). None when there is none."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            return read_checkpoint(path)
        except DamagedCheckpoint as err:
            warn(f"checkpoint {path.name} is damaged ({err}); falling back to the previous complete checkpoint")
    return None


def apply_checkpoint(loaded: dict, policy, optimizer, scheduler, sampler: random.Random, rank: int = 0,
                     world_size: int = 1) -> dict:
    """Restore adapter weights, optimizer, scheduler and every RNG from `read_checkpoint`'s result;
    returns the trainer state. Under torchrun each rank restores its own RNG states when the checkpoint
    was written at this world size; otherwise rank 0's (the caller reseeds the other ranks' streams)."""
    from peft.utils import set_peft_model_state_dict

    tensors = loaded["tensors"]
    set_peft_model_state_dict(policy, {k: v.to(policy.device) for k, v in loaded["adapter"].items()})
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    restore_rng(loaded["state"]["rng"], sampler)
    by_rank = loaded["state"].get("rng_by_rank") or {}
    if world_size > 1 and checkpoint_world_size(loaded["state"]) == world_size and str(rank) in by_rank:
        restore_rank_rng(by_rank[str(rank)], sampler)
    return loaded["state"]


def checkpoint_world_size(state: dict) -> int:
    """The number of processes that wrote a checkpoint (1 for a checkpoint from before torchrun support)."""
    return int(state.get("world_size", 1))


def load_checkpoint(path: Path, policy, optimizer, scheduler, sampler: random.Random) -> dict:
    """Read and apply one checkpoint (ConfigError, one line, when it is damaged)."""
    try:
        return apply_checkpoint(read_checkpoint(path), policy, optimizer, scheduler, sampler)
    except DamagedCheckpoint as err:
        raise ConfigError(str(err)) from None
