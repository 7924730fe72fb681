"""Data parallelism under torchrun (CPU, gloo): the update equals the one-process update, a 2-rank run writes
one run directory and resumes bit-exactly, a launch that cannot be right is one line, a dead rank ends the
run. Each torchrun launch of the tiny model costs 10-30 s here."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmmr1_lite import distributed, models
from lmmr1_lite.checkpoint import complete_checkpoints, latest_checkpoint
from lmmr1_lite.cli import main
from lmmr1_lite.config import ConfigError, resolve_config
from lmmr1_lite.distributed import Distributed, OneProcess, merge_evals
from lmmr1_lite.step import TIMING_METRICS, StepContext, merge_rows

TIMING = set(TIMING_METRICS)
SMALL = ["--eval-size", "4", "--prompts-per-step", "4", "--num-generations", "4", "--set", "beta=0.02",
         "--log-completions-every", "2"]
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# (loss_agg, importance_sampling_level): every aggregation, and GSPO. GSPO's sequence ratio sums over one
# completion's tokens, and a rank holds whole completions (rows), so each rank's sums are the one-process
# sums; the aggregation weights use the whole batch's counts, so the ranks' gradients add up exactly.
CASES = [(agg, "token") for agg in LOSS_AGGS] + [("seq_mean_token_mean", "sequence")]
linux_only = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """`torchrun --standalone --nproc-per-node N -m lmmr1_lite.cli ARGS` (c10d rendezvous on a free port)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(nproc), "-m", "lmmr1_lite.cli"] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def wait_rows(proc: subprocess.Popen, path: Path, rows: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= rows):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no metrics rows in time"
        time.sleep(0.02)


# ---- launches that cannot be right ---------------------------------------------------------------
def one_line(err: str, expected: str) -> None:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err and expected in lines[0], err


def test_a_launch_that_cannot_be_right_is_one_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--output-dir", str(run)]) == 2
    one_line(capsys.readouterr().err, "RANK, MASTER_ADDR, MASTER_PORT not set")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main(["train", "--output-dir", str(run), "--prompts-per-step", "3"]) == 2
    one_line(capsys.readouterr().err, "prompts_per_step=3 is not divisible by the world size 2")
    assert main(["train", "--output-dir", str(run), "--set", "filter_groups=true"]) == 2
    one_line(capsys.readouterr().err, "filter_groups (dynamic sampling) runs in one process only")
    monkeypatch.setenv("RANK", "1")  # the same refusal on another rank: rank 0 alone says it
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--output-dir", str(run), "--prompts-per-step", "3"])
    assert exit_.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "2")
    assert main(["train", "--output-dir", str(run)]) == 2
    one_line(capsys.readouterr().err, "do not fit WORLD_SIZE=2")
    assert not run.exists()


def test_plan_per_gpu(capsys):
    assert main(["plan", "--set", "prompts_per_step=8", "--set", "num_generations=8"]) == 0
    one_gpu = capsys.readouterr().out
    assert main(["plan", "--gpus", "2", "--set", "prompts_per_step=8", "--set", "num_generations=8"]) == 0
    two = capsys.readouterr().out
    assert "2 GPUs" in two and "4 prompts x 8 completions per GPU" in two
    assert "32 sequences" in two and "64 sequences" in one_gpu
    assert main(["plan", "--gpus", "3", "--set", "prompts_per_step=8"]) == 2
    one_line(capsys.readouterr().err, "not divisible by --gpus 3")
    assert main(["plan", "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err


# ---- one process is a world of one; only rank 0 writes ----------------------------------------------
def test_one_process_is_a_world_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = distributed.init(resolve_config("fre", None, {}))
    assert isinstance(one, OneProcess) and (one.rank, one.world_size, one.is_main) == (0, 1, True)
    t = torch.randn(3)
    kept = t.clone()
    assert one.all_reduce_sum_(t, "x") is t and torch.equal(t, kept), "the sum over one rank is its input"
    assert torch.equal(one.all_gather_tensor(t, "x"), kept[None])
    assert one.all_gather_object({"a": 1}, "x") == [{"a": 1}] and one.gather_object(5, "x") == [5]
    assert one.broadcast_object("runs/a", "x") == "runs/a"
    one.broadcast_tensors_([t], "x")
    one.barrier()
    assert torch.equal(t, kept) and one.shard(list("abcde")) == list("abcde")
    assert one.stop_ranks(True) == [0] and one.stop_ranks(False) == []
    param = torch.nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4)
    grad = param.grad.clone()
    extra = one.all_reduce_gradients([param], [torch.tensor(2.5)])
    assert torch.equal(param.grad, grad) and float(extra[0]) == 2.5
    assert one.check(lambda x: x + 1, 1) == 2
    with pytest.raises(ConfigError, match="bad value"):
        one.check(lambda: (_ for _ in ()).throw(ConfigError("bad value")))
    assert one.launcher == "lmmr1-lite"
    assert StepContext(None, None, resolve_config("fre", None, {}), dist=one).dist is None, \
        "a step in a world of one exchanges nothing: the one-process update exactly"


class MirroredRank1(Distributed):
    """Rank 1 of a 2-rank world whose other rank is a mirror of this one (every collective stubbed, no process
    group): gathers hold this rank's value twice, sums double, rank 0's broadcasts are this rank's values.
    `stop_after`: the step after which a stop signal reaches rank 0."""

    def __init__(self, stop_after: int | None):
        super().__init__(rank=1, world_size=2, local_rank=1, local_world_size=2, device=torch.device("cpu"),
                         backend="gloo")
        self.stop_after, self.calls = stop_after, []

    def barrier(self, what="a barrier"):
        self.calls.append(what)

    def all_reduce_sum_(self, tensor, what):
        self.calls.append(what)
        return tensor.mul_(2)

    def all_gather_tensor(self, tensor, what):
        self.calls.append(what)
        if what == "the stop-flag exchange":  # this rank's flag, and rank 0's
            step = self.calls.count(what)
            return torch.stack([torch.tensor([int(step == self.stop_after)]), tensor])
        return torch.stack([tensor, tensor])

    def all_gather_object(self, obj, what):
        self.calls.append(what)
        return [obj, obj]

    def gather_object(self, obj, what):
        self.calls.append(what)
        return None

    def broadcast_object(self, obj, what):
        self.calls.append(what)
        return obj

    def broadcast_tensors_(self, tensors, what):
        self.calls.append(what)


@pytest.mark.parametrize("stop_after", [None, 1], ids=["to-the-end", "stopped"])
def test_a_rank_other_than_0_writes_nothing(tmp_path, monkeypatch, capsys, stop_after):
    """A whole training on rank 1 (a fake 2-rank world): every step, its metrics, completions, checkpoints,
    the evaluations and the finish (or a stop) run, and the run directory is byte for byte as rank 0 left it
    (here: just the random-init base that rank 0 saved)."""
    run = tmp_path / "run"
    cfg = resolve_config("fre", None, {})
    models.save_base_model(models.load_base_model(cfg, torch.device("cpu")), models.load_tokenizer(cfg.model),
                           run / "base_model", cfg.model)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rank1 = MirroredRank1(stop_after)
    monkeypatch.setattr(distributed, "init", lambda cfg: rank1)
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", "--save-every", "1",
                 "--log-completions-every", "1", "--eval-size", "2", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-new-tokens", "6", "--train-size", "16"]) == 0
    steps = 1 if stop_after else 2
    assert rank1.calls.count("the stop-flag exchange") == steps, rank1.calls
    assert rank1.calls.count("the completions gather") == steps
    assert rank1.calls.count("the checkpoint's RNG gather") == steps
    assert rank1.calls.count("the evaluation") == (1 if stop_after else 2), "before, and after the last step"
    assert rank1.calls.count("the gradient all-reduce") == steps
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "rank 1 wrote into the run"
    assert "lmmr1-lite" not in capsys.readouterr().out, "only rank 0 speaks"


# ---- metrics and evaluation merged over ranks ----------------------------------------------------
def test_metrics_merge_weighted_by_counts():
    a = {"reward": 1.0, "reward_std": 0.5, "reward_timeouts": 1, "completions/min_length": 3,
         "completions/max_length": 7, "loss": 0.25, "skipped": False, "step_seconds": 2.0, "tokens_per_second": 1.0}
    b = {"reward": 0.0, "reward_std": 0.0, "reward_timeouts": 2, "completions/min_length": 1,
         "completions/max_length": 9, "loss": 0.25, "skipped": False, "step_seconds": 4.0, "tokens_per_second": 1.0}
    merged = merge_rows([(a, {"completions": 3, "groups": 1, "tokens": 30}),
                         (b, {"completions": 1, "groups": 3, "tokens": 10})])
    assert merged["reward"] == 0.75 and merged["reward_std"] == 0.125 and merged["reward_timeouts"] == 3
    assert merged["completions/min_length"] == 1 and merged["completions/max_length"] == 9
    assert merged["loss"] == 0.25 and merged["step_seconds"] == 4.0 and merged["tokens_per_second"] == 10.0


def test_evaluation_merge_is_the_whole_sets():
    class Row:
        def __init__(self, answer):
            self.answer = answer
    rows = [Row(a) for a in "aabbb"]
    parts = [{"n": 2, "accuracy": 1.0, "format": 0.5, "majority_answer_accuracy": 1.0, "samples": [1, 2]},
             {"n": 3, "accuracy": 0.0, "format": 1.0, "majority_answer_accuracy": 1.0, "samples": [3, 4, 5]}, {}]
    merged = merge_evals(parts, rows)
    assert merged == {"n": 5, "accuracy": 0.4, "format": 0.8, "majority_answer_accuracy": 0.6,
                      "samples": [1, 2, 3, 4, 5]}


# ---- the update equals the one-process update ------------------------------------------------------
GRADIENT_WORKER = r"""
import os, sys, torch
torch.set_num_threads(1)
from dataclasses import replace
from lmmr1_lite import distributed, models
from lmmr1_lite.config import resolve_config
from lmmr1_lite.rollout import Rollout
from lmmr1_lite.step import ScoredRollout, StepContext, compute_gradients

data = torch.load(sys.argv[1], weights_only=True)
cfg = resolve_config("fre", None, {"gradient_checkpointing": False, "micro_batch_size": 2,
                                   "max_tokens_per_micro_batch": 0, "beta": 0.05})
policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
policy.load_state_dict(data["state"])
rank = int(os.environ["RANK"])
rows = slice(rank * 4, rank * 4 + 4)  # this rank's 2 prompts x G=2, trimmed to its own padding
mask = data["completion_mask"][rows]
length = int(mask.sum(1).max())
prompt_mask = data["prompt_mask"][rows]
start = int((prompt_mask.sum(0) == 0).sum())  # left padding no row of this rank needs
batch = Rollout(data["prompt_ids"][rows, start:], prompt_mask[:, start:], data["completion_ids"][rows, :length],
                mask[:, :length], [""] * 4, [None] * 4)
dist = distributed.init(cfg)
out = {}
for agg, level in [(a, "token") for a in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")] \
        + [("seq_mean_token_mean", "sequence")]:
    ctx = StepContext(policy, None, replace(cfg, loss_agg=agg, importance_sampling_level=level), dist=dist)
    old = data["old_logp"][rows, :length] if level == "sequence" else None
    scored = ScoredRollout(batch, [None] * 4, torch.zeros(4), {}, {}, data["advantages"][rows], data["ref_logp"][rows, :length],
                           old)
    sums = compute_gradients(ctx, scored)
    out[agg + "/" + level] = {"grads": {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad},
                "loss": sums["loss"].clone(), "kl": sums["kl"].clone(), "tokens": int(mask.sum()), "length": length}
torch.save(out, sys.argv[2])
"""


def test_two_rank_gradient_equals_one_process_gradient(tmp_path, tiny_policy):
    from lmmr1_lite.rollout import Rollout
    from lmmr1_lite.step import ScoredRollout, StepContext, compute_gradients, policy_logprobs

    policy, tokenizer, cfg = tiny_policy
    cfg = replace(cfg, micro_batch_size=2, max_tokens_per_micro_batch=0, beta=0.05)
    gen = torch.Generator().manual_seed(0)
    n, prompt, completion = 8, 6, 9
    lengths = torch.tensor([3, 5, 2, 4, 9, 7, 1, 6])  # rank 0: 14 tokens, padded to 5; rank 1: 23, padded to 9
    prompt_lengths = torch.tensor([2, 3, 3, 2, 6, 4, 5, 6])
    vocab = 60  # the tiny model has 71 tokens
    data = {
        "prompt_ids": torch.randint(3, vocab, (n, prompt), generator=gen),
        "prompt_mask": (torch.arange(prompt)[None] >= prompt - prompt_lengths[:, None]).long(),
        "completion_ids": torch.randint(3, vocab, (n, completion), generator=gen),
        "completion_mask": (torch.arange(completion)[None] < lengths[:, None]).long(),
        "advantages": torch.randn(n, generator=gen),
        "ref_logp": -3 * torch.rand(n, completion, generator=gen),
        "state": {k: v.clone() for k, v in policy.state_dict().items()},
    }
    data["prompt_ids"] = data["prompt_ids"] * data["prompt_mask"] + tokenizer.pad_token_id * (1 - data["prompt_mask"])
    whole = Rollout(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"],
                    [""] * n, [None] * n)
    # GSPO off-policy (num_iterations 2): old log-probs near the policy's, so that some sequences clip
    data["old_logp"] = policy_logprobs(StepContext(policy, tokenizer, cfg), whole) \
        + 0.3 * torch.randn(n, completion, generator=gen)
    torch.save(data, tmp_path / "batch.pt")
    port, env = free_port(), dict(os.environ, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    procs = [subprocess.Popen([sys.executable, "-c", GRADIENT_WORKER, str(tmp_path / "batch.pt"),
                               str(tmp_path / f"rank{rank}.pt")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank), MASTER_PORT=str(port)))
             for rank in range(2)]
    try:
        batch = Rollout(data["prompt_ids"], data["prompt_mask"], data["completion_ids"], data["completion_mask"],
                        [""] * n, [None] * n)
        expected = {}
        for agg, level in CASES:  # the one-process gradient of the whole batch
            ctx = StepContext(policy, tokenizer, replace(cfg, loss_agg=agg, importance_sampling_level=level))
            sums = compute_gradients(ctx, ScoredRollout(batch, [None] * n, torch.zeros(n), {}, {}, data["advantages"],
                                                        data["ref_logp"], data["old_logp"] if level == "sequence"
                                                        else None))
            expected[agg + "/" + level] = {"grads": {name: p.grad.clone() for name, p in policy.named_parameters()
                                       if p.requires_grad}, "loss": sums["loss"], "kl": sums["kl"]}
        for proc in procs:
            out, _ = proc.communicate(timeout=240)
            assert proc.returncode == 0, out[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert (ranks[0]["token_mean/token"]["tokens"], ranks[1]["token_mean/token"]["tokens"]) == (14, 23)
    assert (ranks[0]["token_mean/token"]["length"], ranks[1]["token_mean/token"]["length"]) == (5, 9)
    gspo, grpo = (torch.cat([g.reshape(-1) for g in expected[f"seq_mean_token_mean/{level}"]["grads"].values()])
                  for level in ("sequence", "token"))
    assert float((gspo - grpo).norm() / grpo.norm()) > 1e-3, "off-policy, GSPO's gradient is not GRPO's"
    for agg in expected:
        one = expected[agg]
        flat = torch.cat([g.reshape(-1) for g in one["grads"].values()])
        assert flat.norm() > 0
        for got in ranks:
            got = got[agg]
            assert got["grads"].keys() == one["grads"].keys()
            other = torch.cat([got["grads"][name].reshape(-1) for name in one["grads"]])
            assert float((other - flat).norm() / flat.norm()) <= 1e-6, agg
            for key in ("loss", "kl"):
                assert abs(float(got[key] - one[key])) <= 1e-6 * max(1.0, abs(float(one[key]))), (agg, key)
        assert all(torch.equal(ranks[0][agg]["grads"][k], ranks[1][agg]["grads"][k]) for k in one["grads"]), \
            "every rank holds the same gradient"


# ---- a 2-rank run ---------------------------------------------------------------------------------
@linux_only
def test_two_rank_run_stops_on_any_rank_and_resumes_bit_exact(tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    args = ["--max-steps", "5", "--save-every", "2"] + SMALL
    finish(torchrun(["train", "--output-dir", str(full)] + args))
    assert [r["step"] for r in metrics(full)] == [1, 2, 3, 4, 5], "one metrics row per step"
    assert [p.name for p in complete_checkpoints(full)] == ["checkpoint-4", "checkpoint-5"], "one checkpoint set"
    assert not list(full.glob("*.tmp")) and (full / "eval.json").is_file() and (full / "adapter").is_dir()
    completions = [json.loads(line) for line in (full / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in completions] == [2] * 16 + [4] * 16, "every rank's completions, once"

    proc = torchrun(["train", "--output-dir", str(cut)] + args)
    wait_rows(proc, cut / "metrics.jsonl", 2)
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)  # rank 1 alone: every rank stops after the same step
    out = finish(proc)
    stopped_at = len(metrics(cut))
    assert 2 <= stopped_at < 5, out[-2000:]
    assert f"stopped after step {stopped_at} (a stop signal reached rank 1)" in out
    assert latest_checkpoint(cut).name == f"checkpoint-{stopped_at}"
    state = json.loads((latest_checkpoint(cut) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and set(state["rng_by_rank"]) == {"0", "1"}
    shutil.copytree(cut, tmp_path / "cut_one")

    finish(torchrun(["train", "--resume", str(cut)]))
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3, 4, 5], "appended, no duplicated rows"
    assert comparable(metrics(cut)) == comparable(metrics(full))
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())

    capsys.readouterr()  # at another world size: it resumes, and says the sampling differs
    assert main(["train", "--resume", str(tmp_path / "cut_one")]) == 0
    assert "sampling will differ from an uninterrupted run" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "cut_one")] == [1, 2, 3, 4, 5]


@linux_only
def test_a_dead_rank_takes_the_others_down(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(["train", "--output-dir", str(run), "--max-steps", "500", "--eval-size", "0",
                     "--instruct-prior-steps", "0", "--prompts-per-step", "4", "--num-generations", "2"])
    wait_rows(proc, run / "metrics.jsonl", 2)
    killed = time.time()
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - killed < 60, out[-2000:]
    assert len(metrics(run)) < 500
    assert "lmmr1-lite: aborted: rank 0: lost the other ranks" in out, out[-3000:]


# ---- learning at 2 ranks -------------------------------------------------------------------------
@linux_only
def test_two_ranks_learn_like_one(tmp_path):
    """The tiny FRE default at 2 ranks x 8 prompts (16 per step, as at 1 rank) learns as it does at 1 rank."""
    start = time.perf_counter()
    finish(torchrun(["train", "--output-dir", str(tmp_path / "run")]), timeout=1800)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["after"]["accuracy"] - ev["before"]["accuracy"] >= 0.3, ev
    print(f"2 ranks: {time.perf_counter() - start:.0f} s; accuracy {ev['before']['accuracy']:.2f} -> "
          f"{ev['after']['accuracy']:.2f}")
