"""The embedded default must visibly learn (slow: minutes on 2 CPU cores; `make test-slow`)."""
import json
import time

import pytest

from lmmr1_lite.cli import main


@pytest.mark.slow
def test_default_fre_run_raises_heldout_accuracy(tmp_path):
    start = time.perf_counter()
    assert main(["train", "--stage", "fre", "--output-dir", str(tmp_path / "run")]) == 0
    minutes = (time.perf_counter() - start) / 60
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    gain = ev["after"]["accuracy"] - ev["before"]["accuracy"]
    assert gain >= 0.3, f"held-out greedy accuracy {ev['before']['accuracy']:.2f} -> {ev['after']['accuracy']:.2f}"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tenth = max(1, len(rows) // 10)
    first = sum(r["reward_mean"] for r in rows[:tenth]) / tenth
    last = sum(r["reward_mean"] for r in rows[-tenth:]) / tenth
    assert last > first + 0.5, f"reward curve did not rise: {first:.2f} -> {last:.2f}"
    print(f"default FRE run: {minutes:.1f} min, accuracy {ev['before']['accuracy']:.2f} -> {ev['after']['accuracy']:.2f}")
