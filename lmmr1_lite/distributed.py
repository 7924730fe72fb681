"""Data-parallel GRPO under `torchrun`: one training run over several processes (one per GPU), one node or many.

What each rank holds: its own copy of the (4-bit) base model and of the LoRA adapter, its own optimizer
(identical on every rank, since every rank applies the same averaged update), its own verifier pool.
What the ranks share:
- the step's prompts: every rank draws the same B prompts from the shared seed (the loop's `sampler`) and
  takes its contiguous slice of B / world_size; a prompt's G completions never leave their rank, so the
  group advantages are computed where the group is;
- the update: the loss aggregation's denominator (tokens for `token_mean`, sequences for the sequence
  means, sequences x padded length for `seq_mean_token_sum_norm`) is the global one (`batch_totals`,
  one all-gather of three counts per update), so each rank's local loss is its share of the single
  process's loss on the same rollouts, and the global gradient is the SUM of the local ones;
- the gradient: after a rank's micro-batches, ONE all-reduce (sum) of a flat fp32 buffer that holds every
  LoRA gradient and the loss metrics (`all_reduce_gradients`). Not `DistributedDataParallel`: DDP's
  point is overlapping the all-reduce with backward, which buys little for a LoRA gradient of a few MB
  against a step dominated by generation, while DDP would sit between the loop and the PEFT model
  (`disable_adapter()` for the reference pass, `generate`, `save_pretrained`, gradient checkpointing)
  and all-reduce inside every backward, so every rank would need the same number of micro-batches —
  which the token budget and the out-of-memory back-off, both per rank, do not give. One all-reduce after
  accumulation is exact whatever each rank's micro-batching, and costs one collective per update;
- so gradient clipping, the non-finite check and the optimizer step see the same global gradient on
  every rank, and the adapters stay identical (they start identical: rank 0's LoRA weights are
  broadcast once after the adapter is built).

One process is a world of size one (`OneProcess`: rank 0, whose collectives return their input and whose
barrier does nothing), so the training loop runs the same code for one process and for many.

Rank 0 alone writes the run directory (config, metrics, completions, plots, checkpoints, adapter,
eval.json: `rundir.RunDirectory`, whose writes run on rank 0 only) and holds its lock; the others only read it (a random-init base that rank 0 saved there, the
checkpoint rank 0 chose on --resume). A checkpoint holds every rank's RNG state (`trainer_state.json`,
`rng_by_rank`), so a stop and `--resume` at the same world size continue bit-exactly on CPU.

Failure: every collective has the process group's timeout (`dist_timeout` seconds, default 600) and
a collective that fails (a peer died, the timeout passed) ends this rank with one line
(`RanksLost`, exit 1), never a hang. A launch that cannot be right is refused before any process group
exists, with one line and exit 2 (`init`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from .config import ConfigError
from .step import TrainingAborted

REQUIRED_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


class RanksLost(TrainingAborted):
    """A collective failed: another rank died or stopped, or the collective timed out."""


@dataclass
class Distributed:
    """This process's place in a torchrun world, and the collectives over it (one process: `OneProcess`)."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- the work split ---------------------------------------------------------------------------
    def bounds(self, count: int) -> tuple[int, int]:
        """This rank's contiguous [start, stop) of `count` items (the first `count % world` ranks get one more)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: list) -> list:
        start, stop = self.bounds(len(items))
        return items[start:stop]

    # ---- collectives (each failure is one line) ---------------------------------------------------
    def _run(self, what: str, fn, *args, **kwargs):
        import torch.distributed as dist
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, EOFError, ConnectionError) as err:  # DistBackendError etc. are RuntimeErrors
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            first = first[:first.index(". ") + 1] if ". " in first[:200] else first[:200]
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the group is already broken
                pass
            raise RanksLost(f"rank {self.rank}: lost the other ranks during {what} ({first}); another rank stopped or "
                            "died (its own output says why) or a collective passed dist_timeout; the newest "
                            "complete checkpoint is intact") from None

    def barrier(self, what: str = "a barrier") -> None:
        import torch.distributed as dist
        self._run(what, dist.barrier)

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        import torch.distributed as dist
        self._run(what, dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_tensor(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """`[world, *tensor.shape]`: every rank's tensor, in rank order."""
        import torch.distributed as dist
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._run(what, dist.all_gather, out, tensor.contiguous())
        return torch.stack(out)

    def all_gather_object(self, obj, what: str) -> list:
        import torch.distributed as dist
        out = [None] * self.world_size
        self._run(what, dist.all_gather_object, out, obj)
        return out

    def gather_object(self, obj, what: str) -> list | None:
        """Every rank's `obj` on rank 0 (in rank order); None on the others."""
        import torch.distributed as dist
        out = [None] * self.world_size if self.is_main else None
        self._run(what, dist.gather_object, obj, out, dst=0)
        return out

    def broadcast_object(self, obj, what: str):
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        self._run(what, dist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_tensors_(self, tensors: list[torch.Tensor], what: str) -> None:
        """Rank 0's values into `tensors` on every rank (one flat broadcast)."""
        import torch.distributed as dist
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        self._run(what, dist.broadcast, flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()

    def stop_ranks(self, requested: bool) -> list[int]:
        """The ranks where a stop was requested (SIGINT/SIGTERM), agreed at a step boundary: empty or not on
        every rank alike."""
        flags = self.all_gather_tensor(torch.tensor([int(requested)], device=self.device), "the stop-flag exchange")
        return [rank for rank, flag in enumerate(flags.view(-1).tolist()) if flag]

    def all_reduce_gradients(self, params: list, extra: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum every parameter's `.grad` and the `extra` scalars over the ranks in ONE all-reduce of a flat fp32
        buffer; the summed gradients go back into `.grad` (same dtype), the summed extras are returned.
        Parameters without a gradient are left out (the same ones on every rank: one model, one graph)."""
        with_grad = [p for p in params if p.grad is not None]
        device = with_grad[0].grad.device if with_grad else self.device
        flat = torch.cat([p.grad.detach().reshape(-1).float() for p in with_grad]
                         + [e.detach().reshape(-1).float().to(device) for e in extra])
        self.all_reduce_sum_(flat, "the gradient all-reduce")
        offset = 0
        for p in with_grad:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad).to(p.grad.dtype))
            offset += p.numel()
        return [flat[offset + i] for i in range(len(extra))]

    @property
    def launcher(self) -> str:
        """The command that starts this world again (for `--resume`)."""
        nodes = self.world_size // self.local_world_size
        if nodes > 1:
            return (f"torchrun --nnodes {nodes} --nproc-per-node {self.local_world_size} --rdzv-backend c10d "
                    "--rdzv-endpoint HOST:PORT $(which lmmr1-lite)")
        return f"torchrun --standalone --nproc-per-node {self.world_size} $(which lmmr1-lite)"

    def print_main(self, *args, **kwargs) -> None:
        """`print` on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def agree(self, error: Exception | None) -> None:
        """A check made on every rank (or on rank 0 only): when any rank failed it, every rank stops. The
        lowest failing rank raises its error (the one line the user sees, exit 2), the others exit 2
        without a word."""
        failed = self.all_gather_object(None if error is None else str(error), "the start-up checks")
        first = next((rank for rank, message in enumerate(failed) if message is not None), None)
        if first is None:
            return
        if first == self.rank:
            raise error if self.rank == 0 else ConfigError(f"rank {self.rank}: {error}")
        raise SystemExit(2)

    def check(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, a check made on every rank (or, through a rank-0-only call, on rank 0 alone):
        its ConfigError is agreed over the ranks (`agree`); returns what `fn` returns."""
        error = result = None
        try:
            result = fn(*args, **kwargs)
        except ConfigError as err:
            error = err
        self.agree(error)
        return result


def said_by_rank0(rank: int, error: Exception, code: int):
    """An error every rank meets alike: rank 0 raises it (the one line the user sees), the others exit `code`
    without a word."""
    if rank == 0:
        raise error
    raise SystemExit(code)


class OneProcess(Distributed):
    """One process, as a world of size one: rank 0 of 1, every collective returns its input (a gather: the
    list of that one input), the barrier does nothing. The training loop takes this or a torchrun
    `Distributed` alike, so it never asks whether it runs alone."""

    def __init__(self, device: torch.device | None = None):
        super().__init__(rank=0, world_size=1, local_rank=0, local_world_size=1,
                         device=device if device is not None else torch.device("cpu"), backend="none")

    @property
    def launcher(self) -> str:
        return "lmmr1-lite"

    def barrier(self, what: str = "a barrier") -> None:
        pass

    def all_reduce_sum_(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return tensor

    def all_gather_tensor(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def all_gather_object(self, obj, what: str) -> list:
        return [obj]

    def gather_object(self, obj, what: str) -> list:
        return [obj]

    def broadcast_object(self, obj, what: str):
        return obj

    def broadcast_tensors_(self, tensors: list[torch.Tensor], what: str) -> None:
        pass


# ---- launch ---------------------------------------------------------------------------------------
def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer; launch with torchrun") from None


def world_size_from_env() -> int:
    return _env_int("WORLD_SIZE", 1) or 1


_CURRENT: Distributed | None = None


def init(cfg) -> Distributed:
    """`OneProcess` for one process (no torchrun, WORLD_SIZE unset or 1). Under torchrun: the process group (NCCL on
    CUDA, one GPU per local rank; gloo on CPU), started once per process (a pipeline's two stages share it).

    Refused with one line (ConfigError, exit 2) before anything starts: WORLD_SIZE > 1 without the rest of a
    torchrun environment (RANK, MASTER_ADDR, MASTER_PORT), ranks out of range, more local ranks than GPUs,
    a backend this machine lacks, `prompts_per_step` not divisible by the world size, or `filter_groups`. A refusal every
    rank would make alike is printed by rank 0 only; the others exit 2 silently."""
    global _CURRENT
    world = world_size_from_env()
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world}: must be >= 1")
    if world == 1:
        from .models import pick_device
        return OneProcess(pick_device())
    missing = [name for name in REQUIRED_ENV if not os.environ.get(name, "").strip()]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch several processes with "
                          "torchrun (`torchrun --nproc-per-node N $(which lmmr1-lite) train ...`), or unset WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world} do not fit "
                          f"WORLD_SIZE={world}; launch with torchrun")

    def refuse(message: str):  # the same on every rank: rank 0 says it
        said_by_rank0(rank, ConfigError(message), 2)

    if cfg.prompts_per_step % world:
        refuse(f"prompts_per_step={cfg.prompts_per_step} is not divisible by the world size {world}: every rank "
               f"takes the same number of prompts (their G completions stay on it); use a multiple of {world}")
    if cfg.filter_groups:
        refuse("filter_groups (dynamic sampling) runs in one process only for now: the ranks would have to agree "
               "on every extra draw; launch without torchrun or set filter_groups=false")
    import torch.distributed as dist
    if not dist.is_available():
        refuse(f"WORLD_SIZE={world} but this torch build has no torch.distributed; launch one process")
    backend = cfg.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            refuse("dist_backend nccl needs CUDA and an NCCL-enabled torch; use gloo (CPU)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank}: LOCAL_RANK={local_rank} but {torch.cuda.device_count()} GPU(s) visible: "
                              "--nproc-per-node must be at most the GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        if not dist.is_gloo_available():
            refuse("this torch build has no gloo backend; launch one process or use nccl on GPUs")
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if _CURRENT is not None and dist.is_initialized():
        if _CURRENT.world_size != world:
            raise ConfigError(f"the process group has {_CURRENT.world_size} ranks, WORLD_SIZE says {world}")
        return _CURRENT
    timeout = cfg.dist_timeout
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout),
                                **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as err:  # the rendezvous failed (unreachable MASTER_ADDR, timeout)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"rank {rank}: cannot join the process group at {os.environ['MASTER_ADDR']}:"
                          f"{os.environ['MASTER_PORT']} ({first})") from None
    _CURRENT = Distributed(rank, world, local_rank, local_world, device, backend)
    import atexit
    atexit.register(shutdown)
    return _CURRENT


def shutdown() -> None:
    """Destroy the process group (at exit; a pipeline's stages share one)."""
    global _CURRENT
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - at exit, a broken group needs no cleanup
            pass
    _CURRENT = None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of a rank's own random streams (sampling noise), distinct per rank and per resume point."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**32


# ---- per-rank resources ---------------------------------------------------------------------------
def verifier_workers(configured: int, dist: Distributed) -> int | None:
    """Answer-checking workers for this process: `reward_workers` when set; under torchrun the cores this
    process may use divided by the ranks on this node; one process: None (the pool's default, one per core,
    at most 8)."""
    if configured:
        return configured
    if dist.world_size == 1:
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // dist.local_world_size)


def start_verifier_pool(cfg, dist: Distributed) -> None:
    """Start the answer-checking workers now (not inside step 1), sized per rank under torchrun."""
    from . import verifier
    verifier.pool(cfg.reward_timeout, workers=verifier_workers(cfg.reward_workers, dist))


# ---- evaluation -----------------------------------------------------------------------------------
def evaluate_sharded(policy, tokenizer, examples: list, cfg, image_processor, dist: Distributed) -> dict:
    """`evaluate_model` on this rank's contiguous slice of `examples`, merged over the ranks (every rank gets the
    result): counts summed, rates weighted by each slice's size, the commonest-answer bar recomputed on all
    examples, the first samples in the original order. One process: `evaluate_model` of all `examples`."""
    from .evaluate import evaluate_model
    local = evaluate_model(policy, tokenizer, dist.shard(examples), cfg, image_processor=image_processor)
    return merge_evals(dist.all_gather_object(local, "the evaluation"), examples)


def merge_evals(parts: list[dict], examples: list) -> dict:
    """One evaluation from the ranks' parts; a single part is the whole evaluation and is returned as it is."""
    parts = [p for p in parts if p]
    if not parts or not examples:
        return {}
    if len(parts) == 1:
        return parts[0]
    total = sum(p["n"] for p in parts)
    merged: dict = {}
    for key, value in parts[0].items():
        if key == "n":
            merged[key] = total
        elif key == "majority_answer_accuracy":
            answers = [e.answer for e in examples]
            merged[key] = max(answers.count(a) for a in set(answers)) / len(answers)
        elif key == "samples":
            merged[key] = [s for p in parts for s in p.get("samples", [])][:8]  # evaluate_model keeps the first 8
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = sum(p[key] * p["n"] for p in parts if key in p) / total
        else:
            merged[key] = value
    return merged

