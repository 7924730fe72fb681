"""Where a run's numbers go: metrics.jsonl, completions.jsonl, optional tensorboard/wandb/trackio, and the
reward-curve PNG."""
from __future__ import annotations

import json
from pathlib import Path

from .models import warn_once


class MetricsLog:
    """Appends one JSON object per step to `metrics.jsonl` (and mirrors it to tensorboard/wandb)."""

    def __init__(self, run_dir: Path, report_to: str = "none", config: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        name = (config or {}).get("run_name") or run_dir.name
        # on resume the file is appended to, never rewritten: steps it already holds are not logged again
        self.last_step = max((row["step"] for row in read_metrics(self.path)), default=0) if self.path.exists() else 0
        self.writer = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                warn_once("report_to=tensorboard but tensorboard is not installed; metrics go to metrics.jsonl only")
        elif report_to == "wandb":
            try:
                import wandb
                self.writer = wandb.init(project="lmmr1-lite", name=name, dir=str(run_dir), config=config)
            except ImportError:
                warn_once("report_to=wandb but wandb is not installed; metrics go to metrics.jsonl only")
        elif report_to == "trackio":
            try:
                import trackio
                self.writer = trackio.init(project="lmmr1-lite", name=name, config=config)
            except ImportError:
                warn_once("report_to=trackio but trackio is not installed; metrics go to metrics.jsonl only")

    def log(self, row: dict) -> None:
        if row["step"] <= self.last_step:
            return
        self.last_step = row["step"]
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is None:
            return
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if hasattr(self.writer, "add_scalar"):
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, row["step"])
        else:
            self.writer.log(numbers, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            (self.writer.close if hasattr(self.writer, "close") else self.writer.finish)()


def completion_records(step: int, scored) -> list[dict]:
    """One JSON-able object per completion of a step: prompt, gold answer, completion, reward and its parts."""
    return [{"step": step, "prompt": example.prompt, "answer": example.answer, "completion": text,
             "reward": float(scored.rewards[i]), **{name: values[i] for name, values in scored.parts.items()}}
            for i, (example, text) in enumerate(zip(scored.examples, scored.batch.texts))]


def write_completions(path: Path, records: list[dict]) -> None:
    """Append `completion_records` (under torchrun: every rank's, gathered to rank 0 in rank order)."""
    with path.open("a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def log_completions(path: Path, step: int, scored) -> None:
    """Append one JSON object per completion of a step: prompt, gold answer, completion, reward and its parts."""
    write_completions(path, completion_records(step, scored))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sign_test_p(gained: int, lost: int) -> float:
    """Exact two-sided sign test on the discordant pairs of a paired comparison: the probability, if a
    discordant problem is equally likely to go either way, of a split at least as uneven as gained/lost."""
    from math import comb

    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(base_scores: dict, scores: dict) -> dict:
    """Problems one model solves and the other does not, over the ids both scored: gained (solved now, not by
    the base), lost (the reverse), the exact sign-test p on those, and the accuracy difference in points."""
    common = [k for k in base_scores if k in scores]
    gained = sum(1 for k in common if scores[k] and not base_scores[k])
    lost = sum(1 for k in common if base_scores[k] and not scores[k])
    difference = 100.0 * (gained - lost) / len(common) if common else float("nan")
    return {"n": len(common), "gained": gained, "lost": lost, "p": sign_test_p(gained, lost),
            "difference": difference}


def plot_rewards(metrics_path: Path, out_path: Path, title: str = "", terms: list[str] | None = None) -> Path:
    """The total reward and each reward term the run weighted (`terms`: the config's reward names; default,
    every `rewards/<name>/mean` logged), raw and a moving average, over whole steps, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(metrics_path)
    steps = [r["step"] for r in rows]
    if terms is None:
        terms = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = ["reward"] + [f"rewards/{name}/mean" for name in terms]
    for index, key in enumerate(keys):
        color = f"C{index}"
        values = [r.get(key, float("nan")) for r in rows]
        window = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color=color, label=f"{key} (moving avg {window})")
    lengths = [r.get("completions/mean_length", float("nan")) for r in rows]
    if any(length == length for length in lengths):  # completion length on its own axis: the RL signal to watch
        twin = ax.twinx()
        twin.plot(steps, lengths, color="C7", alpha=0.6, linewidth=0.8, label="completions/mean_length")
        twin.set_ylabel("mean completion length (tokens)")
        twin.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean over the step's completions")
    ax.set_title(title or "GRPO training rewards")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
