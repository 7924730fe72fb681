"""GSM8K as published: the data preset, the benchmark's rule, the 100 shipped test problems, and the
generated multi-step task the real-model FRE config trains on."""
import json
import random
import re
import time

import pytest

from lmmr1_lite import tasks
from lmmr1_lite.benchmarks import get, gsm8k
from lmmr1_lite.cli import main
from lmmr1_lite.data import load_rows
from lmmr1_lite.rewards import boxed_format_reward

ROW = {"question": "Tom has 3 bags of 4 apples and buys 1,000 more. How many apples does he have?",
       "answer": "3 bags * 4 = <<3*4=12>>12 apples.\n12 + 1,000 = <<12+1000=1012>>1,012\n#### 1,012"}


def test_gold_is_the_number_after_the_last_marker_without_separators():
    assert gsm8k.gold_number(ROW["answer"]) == "1012"
    assert get("gsm8k").gold(ROW) == "1012"


@pytest.mark.parametrize("completion, score", [
    ("12 + 1000 = 1012.\nSo the answer is $\\boxed{1012}$.", 1.0),   # boxed
    ("<think>sum</think><answer>1,012</answer>", 1.0),                # tagged, with a separator
    ("He has 12 apples, then 1000 more: 1,012 apples in total.", 1.0),  # prose: the last number
    ("The answer is 1012 apples.", 1.0),
    ("So he has $1,012.", 1.0),
    ("He ends with 1012 apples, and 3 bags.", 0.0),                   # the last number is 3
    ("\\boxed{1013}", 0.0),
    ("no idea", 0.0),
    ("", 0.0),
])
def test_extraction_then_last_number(completion, score):
    assert get("gsm8k").score(ROW, completion) == score


def test_lm_eval_filters_as_options():
    bench = gsm8k.GSM8K(**{k: getattr(get("gsm8k"), k) for k in ("name", "paper_column", "modality", "hub_id",
                                                                  "split", "config", "required")})
    bench.filter = "strict-match"  # lm-eval gsm8k-cot-zeroshot: the first "The answer is N."
    assert bench.score(ROW, "in total 1,012 apples") == 0.0 and bench.score(ROW, "\\boxed{1012}") == 0.0
    assert bench.score(ROW, "The answer is 1,012. Check: 12 + 1000.") == 1.0
    assert bench.score(ROW, "The answer is 1013. No: the answer is 1012.") == 0.0  # the first match counts
    bench.filter = "flexible-extract"  # the last number-like match, compared as text
    assert bench.score(ROW, "in total $1,012.") == 1.0 and bench.score(ROW, "1012.00") == 0.0
    assert bench.score(ROW, "So it is $\\boxed{1012}$.") == 0.0  # lm-eval reads "$." here; so do we
    assert bench.rule == gsm8k.RULES["flexible-extract"] and bench.scoring == "flexible-extract"
    assert "last number" in get("gsm8k").rule and get("gsm8k").filter == "kit"
    assert get("gsm8k").variants(ROW, "So it is $\\boxed{1012}$.") == {"flexible-extract": False,
                                                                      "strict-match": False}
    assert get("gsm8k").score(ROW, "So it is $\\boxed{1012}$.") == 1.0


def test_last_number_is_linear_on_hostile_text():
    start = time.perf_counter()
    assert gsm8k.last_number("1," * 500_000 + " x") == "1" * (gsm8k.TAIL_CHARS // 2 - 1)  # only the tail is read
    assert gsm8k.last_number("7 " + "x" * 1_000_000) is None
    assert gsm8k.last_number("9" * 2_000_000) == "9" * gsm8k.TAIL_CHARS
    assert time.perf_counter() - start < 0.5


def test_preset_reads_hub_rows_and_names_a_bad_row(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    from lmmr1_lite.data import DataOptions

    rows, report = load_rows(path, options=DataOptions(preset="gsm8k", on_bad_row="skip"))
    assert [(e.prompt, e.answer) for e in rows] == [(ROW["question"], "1012")]
    assert sum(report.skipped.values()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "answer": "no marker"}) + "\n")
    assert main(["data", "validate", str(bad), "--data-preset", "gsm8k"]) == 2


def test_shipped_test_problems_are_gsm8k_test_rows(tmp_path):
    rows = gsm8k.shipped_test_rows()
    assert len(rows) == 100 and len({r["id_orig"] for r in rows}) == 100
    assert all(r["answer"].rstrip().split("####")[-1].strip() for r in rows)
    shark = [r for r in rows if r["question"].startswith("Benny saw a 10-foot shark")]
    assert shark and shark[0]["id_orig"] == 473 and gsm8k.gold_number(shark[0]["answer"]) == "10"
    path = gsm8k.write_shipped_test(tmp_path / "test.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows


@pytest.mark.parametrize("task", ["multi_step", "grade_school"])
def test_generated_word_problems_are_verifiable_and_disjoint_from_gsm8k(task):
    train, test = tasks.generate(task, 500, 50, seed=0, level=2)
    assert {e.prompt for e in test}.isdisjoint(e.prompt for e in train)
    shipped = {r["question"] for r in gsm8k.shipped_test_rows()}
    assert shipped.isdisjoint(e.prompt for e in train + test)
    assert all(int(e.answer) >= 0 for e in train)
    kinds = {e.prompt.split(" ")[1] for e in train}
    assert len(kinds) > 5


def test_grade_school_answers_follow_from_the_numbers_in_the_prompt():
    """Spot checks of the templates whose reading GSM8K tests: units, percentages, working backwards, rounding up."""
    from lmmr1_lite import grade_school as gs

    def one(template, seed=0):
        rng = random.Random(seed)
        while (drawn := template(rng, 2, "Ann", "Ben")) is None:
            pass
        return drawn[0], drawn[1], [float(n) for n in re.findall(r"\d+(?:\.\d+)?", drawn[0])]

    prompt, answer, (feet, inches) = one(gs.rope_pieces)
    assert answer * inches == feet * 12
    prompt, answer, (students, teachers, seats) = one(gs.buses_needed)
    assert (answer - 1) * seats < students + teachers <= answer * seats
    prompt, answer, (gave, left) = one(gs.work_backwards)
    assert (answer - gave) / 2 == left
    prompt, answer, (students, girls, _, third) = one(gs.class_percent)
    boys = students * (100 - girls) / 100
    assert answer == boys - boys / third
    prompt, answer, (wage, first, rate, over, hours) = one(gs.overtime)
    assert answer == wage * first + (hours - over) * wage * rate and (first, rate, over) == (40, 1.5, 40)
    for seed in range(200):  # every template, many draws: whole, non-negative answers
        example = gs.grade_school(random.Random(seed), 3)
        assert int(example.answer) >= 0 and example.meta["template"] in {t.__name__ for t in gs.TEMPLATES}


@pytest.mark.parametrize("completion, ok", [
    ("so \\boxed{5}", 1.0), ("so $\\boxed{5}$.", 1.0), ("so \\(\\boxed{5}\\)", 1.0), ("**\\boxed{5}**", 1.0),
    ("\\boxed{5} and then more text", 0.0), ("\\boxed{1} or \\boxed{2}", 0.0), ("\\boxed{}", 0.0), ("5", 0.0),
])
def test_boxed_format_allows_closing_math_delimiters_only(completion, ok):
    assert boxed_format_reward(completion) == ok
