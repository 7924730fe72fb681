"""The command line end to end on the tiny default, and its one-line errors."""
import json

import pytest
import yaml

from lmmr1_lite.cli import build_parser, main
from lmmr1_lite.config import TrainConfig, resolve_config
import dataclasses

# TRL's names where TRL has the quantity (GRPOTrainer's logged metrics), plus this project's extras
REQUIRED_METRICS = {"step", "reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy/mean",
                    "rewards/format/mean", "completions/mean_length", "completions/min_length",
                    "completions/max_length", "completions/clipped_ratio", "kl", "loss", "clip_ratio/low_mean",
                    "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "grad_norm", "reward_timeouts",
                    "step_seconds", "tokens_per_second"}


def test_short_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--stage", "fre", "--output-dir", str(out), "--max-steps", "3", "--save-every", "2",
                 "--eval-size", "4", "--seed", "1", "--set", "beta=0.01", "--set", "num_iterations=2",
                 "--log-completions-every", "2", "--prompts-per-step", "4"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["beta"] == 0.01 and saved["seed"] == 1 and saved["stage"] == "fre"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert REQUIRED_METRICS <= set(row), REQUIRED_METRICS - set(row)
        assert row["kl"] >= 0 and 0 <= row["rewards/format/mean"] <= 1 and row["completions/mean_length"] > 0
        assert row["completions/min_length"] <= row["completions/mean_length"] <= row["completions/max_length"]
        assert 0 <= row["frac_reward_zero_std"] <= 1 and 0 <= row["completions/clipped_ratio"] <= 1
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {r["step"] for r in logged} == {2}, "log_completions_every=2: step 2's completions only"
    assert len(logged) == 4 * 8 and {"prompt", "answer", "completion", "reward", "format", "accuracy"} <= set(logged[0])
    assert (out / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    ev = json.loads((out / "eval.json").read_text())
    assert ev["before"]["n"] == 4 and 0 <= ev["after"]["accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "adapter:" in printed and "reward curve:" in printed
    card = (out / "adapter" / "README.md").read_text()
    assert "tiny_color_text" in card and "GRPO steps: 3" in card and "| after |" in card, card

    # the adapter is a PEFT adapter over the saved random-init base
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText
    base, info = AutoModelForImageTextToText.from_pretrained(out / "base_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", "--output-dir", str(out), "--max-steps", "1", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did not write" in err, "not a run of ours: never replaced, even with --overwrite"
    from lmmr1_lite.rundir import MARKER
    (out / MARKER).write_text("{}")
    assert main(["train", "--output-dir", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a run" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n', "nothing already written is lost"


@pytest.mark.parametrize("argv,expected", [
    (["--set", "lerning_rate=0.1"], "unknown config field 'lerning_rate'"),
    (["--max-steps", "ten"], "field 'max_steps' expects int"),
    (["--set", "noequals"], "expected KEY=VALUE"),
    (["--loss-agg", "sum"], "loss_agg must be"),
    (["--num-generations", "1"], "num_generations must be >= 2"),
    (["--lora-r", "99999999999999999999"], "lora_r must be in [1, 8192]"),
    (["--data", "nope.jsonl"], "neither a task"),
])
def test_user_mistakes_give_one_line_errors(tmp_path, capsys, argv, expected):
    code = main(["train", "--output-dir", str(tmp_path / "r"), "--max-steps", "1", "--eval-size", "0"] + argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and err.count("\n") == 0, err


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\nrewards: {format: 0.5\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line" in err


def test_help_documents_every_field():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "stage":
            assert "--" + f.name.replace("_", "-") in text
    for flag in ("--model", "--config", "--output-dir", "--max-steps", "--save-every", "--seed", "--set", "--report-to"):
        assert flag in text


def test_precedence_tiny_default_then_file_then_flags(tmp_path):
    default = resolve_config("fre")
    assert default.random_init and default.model.endswith("configs/models/tiny") and default.data == "tiny_color_text"
    f = tmp_path / "c.yaml"
    f.write_text("model: configs/models/tiny\nrandom_init: true\nlearning_rate: 0.01\nmax_steps: 9\n")
    cfg = resolve_config(None, str(f), {"max_steps": "4"})
    assert cfg.learning_rate == 0.01 and cfg.max_steps == 4 and cfg.stage == "fre"
    assert cfg.prompts_per_step == TrainConfig().prompts_per_step, "a config file does not inherit the tiny YAML"
    assert resolve_config("fre", None, {"model": "some/model"}).random_init is False


def test_reward_curve_plots_the_terms_the_run_weighted_over_whole_steps(tmp_path, monkeypatch):
    """The curve shows the total and each weighted reward term (not a term the run did not use, logged as 0),
    with integer step ticks."""
    import json

    import matplotlib.axes

    from lmmr1_lite.report import plot_rewards

    rows = [{"step": s, "reward": 0.1 * s, "rewards/format_boxed/mean": 0.3 + 0.05 * s,
             "rewards/accuracy/mean": 0.2, "rewards/format/mean": 0.0, "completions/mean_length": 200 + s}
            for s in range(1, 8)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = []
    real = matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return real(self, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    out = plot_rewards(metrics, tmp_path / "curve.png", terms=["format_boxed", "accuracy"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    named = [label for label in labels if label]
    assert any(label.startswith("rewards/format_boxed/mean") for label in named)
    assert any(label.startswith("rewards/accuracy/mean") for label in named)
    assert not any(label.startswith("rewards/format/mean") for label in named), "an unweighted term is not drawn"
    labels.clear()
    plot_rewards(metrics, tmp_path / "all.png")  # no terms given: every logged term
    assert any((label or "").startswith("rewards/format/mean") for label in labels)


def test_the_cli_gives_the_cuda_allocator_expandable_segments_unless_the_user_chose(monkeypatch, capsys):
    """Set before anything touches CUDA (the dynamic KV cache's growing tensors left the H200's allocator holding
    4x what was allocated); a user's own PYTORCH_CUDA_ALLOC_CONF is kept as it is."""
    import os

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert main(["plan", "--stage", "fre"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert main(["plan", "--stage", "fre"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
