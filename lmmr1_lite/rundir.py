"""The run directory: what a run writes there (known by name), a lock while it writes, and the checks
made before anything is written.

Guarantees (docs/resume.md, "Runs that survive"):
- a run writes only the entries named in `RUN_ENTRIES` (plus the marker and the lock), so `--overwrite`
  removes only those, and only after the config, data and model source have been checked;
- a directory that holds a `config.yaml` or `metrics.jsonl` that lmmr1-lite did not write (no marker) is
  never overwritten, with or without `--overwrite`;
- one run at a time: an exclusive `flock` on `.lmmr1-lite.lock` is held while a run writes; a second run
  into the same directory stops with one line;
- a run that stops before writing anything leaves no directory behind that it created;
- every write a run makes there (config, metrics, completions, checkpoints, the adapter, eval.json, the
  plot, a random-init base) is a method of `RunDirectory` marked `@rank0_only`: under torchrun only rank 0
  holds the lock and writes; on the other ranks (`writes=False`) the same calls do nothing, so the loop
  calls them on every rank alike and never asks which rank it is.
"""
from __future__ import annotations

import fcntl
import functools
import json
import os
import re
import shutil
from pathlib import Path

from . import checkpoint, models
from .config import ConfigError
from .evaluate import model_card
from .report import MetricsLog, plot_rewards, write_completions

MARKER = ".lmmr1-lite-run"   # written first: its presence says the run files here are ours
LOCK = ".lmmr1-lite.lock"
# Every entry a run writes in its directory, by name; `--overwrite` removes these and nothing else.
RUN_ENTRIES = re.compile(r"^(config\.yaml|metrics\.jsonl|completions\.jsonl|eval\.json|reward_curve\.png|adapter|"
                         r"base_model(\.tmp)?|checkpoint-\d+(\.tmp)?|tensorboard|wandb|trackio|\.write-test)$")


def holds_run(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "config.yaml").exists()


def is_ours(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def rank0_only(method):
    """A write into the run directory: it runs where this process writes (rank 0, or the one process) and
    nowhere else; on the other ranks the call does nothing and returns None."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        return method(self, *args, **kwargs) if self.writes else None
    return write


class RunDirectory:
    """`with RunDirectory(path, resume, overwrite) as rd:` -> the directory locked for this process.

    On entry: the directory is created if needed, locked, and checked (a run there is refused unless
    resume or overwrite; a foreign `config.yaml` is refused always). Nothing is removed on entry:
    `rd.begin()` removes an overwritten run's entries and writes the marker, and is called once every
    other check (config, data, model source) has passed. On an exception before `begin()`, a directory
    this call created is removed again (only while it holds nothing but the lock).

    `writes=False` (a torchrun rank other than 0): the path and nothing more. The lock, the marker and every
    write are rank 0's; this rank only reads what rank 0 wrote (a random-init base, the checkpoint to resume)."""

    def __init__(self, path: Path, resume: bool = False, overwrite: bool = False, writes: bool = True):
        self.path, self.resume, self.overwrite, self.writes = Path(path), resume, overwrite, writes
        self._created = False
        self._lock_handle = None
        self._lock_created = False
        self.begun = False
        self.metrics = None  # the MetricsLog, from `start`

    @rank0_only
    def _enter(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output_dir {path}: exists and is not a directory")
        if not path.exists():
            try:
                path.mkdir(parents=True)
            except OSError as err:
                raise ConfigError(f"output_dir {path}: cannot create ({err.strerror or err})") from None
            self._created = True
        try:
            self._lock()
            self._check()
        except BaseException:
            self._release(failed=True)
            raise

    def __enter__(self) -> "RunDirectory":
        self._enter()
        return self

    def _lock(self) -> None:
        self._lock_created = not (self.path / LOCK).exists()
        try:
            handle = open(self.path / LOCK, "a+")
        except OSError as err:
            raise ConfigError(f"output_dir {self.path}: not writable ({err.strerror or err})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"output_dir {self.path} is in use by another run ({owner}); wait for it or choose "
                              "another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_handle = handle

    def _check(self) -> None:
        path = self.path
        if self.resume:
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"--resume {path}: no config.yaml there (not a run directory)")
            return
        if not holds_run(path):
            return
        if not is_ours(path):
            raise ConfigError(f"output_dir {path} holds a config.yaml or metrics.jsonl that lmmr1-lite did not write; "
                              "nothing there is touched: choose another --output-dir")
        if not self.overwrite:
            raise ConfigError(f"output_dir {path} already holds a run; resume it with --resume {path}, "
                              "pass --overwrite to replace it, or choose another --output-dir")

    @rank0_only
    def begin(self) -> None:
        """Everything is checked: remove an overwritten run's own entries (never anything else), then mark
        the directory as a run's. Idempotent."""
        if self.begun:
            return
        if not self.resume and self.overwrite and is_ours(self.path):
            for entry in self.path.iterdir():
                if RUN_ENTRIES.match(entry.name):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (self.path / MARKER).write_text(json.dumps({"written_by": "lmmr1-lite"}) + "\n")
        self.begun = True

    def _release(self, failed: bool) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None
        if failed and not self.begun:
            # a run that failed before writing anything leaves nothing behind: not its lock, nor a directory
            # it created (while that holds nothing else)
            if self._lock_created:
                (self.path / LOCK).unlink(missing_ok=True)
            if self._created and not any(self.path.iterdir()):
                self.path.rmdir()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(failed=exc_type is not None)

    # ---- what a run writes (rank 0 only) ----------------------------------------------------------------
    @rank0_only
    def check_space(self, needed_bytes: int) -> None:
        check_output_dir(self.path, needed_bytes)

    @rank0_only
    def save_base_model(self, build, source: str | None) -> None:
        """A random-init base under base_model/: `build()` -> (model, tokenizer), unless a run already saved one."""
        if not (self.path / "base_model").is_dir():
            model, tokenizer = build()
            models.save_base_model(model, tokenizer, self.path / "base_model", source)

    @rank0_only
    def start(self, cfg) -> None:
        """config.yaml, and metrics.jsonl opened (appended to on resume) with the configured trackers."""
        cfg.save(self.path / "config.yaml")
        self.metrics = MetricsLog(self.path, cfg.report_to, cfg.to_dict())

    @rank0_only
    def log(self, row: dict) -> None:
        self.metrics.log(row)

    @rank0_only
    def write_completions(self, parts: list[list[dict]]) -> None:
        """Every rank's `completion_records` (gathered to rank 0, in rank order) appended to completions.jsonl."""
        write_completions(self.path / "completions.jsonl", [record for part in parts for record in part])

    @rank0_only
    def save_checkpoint(self, step: int, policy, optimizer, scheduler, sampler, extra: dict, keep_last: int,
                        rng_by_rank: list[dict]) -> Path:
        return checkpoint.save_checkpoint(self.path, step, policy, optimizer, scheduler, sampler, extra, keep_last,
                                          rng_by_rank)

    @rank0_only
    def save_adapter(self, policy, tokenizer) -> None:
        policy.save_pretrained(self.path / "adapter")
        tokenizer.save_pretrained(self.path / "adapter")

    @rank0_only
    def finish(self, cfg, eval_before: dict, eval_after: dict) -> Path | None:
        """eval.json, the adapter's model card and the reward curve (its path); closes the metrics log."""
        (self.path / "eval.json").write_text(json.dumps({"before": eval_before, "after": eval_after}, indent=2))
        adapter = self.path / "adapter"
        (adapter / "README.md").write_text(model_card(cfg, adapter, merged=False))  # over peft's template
        plot = plot_rewards(self.path / "metrics.jsonl", self.path / "reward_curve.png", terms=list(cfg.rewards),
                            title=f"lmmr1-lite {cfg.stage}: {Path(cfg.model).name} on {cfg.data}")
        self.close()
        return plot

    @rank0_only
    def close(self) -> None:
        """Close the metrics log's trackers (tensorboard, wandb, trackio)."""
        self.metrics.close()


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
