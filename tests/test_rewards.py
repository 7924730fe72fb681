"""Rewards: an equivalence table with hostile cases, exact scores, a time bound, and fuzzing."""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmmr1_lite import rewards, verifier
from lmmr1_lite.data import Example
from lmmr1_lite.config import ConfigError


def wrap(answer: str, think: str = "let me think") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# (predicted answer inside <answer>, gold answer, expected accuracy)
EQUIVALENCE = [
    # plain numbers and words (compared exactly: huge numbers do not collapse to "inf")
    ("1" + "0" * 400, "2" + "0" * 400, 0.0), ("7", "7", 1.0), ("7.0", "7", 1.0), ("-3", "-3", 1.0), ("8", "7", 0.0), ("07", "7", 1.0),
    ("yes", "yes", 1.0), ("Yes", "yes", 1.0), ("no", "yes", 0.0),
    # fractions vs decimals
    ("0.5", "\\frac{1}{2}", 1.0), ("\\frac{1}{2}", "0.5", 1.0), ("1/2", "\\frac{1}{2}", 1.0),
    ("\\dfrac{3}{4}", "0.75", 1.0), ("0.33", "\\frac{1}{3}", 0.0), ("\\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{3}", "\\frac{1}{2}", 0.0),
    # radicals
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", 1.0), ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("2\\sqrt{3}", "\\sqrt{12}", 1.0), ("\\sqrt{3}", "\\sqrt{2}", 0.0),
    # degrees, percentages
    ("30^\\circ", "30", 1.0), ("30^{\\circ}", "30^\\circ", 1.0), ("45^\\circ", "30", 0.0),
    ("50\\%", "50", 1.0), ("25\\%", "50\\%", 0.0),
    # thousands separators
    ("1,000", "1000", 1.0), ("1{,}000", "1000", 1.0), ("12,345", "12345", 1.0), ("1,001", "1000", 0.0),
    # equations and units
    ("x = 3", "3", 1.0), ("x=3", "3", 1.0), ("y = 4", "3", 0.0),
    ("3 cm", "3", 1.0), ("3\\text{ apples}", "3", 1.0), ("12 \\text{ m}^2", "12", 1.0), ("5 cm", "3", 0.0),
    # tuples, intervals, sets
    ("(1, 2)", "(1,2)", 1.0), ("(2, 1)", "(1,2)", 0.0), ("[0, 1)", "[0,1)", 1.0), ("[0, 1]", "[0,1)", 0.0),
    ("\\{1, 2\\}", "\\{2, 1\\}", 1.0), ("\\{1, 3\\}", "\\{1, 2\\}", 0.0),
    # multiple choice
    ("A", "A", 1.0), ("(A)", "A", 1.0), ("B", "A", 0.0), ("(C)", "C", 1.0), ("D", "(C)", 0.0),
    # boxed inside the answer tag, and dollars
    ("\\boxed{5}", "5", 1.0), ("The answer is \\boxed{5}", "5", 1.0), ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("$6$", "6", 1.0), ("\\boxed{4}", "5", 0.0),
    # algebraic forms
    ("2x+2", "2(x+1)", 1.0), ("x^2-1", "(x-1)(x+1)", 1.0), ("x^2+1", "(x-1)(x+1)", 0.0), ("\\pi", "\\pi", 1.0),
    # hostile: stalls, junk, empty
    ("2^{2^{2^{2^{2^{2}}}}}", "7", 0.0), ("9^{9^{9^{9}}}", "3", 0.0), ("{" * 300, "1", 0.0),
    ("}}}{{{", "1", 0.0), ("\\frac{1}{", "1", 0.0), ("1" * 5000, "1", 0.0), ("", "7", 0.0),
    ("__import__('os').system('echo hacked')", "0", 0.0), ("\\x" * 50, "1", 0.0),
]


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    verifier.pool().warm_up()


def test_table_is_large_enough():
    assert len(EQUIVALENCE) >= 60
    assert {e for _, _, e in EQUIVALENCE} == {0.0, 1.0}


@pytest.mark.parametrize("predicted,gold,expected", EQUIVALENCE)
def test_accuracy_table(predicted, gold, expected):
    start = time.perf_counter()
    assert rewards.accuracy_reward(wrap(predicted), gold) == expected
    assert time.perf_counter() - start < 1.0


def test_accuracy_batch_matches_single_calls_and_counts_timeouts():
    completions = [wrap(p) for p, _, _ in EQUIVALENCE]
    golds = [g for _, g, _ in EQUIVALENCE]
    _, parts, counts = rewards.score(completions, examples(golds), {"accuracy": 1.0})
    assert parts["accuracy"] == [e for _, _, e in EQUIVALENCE]
    # the power towers are rejected by the verifier's structural scan before any worker sees them (they used
    # to time out); timeouts are counted in tests/test_verifier_limits.py
    assert counts["reward_rejected"] >= 6, "power towers, over-long and brace-unbalanced answers are rejected unparsed"


@pytest.mark.parametrize("completion,gold,expected", [
    ("<think>the answer is 7</think><answer>9</answer>", "7", 0.0),   # thinking never counts
    ("<think>\\boxed{7}</think><answer>9</answer>", "7", 0.0),
    ("<think>\\boxed{7}</think>", "7", 0.0),                           # boxed only inside think
    ("no tags at all, 7", "7", 0.0),
    ("reasoning... so \\boxed{7}", "7", 1.0),                          # boxed style without tags
    ("\\boxed{3} then \\boxed{7}", "7", 1.0),                          # the last box wins
    ("<think>x</think><answer>1</answer><answer>7</answer>", "7", 1.0),  # last answer (format pays 0)
])
def test_where_the_answer_is_read(completion, gold, expected):
    assert rewards.accuracy_reward(completion, gold) == expected


FORMAT_CASES = [
    ("<think>a</think><answer>7</answer>", 1.0),
    ("<think></think><answer>7</answer>", 1.0),
    ("  <think>x\ny</think>\n<answer> 7 </answer>\n", 1.0),
    ("<think>a</think><answer></answer>", 0.0),
    ("<think>a</think>x<answer>7</answer>", 0.0),
    ("<answer>7</answer><think>a</think>", 0.0),
    ("<think>a<think>b</think><answer>7</answer>", 0.0),
    ("<think>a</think><answer>7</answer><answer>8</answer>", 0.0),
    ("<think>a</think><answer>7</answer> trailing", 0.0),
    ("7", 0.0),
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert rewards.format_reward(completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("First 2+2=4, so \\boxed{4}", 1.0), ("\\boxed{4}.", 1.0), ("\\boxed{}", 0.0),
    ("\\boxed{1} and \\boxed{2}", 0.0), ("\\boxed{4} but wait", 0.0), ("no box", 0.0),
])
def test_boxed_format_reward(completion, expected):
    assert rewards.boxed_format_reward(completion) == expected


def test_tag_reward_is_partial_in_order():
    assert rewards.tag_reward("<think>") == 0.25
    assert rewards.tag_reward("<think></think><answer>") == 0.75
    assert rewards.tag_reward("<think></think><answer>1</answer>") == 1.0
    assert rewards.tag_reward("</think><think>") == 0.25  # <think> found; </think> not after it
    assert rewards.tag_reward("</think><answer>") == 0.0
    assert rewards.tag_reward("<think><think>") == 0.0


def examples(golds, **meta):
    return [Example(prompt="q", answer=gold, meta=dict(meta)) for gold in golds]


def test_score_weights_components_and_reports_format_accuracy():
    totals, parts, _ = rewards.score([wrap("7"), "junk"], examples(["7", "7"]), {"accuracy": 1.0, "tags": 0.5})
    assert totals == [1.5, 0.0] and parts["format"] == [1.0, 0.0] and parts["tags"] == [1.0, 0.0]
    totals, _, _ = rewards.score([wrap("7"), wrap("8"), "7"], examples(["7", "7", "7"]), {"format": 0.5, "accuracy": 1.0})
    assert totals == [1.5, 0.5, 0.0], "LMM-R1's default: 0.5 x format + accuracy"
    with pytest.raises(ConfigError, match="unknown reward"):
        rewards.score(["x"], examples(["y"]), {"nope": 1.0})


def test_a_reward_that_raises_or_miscounts_pays_zero_and_is_counted():
    @rewards.reward("fragile_test")
    def fragile(completions, examples):
        return [1.0 / len(c) for c in completions]

    @rewards.reward("short_test")
    def miscounted(completions, examples):
        return [1.0]
    try:
        totals, _, counts = rewards.score(["ab", ""], examples(["", ""]), {"fragile_test": 1.0})
        assert totals == [0.0, 0.0] and counts["reward_errors"] == 2
        totals, _, counts = rewards.score(["ab", "c"], examples(["", ""]), {"short_test": 1.0, "format": 0.5})
        assert totals == [0.0, 0.0] and counts["reward_errors"] == 2
    finally:
        rewards.REWARDS.pop("fragile_test")
        rewards.REWARDS.pop("short_test")


def test_a_reward_sees_the_example_it_scores():
    @rewards.reward("mentions_topic_test")
    def mentions(completions, examples):
        return [1.0 if e.meta["topic"] in c else 0.0 for c, e in zip(completions, examples)]
    try:
        rows = examples(["", ""], topic="cats")
        rows[1].meta["topic"] = "dogs"
        totals, _, _ = rewards.score(["about cats", "about cats"], rows, {"mentions_topic_test": 2.0})
        assert totals == [2.0, 0.0]
    finally:
        rewards.REWARDS.pop("mentions_topic_test")


def test_sokoban_reward_reads_the_level_from_the_example():
    level = "#####/#@$.#/#####"
    rows = [Example(prompt="push", answer="right", meta={"level": level}), Example(prompt="push", answer="right")]
    _, parts, _ = rewards.score(["<answer>R</answer>"] * 2, rows, {"sokoban": 1.0})
    assert parts["sokoban"] == [1.0, 0.0], "solved on its level; no level, no reward"
    _, parts, _ = rewards.score(["<answer>left</answer>"], rows[:1], {"sokoban": 1.0})
    assert parts["sokoban"] == [0.0]
    assert rewards.task_reward({"sokoban": 1.0, "format": 0.5}) == "sokoban"
    assert rewards.task_reward({"format": 0.5, "accuracy": 1.0}) == "accuracy"


PIECES = list("0123456789+-*/^{}()[]\\,.=x $%") + ["\\frac", "\\sqrt", "\\boxed{", "^{", "<answer>", "</answer>",
                                                   "<think>", "</think>", "2^{2^{2^{", "9^{9^{"]
LATEXISH = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(LATEXISH, st.text(max_size=200)), gold=st.sampled_from(["7", "\\frac{1}{2}", "A", "(1,2)"]))
def test_fuzz_never_raises_and_stays_bounded(body, gold):
    for completion in (body, wrap(body)):
        start = time.perf_counter()
        for fn in (rewards.accuracy_reward, rewards.format_reward, rewards.boxed_format_reward, rewards.tag_reward):
            assert fn(completion, gold) in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert time.perf_counter() - start < 1.0 * 2  # accuracy (< 1 s) plus three regex rewards
