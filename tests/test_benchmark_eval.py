"""`eval --benchmark` end to end on the tiny model: fixture files of every benchmark in its published schema,
the Table-1-shaped eval.md beside the paper's rows, a predictions JSONL per benchmark and model, and an
interrupted evaluation that resumes without redoing rows."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_benchmarks import ROWS, png

from lmmr1_lite import benchmark_eval, benchmarks
from lmmr1_lite.benchmarks import sokoban
from lmmr1_lite.cli import main

FAST = ["--max-steps", "1", "--eval-size", "0", "--prompts-per-step", "2", "--num-generations", "2",
        "--max-new-tokens", "4", "--instruct-prior-steps", "0", "--train-size", "16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_eval")
    run = root / "run"
    assert main(["train", "--output-dir", str(run)] + FAST) == 0
    files = []
    for name in benchmarks.NAMES:
        if name == "sokoban":
            files.append(str(sokoban.write_levels(root / "sokoban", 2, seed=0)))
            continue
        if name == "mathvista":  # its rows name image files beside the data file
            (root / "images").mkdir()
            for row in ROWS[name][:2]:
                (root / row["image"]).write_bytes(png())
        path = root / f"{name}.parquet"  # the Hub's own format: image columns as {"bytes", "path"}
        pq.write_table(pa.Table.from_pylist(ROWS[name][:2]), path)
        files.append(str(path))
    return run, files


def evaluate(run, files, out, extra=()):
    return main(["eval", "--benchmark", ",".join(benchmarks.NAMES), "--data", ",".join(files),
                 "--adapter", str(run / "adapter"), "--max-new-tokens", "3", "--batch-size", "4",
                 "--out", str(out)] + list(extra))


def test_every_benchmark_end_to_end_with_table_predictions_and_resume(setup, tmp_path, monkeypatch):
    run, files = setup
    out = tmp_path / "ev"
    generated = []
    real = benchmark_eval.generate

    def counting(policy, tokenizer, messages, **kwargs):
        generated.append(len(messages))
        return real(policy, tokenizer, messages, **kwargs)
    monkeypatch.setattr(benchmark_eval, "generate", counting)
    assert evaluate(run, files, out) == 0
    rows_per_model = sum(min(2, len(ROWS.get(n, [0, 0]))) for n in benchmarks.NAMES)
    assert sum(generated) == 2 * rows_per_model, "every row, for the base and the adapter"

    table = (out / "eval.md").read_text()
    header = table.splitlines()[0]
    for column in ("MATH500", "GPQA", "text avg", "OlympiadBench", "MathVision", "MathVerse", "MM-Star", "MathVista",
                   "MM avg", "Sokoban"):
        assert f" {column} |" in header, column
    assert "base (base_model), cot" in table and ", lmmr1" in table, "the paper's prompt choice per row"
    assert "| paper: FRE-Text (LMM-R1, Qwen2.5-VL-3B) | 65.40 | 36.87 | 51.14 |" in table
    results = json.loads((out / "eval.json").read_text())["results"]
    assert len(results) == 2 and all(0 <= r[n]["accuracy"] <= 1 for r in results.values() for n in r)
    predictions = sorted((out / "predictions").rglob("*.jsonl"))
    assert len(predictions) == 2 * len(benchmarks.NAMES)
    record = json.loads(predictions[0].read_text().splitlines()[0])
    assert {"id", "extracted", "score", "completion"} <= set(record) and record["score"] in (0.0, 1.0)

    # an interrupted evaluation: the last prediction of one file is lost; only that row is generated again
    victim = out / "predictions" / "math500" / "base-cot-3.jsonl"  # <model>-<prompt>-<cap>
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines[:-1]) + "\n")
    generated.clear()
    assert evaluate(run, files, out) == 0
    assert generated == [1], "resumed: rows already predicted are not generated again"
    assert len(victim.read_text().splitlines()) == len(lines)


def test_run_prompt_mode_uses_the_adapters_own_prompt_for_both_rows(setup, tmp_path, monkeypatch):
    """--prompt run: the base and the adapter see the run's own system prompt, template and stop strings (a copy
    of the tiny run whose config names its own), and eval.md names that prompt per row."""
    import shutil

    import yaml

    from lmmr1_lite.config import load_yaml

    trained, files = setup
    run = tmp_path / "own_prompt_run"
    shutil.copytree(trained, run)
    cfg = {**load_yaml(run / "config.yaml"), "system_prompt": "be brief", "prompt_template": "{prompt} ? \\boxed{}",
           "stop_tokens": ["</answer>", "red"]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    seen = []
    real = benchmark_eval.generate

    def recording(policy, tokenizer, messages, **kwargs):
        seen.append((messages, kwargs["stop_strings"]))
        return real(policy, tokenizer, messages, **kwargs)
    monkeypatch.setattr(benchmark_eval, "generate", recording)
    out = tmp_path / "run_mode"
    assert main(["eval", "--benchmark", "math500", "--data", files[0], "--adapter", str(run / "adapter"),
                 "--prompt", "run", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert len(seen) == 2, "the base row and the adapter row"
    row = benchmarks.get("math500")
    question = row.question(ROWS["math500"][0])
    for messages, stops in seen:
        system, user = messages[0][0], messages[0][-1]
        assert system["role"] == "system" and cfg["system_prompt"] in str(system["content"])
        assert f"{question} ? \\boxed{{}}" in str(user["content"]) and "step by step" not in str(user["content"])
        assert stops == list(cfg["stop_tokens"])
    spec = benchmark_eval.PromptSpec.of("run", benchmark_eval.TrainConfig(**{**cfg, "output_dir": None}))
    table = (out / "eval.md").read_text()
    assert f"base (base_model), {spec.name}" in table and f"prompt of base (base_model), {spec.name}:" in table
    assert len(list((out / "predictions" / "math500").glob(f"*-{spec.name}-2.jsonl"))) == 2
    # another cap is another file: predictions are never reused across caps
    assert main(["eval", "--benchmark", "math500", "--data", files[0], "--adapter", str(run / "adapter"),
                 "--prompt", "run", "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert len(seen) == 4 and len(list((out / "predictions" / "math500").glob(f"*-{spec.name}-3.jsonl"))) == 2


def test_run_prompt_mode_needs_an_adapter(tmp_path, capsys):
    assert main(["eval", "--benchmark", "math500", "--model", "x", "--prompt", "run", "--out", str(tmp_path)]) == 2
    assert "give that run's --adapter" in capsys.readouterr().err


def test_sign_test_and_paired_counts():
    from lmmr1_lite.report import paired, sign_test_p

    assert sign_test_p(0, 0) == 1.0 and sign_test_p(3, 3) == 1.0
    assert sign_test_p(10, 5) == pytest.approx(0.30176, abs=1e-5)     # 2 * P(X <= 5), X ~ Bin(15, 1/2)
    assert sign_test_p(5, 10) == sign_test_p(10, 5)
    assert sign_test_p(6, 0) == pytest.approx(2 / 64)
    assert sign_test_p(70, 35) < 0.001
    base = {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0}
    now = {"a": 0.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0}                # "e" is not in both: not counted
    assert paired(base, now) == {"n": 4, "gained": 2, "lost": 1, "p": 1.0, "difference": 25.0}


def test_limit_says_what_it_dropped_and_bad_requests_are_one_line(setup, tmp_path, capsys):
    run, files = setup
    capsys.readouterr()
    assert main(["eval", "--benchmark", "math500", "--data", files[0], "--limit", "1", "--max-new-tokens", "2",
                 "--model", str(run / "base_model"),
                 "--out", str(tmp_path / "a")]) == 0
    assert "--limit 1: math500 evaluated on its first 1 of 2 rows (1 dropped)" in capsys.readouterr().out
    for argv, expected in ((["--benchmark", "mathvista2"], "not registered"),
                           (["--benchmark", "math500,gpqa_diamond", "--data", files[0]], "one per benchmark"),
                           (["--benchmark", "math500", "--data", files[0], "--limit", "0"], "--limit must be >= 1")):
        assert main(["eval", "--out", str(tmp_path / "b")] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err


def test_offline_hub_benchmark_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--benchmark", "math500", "--model", "x", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the network or a local copy" in err, err


def test_merge_folds_the_adapter_into_the_base_and_predicts_what_the_unmerged_adapter_does(setup, tmp_path,
                                                                                          monkeypatch):
    """--merge: generation sees a plain model (no LoRA layers), the rows and files say `merged`, and the merged
    fp32 weights give the unmerged adapter's greedy completions; the adapter is made strong enough (random LoRA
    B matrices) that its completions differ from the base's, so the comparison means something."""
    import shutil

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    trained, files = setup
    run = tmp_path / "strong_run"
    shutil.copytree(trained, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=generator) if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    models_seen = []
    real = benchmark_eval.generate

    def recording(policy, tokenizer, messages, **kwargs):
        models_seen.append(isinstance(policy, PeftModel))
        return real(policy, tokenizer, messages, **kwargs)
    monkeypatch.setattr(benchmark_eval, "generate", recording)

    def completions(out, pattern):
        [path] = (out / "predictions" / "math500").glob(pattern)
        return [json.loads(line)["completion"] for line in path.read_text().splitlines()]

    args = ["eval", "--benchmark", "math500", "--data", files[0], "--adapter", str(run / "adapter"), "--prompt", "cot",
            "--max-new-tokens", "6"]
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert models_seen == [False, True]
    assert main(args + ["--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert models_seen[2:] == [False, False], "the merged adapter generates as a plain model"
    unmerged = completions(tmp_path / "plain", "strong_run-*[0-9a-f]-cot-6.jsonl")
    assert completions(tmp_path / "plain", "base-cot-6.jsonl") != unmerged, "the adapter changes the answers"
    assert completions(tmp_path / "merged", "strong_run-*-merged-cot-6.jsonl") == unmerged
    assert "merged into the base weights" in (tmp_path / "merged" / "eval.md").read_text()


def test_pass_k_samples_k_completions_per_row_scores_them_and_resumes(setup, tmp_path, monkeypatch, capsys):
    """--pass-k with --benchmark: k sampled completions per row beside the greedy one, in a `-pass<k>` file;
    eval.json's pass@k and sampled accuracy are those samples' scores (any solved / mean); eval.md shows them;
    an interrupted sampling file resumes with only its missing row; a negative k is one line."""
    run, files = setup
    calls = []
    real = benchmark_eval.generate

    def recording(policy, tokenizer, messages, **kwargs):
        calls.append((len(messages), kwargs["num_generations"], kwargs.get("greedy", False)))
        return real(policy, tokenizer, messages, **kwargs)
    monkeypatch.setattr(benchmark_eval, "generate", recording)
    out = tmp_path / "ev"
    args = ["eval", "--benchmark", "math500", "--data", files[0], "--model", str(run / "base_model"), "--prompt", "cot",
            "--max-new-tokens", "5", "--pass-k", "3", "--batch-size", "6", "--out", str(out)]
    assert main(args) == 0
    assert calls == [(2, 1, True), (2, 3, False)], "the greedy pass, then 2 prompts x 3 samples (6 sequences)"
    sampled = out / "predictions" / "math500" / "base-cot-5-pass3.jsonl"
    records = [json.loads(line) for line in sampled.read_text().splitlines()]
    assert len(records) == 2 and all(len(r[key]) == 3 for r in records for key in ("scores", "tokens", "completions"))
    assert any(len(set(r["completions"])) > 1 for r in records), "sampled, not greedy"
    result = json.loads((out / "eval.json").read_text())["results"]["base (base_model), cot"]["math500"]
    assert result["pass@3"] == sum(max(r["scores"]) for r in records) / 2
    assert result["sampled_accuracy"] == sum(sum(r["scores"]) for r in records) / 6
    assert result["temperature"] == 1.0 and "| sampled accuracy | pass@3 |" in (out / "eval.md").read_text()

    sampled.write_text(sampled.read_text().splitlines()[0] + "\n")  # the second row's samples lost
    calls.clear()
    assert main(args) == 0
    assert calls == [(1, 3, False)], "only the missing row is sampled again; the greedy file is complete"
    capsys.readouterr()
    assert main(args[:-2] + ["--pass-k", "-1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--pass-k must be >= 1" in err, err
