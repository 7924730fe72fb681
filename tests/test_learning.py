"""The embedded defaults must visibly learn: FRE on text, then MGT on images from the FRE adapter, and MGT
from the base when there is no FRE run. About a minute each on 2 CPU cores; other seeds under `make test-slow`."""
import json
import time

import pytest

from lmmr1_lite.cli import main


def assert_learned(run_dir, stage: str) -> dict:
    """Held-out greedy accuracy up by >= 0.3, well above always giving the commonest answer, and a rising
    sampled reward; returns the run's eval.json."""
    ev = json.loads((run_dir / "eval.json").read_text())
    before, after = ev["before"], ev["after"]
    assert after["accuracy"] - before["accuracy"] >= 0.3, (stage, before["accuracy"], after["accuracy"])
    assert after["accuracy"] >= after["majority_answer_accuracy"] + 0.3, f"{stage}: no better than a constant answer"
    assert after["format"] == 1.0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tenth = max(1, len(rows) // 10)
    first = sum(r["reward"] for r in rows[:tenth]) / tenth
    last = sum(r["reward"] for r in rows[-tenth:]) / tenth
    assert last > first + 0.3, f"{stage}: reward curve did not rise: {first:.2f} -> {last:.2f}"
    assert (run_dir / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    return ev


def test_default_pipeline_learns_text_then_images(tmp_path):
    start = time.perf_counter()
    assert main(["pipeline", "--output-dir", str(tmp_path / "run")]) == 0
    fre = assert_learned(tmp_path / "run" / "fre", "fre")
    mgt = assert_learned(tmp_path / "run" / "mgt", "mgt")
    print(f"pipeline: {(time.perf_counter() - start) / 60:.1f} min; FRE {fre['before']['accuracy']:.2f} -> "
          f"{fre['after']['accuracy']:.2f}, MGT {mgt['before']['accuracy']:.2f} -> {mgt['after']['accuracy']:.2f}")


def test_default_mgt_without_an_fre_run_learns_from_the_base(tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)  # no runs/fre-* here: `lmmr1-lite train --stage mgt` starts from the base
    assert main(["train", "--stage", "mgt"]) == 0
    assert any("no FRE run in runs/" in str(w.message) for w in recwarn)
    (run_dir,) = (tmp_path / "runs").glob("mgt-*")
    assert_learned(run_dir, "mgt")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_defaults_learn_for_other_seeds(tmp_path, seed):
    assert main(["pipeline", "--output-dir", str(tmp_path / "run"), "--set", f"seed={seed}"]) == 0
    assert_learned(tmp_path / "run" / "fre", f"fre seed {seed}")
    assert_learned(tmp_path / "run" / "mgt", f"mgt seed {seed}")
    assert main(["train", "--stage", "mgt", "--init", "none", "--seed", str(seed),
                 "--output-dir", str(tmp_path / "from_base")]) == 0
    assert_learned(tmp_path / "from_base", f"mgt from the base, seed {seed}")
