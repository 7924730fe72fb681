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
    victim = out / "predictions" / "math500" / "base-cot.jsonl"
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines[:-1]) + "\n")
    generated.clear()
    assert evaluate(run, files, out) == 0
    assert generated == [1], "resumed: rows already predicted are not generated again"
    assert len(victim.read_text().splitlines()) == len(lines)


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
