"""Runs that survive: atomic checkpoints, exact resume, signals, NaNs, OOM, untrusted files, bad output dirs."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import torch
from safetensors.torch import load_file

from lmmr1_lite import step as step_module
from lmmr1_lite.checkpoint import latest_checkpoint
from lmmr1_lite.cli import main

TIMING = set(step_module.TIMING_METRICS)
SMALL = ["--eval-size", "4", "--prompts-per-step", "4", "--num-generations", "4", "--set", "beta=0.02"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def interrupt_when(path, rows: int):
    """SIGINT this process once metrics.jsonl holds `rows` rows (the handler runs in the main thread)."""
    def watch():
        while not (path.exists() and len(path.read_text().splitlines()) >= rows):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_interrupted_and_resumed_run_is_bit_exact(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", "--output-dir", str(full), "--max-steps", "8", "--save-every", "3"] + SMALL) == 0
    watcher = interrupt_when(cut / "metrics.jsonl", 3)
    assert main(["train", "--output-dir", str(cut), "--max-steps", "8", "--save-every", "3"] + SMALL) == 0
    watcher.join(timeout=5)
    stopped_at = len(metrics(cut))
    assert 3 <= stopped_at < 8, "the run stopped early on SIGINT"
    assert latest_checkpoint(cut).name == f"checkpoint-{stopped_at}", "a checkpoint at the step it stopped"
    assert main(["train", "--resume", str(cut)]) == 0
    assert [r["step"] for r in metrics(cut)] == list(range(1, 9)), "appended, no duplicated rows"
    assert comparable(metrics(cut)) == comparable(metrics(full))
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((full / "eval.json").read_text()) == json.loads((cut / "eval.json").read_text())


def test_resume_can_extend_and_only_max_steps_may_change(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "2"] + SMALL) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4] and latest_checkpoint(run).name == "checkpoint-4"
    assert main(["train", "--resume", str(run), "--learning-rate", "0.1"]) == 2
    assert "only --max-steps may change" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2


def test_sigint_in_a_subprocess_checkpoints_and_exits_zero(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmmr1_lite.cli", "train", "--output-dir", str(run),
                             "--max-steps", "500", "--eval-size", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "resume with: lmmr1-lite train --resume" in out
    assert latest_checkpoint(run).name == f"checkpoint-{len(metrics(run))}"


KILL_SCRIPT = r"""
import random, sys, torch
from lmmr1_lite import models
from lmmr1_lite.checkpoint import save_checkpoint
from lmmr1_lite.config import resolve_config
cfg = resolve_config("fre")
policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
params = [p for p in policy.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
step = 0
print("saving", flush=True)
while True:
    step += 1
    with torch.no_grad():
        for p in params:
            p.fill_(step)  # every tensor of checkpoint-N holds N: a mixed checkpoint would show
    save_checkpoint(__import__("pathlib").Path(sys.argv[1]), step, policy, opt, sched, random.Random(step),
                    {"eval_before": {}, "skipped_steps": 0}, keep_last=2)
"""


def test_sigkill_during_saves_leaves_a_complete_checkpoint(tmp_path, tiny_policy):
    policy, _, cfg = tiny_policy
    from lmmr1_lite.checkpoint import load_checkpoint
    rng = random.Random(0)
    for trial in range(3):
        run = tmp_path / f"kill{trial}"
        run.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(0.3 + rng.random())
        proc.kill()
        proc.wait()
        newest = latest_checkpoint(run)
        assert newest is not None
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        state = load_checkpoint(newest, policy, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                                random.Random())
        assert state["step"] == int(newest.name.split("-")[1])
        assert all(torch.all(p == state["step"]) for p in params), "weights all from the same save"


def test_nan_steps_are_skipped_then_abort_after_k(tmp_path, monkeypatch, capsys):
    real = step_module.grpo_loss
    calls = {"n": 0, "poison_from": 10**9, "only": set()}

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= calls["poison_from"] or calls["n"] in calls["only"]:
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(step_module, "grpo_loss", poisoned)
    calls["only"] = {2}  # one bad step (one micro-batch per step here)
    run = tmp_path / "one"
    assert main(["train", "--output-dir", str(run), "--max-steps", "4"] + SMALL) == 0
    rows = metrics(run)
    assert [r["skipped"] for r in rows] == [False, True, False, False] and rows[-1]["skipped_steps"] == 1
    calls.update(n=0, only=set(), poison_from=3)
    run = tmp_path / "many"
    code = main(["train", "--output-dir", str(run), "--max-steps", "20", "--save-every", "1",
                 "--max-consecutive-skips", "3"] + SMALL)
    err = capsys.readouterr().err
    assert code == 1 and "3 consecutive steps with a non-finite loss" in err and "checkpoint-2" in err
    assert len(metrics(run)) == 5 and latest_checkpoint(run).name == "checkpoint-2"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"], "keep_last=2"


def test_oom_halves_the_micro_batch_and_gives_up_at_one(tmp_path, monkeypatch, capsys):
    real = step_module.grpo_loss

    def tight(hidden, *args, **kwargs):
        if hidden.shape[0] > limit["rows"]:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(hidden, *args, **kwargs)

    limit = {"rows": 2}
    monkeypatch.setattr(step_module, "grpo_loss", tight)
    run = tmp_path / "oom"
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", "--micro-batch-size", "16"] + SMALL) == 0
    assert [r["micro_batch_size"] for r in metrics(run)] == [2, 2]
    err = capsys.readouterr().err
    assert err.count("retrying this step with batch size") == 3  # 16 -> 8 -> 4 -> 2, once each
    limit["rows"] = 0
    assert main(["train", "--output-dir", str(tmp_path / "oom1"), "--max-steps", "2"] + SMALL) == 1
    assert "even at batch size 1" in capsys.readouterr().err


def test_oom_in_a_log_prob_pass_halves_its_rows_once(tmp_path, monkeypatch, capsys):
    real = step_module.token_logprobs

    def tight(hidden, *args, **kwargs):
        if hidden.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(step_module, "token_logprobs", tight)
    assert main(["train", "--output-dir", str(tmp_path / "oom"), "--max-steps", "3"] + SMALL) == 0
    err = capsys.readouterr().err
    # 16 rows (4 prompts x 4) -> 8 -> 4 -> 2 in the first reference pass; later passes start at 2
    assert err.count("out of GPU memory in a log-prob pass") == 3, err


def test_overwrite_only_when_asked(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "1"] + SMALL) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", "--output-dir", str(run), "--max-steps", "1"] + SMALL) == 2
    assert "already holds a run" in capsys.readouterr().err and (run / "metrics.jsonl").read_text() == before
    assert main(["train", "--output-dir", str(run), "--max-steps", "2", "--overwrite"] + SMALL) == 0
    assert len(metrics(run)) == 2


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_in_a_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--max-steps", "1"] + SMALL) == 0
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Exploit(marker)}, latest_checkpoint(run) / "trainer.pt")
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "holds Python objects other than tensors" in err and "no complete, readable checkpoint" in err
    assert not marker.exists()


def test_unwritable_or_full_output_dir_fails_before_training(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--output-dir", str(blocker / "run"), "--max-steps", "1"] + SMALL) == 2
    assert "cannot create (Not a directory)" in capsys.readouterr().err
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    assert main(["train", "--output-dir", str(tmp_path / "full"), "--max-steps", "1"] + SMALL) == 2
    err = capsys.readouterr().err
    assert "MiB free" in err and not (tmp_path / "full" / "metrics.jsonl").exists()


def test_second_interrupt_stops_at_once():
    from lmmr1_lite.train import StopFlag
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested, "the first Ctrl-C only asks the loop to stop after its step"
        raised = False
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        except KeyboardInterrupt:
            raised = True
        assert raised, "the second Ctrl-C stops at once"
    assert signal.getsignal(signal.SIGINT) != stop._handle, "handlers restored after the run"
