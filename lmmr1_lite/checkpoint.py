"""Atomic checkpoints and exact resume.

A checkpoint `checkpoint-<step>/` holds the LoRA adapter (safetensors, PEFT format), the optimizer
and scheduler state (`trainer.pt`, tensors and numbers only: read back with `weights_only=True`),
and `trainer_state.json`: the step, every RNG state (python, numpy, torch CPU and CUDA, the prompt
sampler's) and the eval before training. It is written into `checkpoint-<step>.tmp/` and renamed
into place, and `trainer_state.json` is written last, so a kill at any instant leaves the previous
checkpoint complete and loadable. (GRPO here keeps no running reward statistics: advantages are
normalised within each group, so there is no normaliser state to save.)
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


def restore_rng(state: dict, sampler: random.Random) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    sampler.setstate(_tuples(state["sampler"]))


def save_checkpoint(run_dir: Path, step: int, policy, optimizer, scheduler, sampler: random.Random,
                    extra: dict, keep_last: int) -> Path:
    """Write checkpoint-<step> atomically, then delete all but the newest `keep_last` complete ones."""
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
    state = {"step": step, "rng": rng_state(sampler), **extra}
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


def load_checkpoint(path: Path, policy, optimizer, scheduler, sampler: random.Random) -> dict:
    """Restore adapter weights, optimizer, scheduler and every RNG; returns the trainer state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    adapter = load_file(path / "adapter_model.safetensors", device=str(policy.device))
    set_peft_model_state_dict(policy, adapter)
    try:
        tensors = torch.load(path / TENSOR_FILE, weights_only=True, map_location="cpu")
    except Exception as err:  # a crafted pickle is refused, not executed
        raise ConfigError(f"{path / TENSOR_FILE}: refused to load ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120]})") from None
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    restore_rng(state["rng"], sampler)
    return state


def check_output_dir(run_dir: Path, needed_bytes: int) -> None:
    """Fail before training, not after hours: the directory must be writable with room for checkpoints."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir {run_dir}: not writable ({err.strerror or err})") from None
    free = shutil.disk_usage(run_dir).free
    if free < needed_bytes:
        raise ConfigError(f"output_dir {run_dir}: {free / 2**20:.0f} MiB free, a run needs about "
                          f"{needed_bytes / 2**20:.0f} MiB for its checkpoints; free space or choose another --output-dir")
