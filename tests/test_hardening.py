"""Careless and hostile input at every entry point: nothing deleted that is not the run's, one line on
stderr (exit 2) instead of a traceback, values that cannot be right refused, paths that resume anywhere."""
import fcntl
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from lmmr1_lite.checkpoint import complete_checkpoints
from lmmr1_lite.cli import main
from lmmr1_lite.config import REPO_ROOT
from lmmr1_lite.rundir import LOCK, MARKER

FAST = ["--max-steps", "1", "--eval-size", "0", "--prompts-per-step", "2", "--num-generations", "2",
        "--max-new-tokens", "6", "--instruct-prior-steps", "0", "--train-size", "16"]


def one_line_error(capsys, code, expected=""):
    """Exit 2 and the error in one line (progress bars of model loading may stand before it)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err and expected in errors[0], err
    assert errors[0] == err.splitlines()[-1]
    return errors[0]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny 3-step run with a checkpoint per step, shared by the tests that need a run."""
    run = tmp_path_factory.mktemp("shared") / "run"
    assert main(["train", "--output-dir", str(run), "--save-every", "1", "--keep-last", "0"] + FAST[2:]
                + ["--max-steps", "3"]) == 0
    return run


# ---- data loss --------------------------------------------------------------------------------------
def test_overwrite_never_touches_foreign_files_and_only_after_every_check(tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "notes.txt").write_text("x")
    (proj / "config.yaml").write_text("max_steps: 1\n")  # the user's own config, not a run's
    before = tree(proj)
    code = main(["train", "--output-dir", str(proj), "--overwrite", "--data", "/nonexistent.jsonl"])
    one_line_error(capsys, code, "lmmr1-lite did not write")
    assert tree(proj) == before and not (proj / LOCK).exists(), "nothing written, nothing removed"
    code = main(["train", "--output-dir", str(proj), "--overwrite"] + FAST)
    one_line_error(capsys, code, "did not write")
    assert tree(proj) == before


def test_overwrite_replaces_only_the_runs_own_files(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run)] + FAST) == 0
    capsys.readouterr()
    (run / "mine.txt").write_text("keep")
    (run / "notes").mkdir()
    (run / "notes" / "a.md").write_text("keep too")
    first_metrics = (run / "metrics.jsonl").read_text()
    code = main(["train", "--output-dir", str(run), "--overwrite", "--data", "/nonexistent.jsonl"] + FAST)
    one_line_error(capsys, code, "nonexistent")
    assert (run / "metrics.jsonl").read_text() == first_metrics, "a failed check removes nothing"
    assert main(["train", "--output-dir", str(run), "--overwrite", "--seed", "5"] + FAST) == 0
    assert (run / "mine.txt").read_text() == "keep" and (run / "notes" / "a.md").read_text() == "keep too"
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 5
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_output_dir_dot_keeps_the_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "code.py").write_text("print(1)\n")
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    one_line_error(capsys, main(["train", "--output-dir", ".", "--overwrite"] + FAST), "did not write")
    assert tree(tmp_path) == before


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is writing here
        one_line_error(capsys, main(["train", "--output-dir", str(run)] + FAST), "in use by another run")
    assert not (run / "config.yaml").exists() and not (run / "base_model.tmp").exists()


def test_a_failed_start_leaves_no_directory_behind(tmp_path, capsys):
    run = tmp_path / "new"
    one_line_error(capsys, main(["train", "--output-dir", str(run), "--data", "/nope.jsonl"] + FAST), "nope")
    assert not run.exists()


# ---- values that cannot be right ------------------------------------------------------------------
@pytest.mark.parametrize("argv,expected", [
    (["--max-steps", ".inf"], "max_steps"),
    (["--learning-rate", "nan"], "learning_rate"),
    (["--set", "lora_target_modules=[]"], "lora_target_modules"),
    (["--set", "max_grad_norm=-1"], "max_grad_norm must be > 0"),
    (["--eval-size", "-1"], "eval_size must be >= 0"),
    (["--set", "rewards={format: .nan}"], "rewards"),
    (["--stage", "sft"], "invalid choice"),
])
def test_impossible_values_are_refused_in_one_line(tmp_path, capsys, argv, expected):
    one_line_error(capsys, main(["train", "--output-dir", str(tmp_path / "r")] + argv), expected)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_plan_refuses_impossible_card_sizes(capsys, value):
    one_line_error(capsys, main(["plan", "--gpu-gb", value]), "gpu-gb")


def test_every_command_parses_set_the_same_way(capsys):
    one_line_error(capsys, main(["eval", "--data", "tiny_color_text", "--set", "key"]), "expected KEY=VALUE")
    one_line_error(capsys, main(["plan", "--set", "key"]), "expected KEY=VALUE")
    one_line_error(capsys, main(["pipeline", "--set", "key"]), "expected KEY=VALUE")


def test_torchrun_launch_is_refused_not_run_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(capsys, main(["train", "--output-dir", str(tmp_path / "r")] + FAST), "WORLD_SIZE=2")
    assert not (tmp_path / "r").exists()


# ---- checkpoints and resume ----------------------------------------------------------------------
def test_resume_below_the_checkpoint_is_refused_and_changes_nothing(trained_run, capsys):
    capsys.readouterr()
    config = (trained_run / "config.yaml").read_text()
    one_line_error(capsys, main(["train", "--resume", str(trained_run), "--max-steps", "2"]), "at step 3")
    assert (trained_run / "config.yaml").read_text() == config


def test_damaged_newest_checkpoint_falls_back_to_the_previous(trained_run, tmp_path, capsys):
    import shutil
    for damage in ("adapter_model.safetensors", "trainer_state.json", "trainer.pt"):
        run = tmp_path / damage
        shutil.copytree(trained_run, run)
        newest = complete_checkpoints(run)[-1]
        data = (newest / damage).read_bytes()
        (newest / damage).write_bytes(data[: len(data) // 2])  # truncated, as a full disk or a kill leaves it
        assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0, damage
        err = capsys.readouterr()
        assert f"checkpoint {newest.name} is damaged" in err.err and "falling back" in err.err
        assert "checkpoint-2" in err.out, "resumed from the previous complete checkpoint"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]


def test_run_paths_are_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), "--model", "configs/models/tiny", "--random-init",
                 "--data", "tiny_color_text", "--save-every", "1"] + FAST) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert Path(saved["model"]).is_absolute() and Path(saved["output_dir"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", os.path.relpath(run, elsewhere), "--max-steps", "2"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# ---- models and adapters -------------------------------------------------------------------------
def test_offline_hub_id_is_one_fast_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    start = time.perf_counter()
    code = main(["train", "--config", str(empty), "--output-dir", str(tmp_path / "r")])
    err = one_line_error(capsys, code, "Qwen/Qwen2.5-VL-3B-Instruct")
    assert "hf download" in err and "model" in err and time.perf_counter() - start < 10
    assert not (tmp_path / "r").exists()


def test_adapter_on_a_base_of_another_shape(trained_run, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForImageTextToText
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "tiny")
    config.text_config.hidden_size, config.text_config.intermediate_size = 32, 64
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 2, 1
    config.vision_config.out_hidden_size = 32
    other = tmp_path / "other_base"
    AutoModelForImageTextToText.from_config(config).save_pretrained(other)
    adapter = str(trained_run / "adapter")
    capsys.readouterr()
    one_line_error(capsys, main(["eval", "--model", str(other), "--adapter", adapter, "--data", "tiny_color_text",
                                 "--limit", "2", "--out", str(tmp_path / "ev")]), "does not fit the base model")
    one_line_error(capsys, main(["export", "--model", str(other), "--adapter", adapter, "--out",
                                 str(tmp_path / "ex")]), "does not fit the base model")


def test_export_out_that_is_a_file(trained_run, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    capsys.readouterr()
    one_line_error(capsys, main(["export", "--adapter", str(trained_run / "adapter"), "--out", str(target)]),
                   "not a directory")
    assert target.read_text() == "x"


def test_marker_says_which_directories_are_runs(trained_run):
    assert (trained_run / MARKER).is_file()
