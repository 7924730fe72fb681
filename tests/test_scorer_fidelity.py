"""Benchmark scoring that agrees with each benchmark's official rule on prose answers (issue 26).

Part 1: each failure class of the issue, with answers that must score 1 and answers that must score 0.
Part 2 (below): differential tests against the official implementations (lighteval, lmms-eval's task utilities,
lm-evaluation-harness), on generated (row, completion) pairs covering each answer form of each benchmark.
"""
import re
import time
from pathlib import Path

import pytest

from lmmr1_lite import benchmarks, verifier
from lmmr1_lite.benchmarks import gpqa
from lmmr1_lite.benchmarks.choices import named_letters, nearest, resolve
from lmmr1_lite.benchmarks.extract import extract_answer


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    verifier.pool().warm_up()


def r1(answer: str) -> str:
    return f"<think>Reasoning.</think><answer>{answer}</answer>"


def mathvista(pid, answer, choices=None, answer_type="integer", precision=None, unit=None):
    kind = "multi_choice" if choices else "free_form"
    return {"pid": pid, "question": "q", "image": None, "decoded_image": None, "choices": choices, "unit": unit,
            "precision": precision, "answer": answer, "question_type": kind,
            "answer_type": "text" if choices else answer_type, "metadata": {}, "query": "q"}


def mathvision(answer, options=()):
    return {"id": "1", "question": "q", "options": list(options), "image": None, "decoded_image": None,
            "answer": answer, "solution": None, "level": 1, "subject": "s"}


def mathverse(answer, question_type="multi-choice", choices="\nChoices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}"):
    question = "Find BC." + choices
    return {"sample_index": "1", "problem_index": "1", "problem_version": "Text Lite", "question": question,
            "image": "", "answer": answer, "question_type": question_type, "metadata": {}, "query_wo": "",
            "query_cot": "", "question_for_eval": question}


def olympiad(final_answer, error=None, answer_type="Numerical", multiple=False, unit=None):
    return {"id": 1, "question": "q", "final_answer": [final_answer], "is_multiple_answer": multiple, "unit": unit,
            "answer_type": answer_type, "error": error, "subfield": "Algebra"}


MATH500 = {"problem": "p", "answer": "56", "unique_id": "u"}
FRACTION = {"problem": "p", "answer": "\\frac{14}{3}", "unique_id": "v"}
GSM8K = {"question": "q", "answer": "... \n#### 56"}
CHOICE = mathvista("1", "8/11", choices=["3/11", "8/11", "6/11", "3/5"])
SOLUTION = mathvista("2", "Solution C", choices=["Solution A", "Solution B", "Solution C", "Solution D"])
MMSTAR = {"index": 0, "question": "How many?\nOptions: A: 2, B: 3, C: 4, D: 5", "image": None, "answer": "C"}
MMSTAR_TEXT = {"index": 1, "question": "Which?\nOptions: A: Solution A, B: Solution B, C: Solution A and B, D: none",
               "image": None, "answer": "C"}


def score(name, row, completion):
    return benchmarks.score(name, row, completion)


# ------------------------------------------------------------------------------------------------
# 1. A prose answer (a concluding sentence, a bare final value) is read
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, row, completion, expected", [
    ("math500", MATH500, "Each costs 8 dollars and there are 7.\nSo she pays 56 dollars in total.", 1.0),
    ("math500", MATH500, "Seven at 8 dollars each.\n\n56", 1.0),                      # a bare final value
    ("math500", FRACTION, "Dividing by 3:\nThus $x = \\frac{14}{3}$.", 1.0),          # a formula ends it
    ("math500", MATH500, "So she pays 57 dollars in total.", 0.0),
    ("math500", MATH500, "She pays 56 dollars for the food. The tip is 8 dollars.", 0.0),  # last sentence: 8
    ("gsm8k", GSM8K, "So she pays 56 dollars in total.", 1.0),
    ("gsm8k", GSM8K, "So she pays 65 dollars in total.", 0.0),
    ("mathvista", CHOICE, "Eight of eleven parts are blue.\nHence the correct option is (B) 8/11.", 1.0),
    ("mathvista", CHOICE, "Hence the correct option is (A) 3/11.", 0.0),
    ("mathvista", CHOICE, "Eight of the eleven parts are blue, so the fraction is 8/11.", 1.0),
    ("mathvista", CHOICE, "Three of the eleven parts are blue, so the fraction is 3/11.", 0.0),
    ("mathvista", mathvista("3", "56"), "There are 7 rows of 8.\nSo there are 56 dots in total.", 1.0),
    ("mathvista", mathvista("3", "56"), "So there are 55 dots in total.", 0.0),
    ("mmstar", MMSTAR, "I count them one by one.\nThe best option is C.", 1.0),
    ("mmstar", MMSTAR, "I count them one by one.\nThe best option is D.", 0.0),
    ("gpqa_diamond", {"Question": "Which carries light?", "Correct Answer": "photon", "Incorrect Answer 1": "gluon",
                      "Incorrect Answer 2": "W boson", "Incorrect Answer 3": "graviton"}, None, None),
])
def test_prose_answers_are_read(name, row, completion, expected):
    if name == "gpqa_diamond":  # the letter depends on the seeded shuffle
        choices, gold = gpqa.options(row)
        wrong = next(letter for letter in "ABCD" if letter != gold)
        assert score(name, row, f"Photons carry light.\nHence the correct option is ({gold}).") == 1.0
        assert score(name, row, f"Photons carry light.\nHence the correct option is ({wrong}).") == 0.0
        return
    assert score(name, row, completion) == expected


# ------------------------------------------------------------------------------------------------
# 2. A hedged answer naming several options scores 0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, row, completion", [
    ("mathvista", CHOICE, "The answer is (A), (B), and (C)."),
    ("mathvista", CHOICE, "It is either B or D."),
    ("mathvista", CHOICE, r1("B or D")),
    ("mmstar", MMSTAR, "The answer is (A), (C), and (D)."),
    ("mmstar", MMSTAR, "Counting is hard here, so it is either C or D."),
    ("mmstar", MMSTAR, "\\boxed{C, D}"),
    ("mathverse", mathverse("C"), "The answer is either C or D."),
])
def test_hedged_answers_score_zero(name, row, completion):
    assert score(name, row, completion) == 0.0


@pytest.mark.parametrize("name, row, completion", [  # one option named, whatever else the sentence says
    ("mathvista", CHOICE, "The answer is (B)."),
    ("mmstar", MMSTAR, "A quick count gives four, so C."),          # "A" before a word is the article
    ("mmstar", MMSTAR, "\\boxed{C}"),
    ("mathverse", mathverse("C"), "Not A or B: the answer is C."),  # the text after the last phrase counts
])
def test_a_single_option_still_reads(name, row, completion):
    assert score(name, row, completion) == 1.0


def test_named_letters():
    assert named_letters("(A), (C), and (E)", "ABCDE") == {"A", "C", "E"}
    assert named_letters("either B or D", "ABCD") == {"B", "D"}
    assert named_letters("A quick check gives D", "ABCD") == {"D"}
    assert named_letters("The suitcase is on the book.", "ABCD") == set()
    assert named_letters("ABC and \\B", "ABCD") == set()  # inside a word or after a backslash
    assert named_letters("A or B", "ABCD") == {"A", "B"}


# ------------------------------------------------------------------------------------------------
# 3. An option whose text ends in a capital reads as its own letter; a lower-case letter reads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, row, completion, expected", [
    ("mathvista", SOLUTION, "(C) Solution C", 1.0),
    ("mathvista", SOLUTION, "I compared them.\n(C) Solution C", 1.0),
    ("mathvista", SOLUTION, "(A) Solution A", 0.0),
    ("mmstar", MMSTAR_TEXT, "(C) Solution A and B", 1.0),
    ("mmstar", MMSTAR_TEXT, "(A) Solution A", 0.0),
    ("mmstar", MMSTAR, "c", 1.0),
    ("mmstar", MMSTAR, "(c)", 1.0),
    ("mmstar", MMSTAR, "a", 0.0),
    ("mathvista", CHOICE, "b", 1.0),
    ("mathvista", CHOICE, "d", 0.0),
])
def test_option_text_ending_in_a_capital_and_lower_case_letters(name, row, completion, expected):
    assert score(name, row, completion) == expected


def test_lower_case_letter_only_as_the_whole_answer():
    assert extract_answer("a", "ABCD") == "A"
    assert extract_answer("a cat sat on the mat", "ABCD") is None


# ------------------------------------------------------------------------------------------------
# 4. The nearest-option fallback reads short answers only
# ------------------------------------------------------------------------------------------------
def test_nearest_option_only_for_short_answers():
    options = {"A": "3/11", "B": "8/11", "C": "6/11", "D": "3/5"}
    assert nearest("8/1l", options) == "B"
    assert nearest("The shape has eleven parts and some of them are shaded in a darker colour than others", options) \
        is None
    assert nearest("A or B", options) is None
    long_answer = "Looking at the figure carefully, I think the shaded part is roughly a third of the whole thing"
    assert score("mathvista", CHOICE, long_answer) == 0.0
    assert score("mathvista", CHOICE, "\\boxed{8/1l}") == 1.0


# ------------------------------------------------------------------------------------------------
# 5. MATH-V: its official rule by default, the lenient one only when asked
# ------------------------------------------------------------------------------------------------
MV_CHOICE = mathvision("D", ["3/11", "5/11", "6/11", "8/11", "1"])
MV_FREE = mathvision("2\\sqrt{3}")
MV_NUMBER = mathvision("0.75")


@pytest.mark.parametrize("row, completion, official, lenient", [
    (MV_CHOICE, "\\boxed{D}", 1.0, 1.0),
    (MV_CHOICE, "So the answer is D.", 1.0, 1.0),
    (MV_CHOICE, "D\nBecause eight parts of eleven are blue.", 1.0, 1.0),
    (MV_CHOICE, r1("D"), 1.0, 1.0),
    (MV_CHOICE, "\\boxed{8/11}", 1.0, 1.0),               # the gold option's text: their is_equal(value, ...)
    (MV_CHOICE, "\\boxed{(D) 8/11}", 0.0, 1.0),           # letter and text in the box: their rule rejects it
    (MV_CHOICE, "Option D", 0.0, 1.0),
    (MV_CHOICE, "Eight parts of eleven.\nThe answer is Option D", 0.0, 1.0),
    (MV_CHOICE, "\\boxed{C}", 0.0, 0.0),
    (MV_FREE, "\\boxed{2\\sqrt{3}}", 1.0, 1.0),
    (MV_FREE, "\\boxed{2\\sqrt3}", 1.0, 1.0),             # their _fix_sqrt
    (MV_FREE, "\\boxed{\\sqrt{12}}", 0.0, 1.0),           # symbolic values compare as text there
    (MV_NUMBER, "The ratio is \\boxed{\\frac{3}{4}}", 1.0, 1.0),   # rational values rounded to 2 decimals
    (MV_NUMBER, "so the ratio is 0.75.", 1.0, 1.0),
    (MV_NUMBER, "\\boxed{0.7}", 0.0, 0.0),
])
def test_mathvision_follows_the_official_rule_by_default(row, completion, official, lenient):
    bench = benchmarks.get("mathvision")
    assert bench.lenient is False and "official" in bench.rule
    assert bench.score(row, completion) == official
    bench.lenient = True
    try:
        assert "lenient" in bench.rule
        assert bench.score(row, completion) == lenient
    finally:
        bench.lenient = False


# ------------------------------------------------------------------------------------------------
# 6. MathVerse multiple-choice golds that are not a single letter
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gold", ["C", "(C)", "C:√{3}", "C. √{3}", "√{3}"])
def test_mathverse_golds_in_every_form(gold):
    row = mathverse(gold)
    assert score("mathverse", row, "\\boxed{C}") == 1.0
    assert score("mathverse", row, "BC is √{3}, so the answer is C.") == 1.0
    assert score("mathverse", row, "\\boxed{B}") == 0.0


def test_mathverse_gold_naming_no_option_compares_as_maths():
    row = mathverse("\\frac{1}{2}", choices="")
    assert score("mathverse", row, "\\boxed{0.5}") == 1.0 and score("mathverse", row, "\\boxed{2}") == 0.0


# ------------------------------------------------------------------------------------------------
# 7. OlympiadBench: long golds, scientific notation with tolerance, `x = v` against `v`
# ------------------------------------------------------------------------------------------------
TWELVE = ", ".join(str(n) for n in range(1, 13))


@pytest.mark.parametrize("row, completion, expected", [
    (olympiad(TWELVE, multiple=True), f"So the final answer is \\boxed{{{TWELVE}}}.", 1.0),
    (olympiad(TWELVE, multiple=True), "So the final answer is \\boxed{" + ", ".join(str(n) for n in range(12, 0, -1))
     + "}.", 1.0),
    (olympiad(TWELVE, multiple=True), "So the final answer is \\boxed{" + ", ".join(str(n) for n in range(1, 12))
     + "}.", 0.0),
    (olympiad("$7.1 \\times 10^{35}$", error="5e34"), "So the final answer is \\boxed{7.4 \\cdot 10^{35}}.", 1.0),
    (olympiad("$7.1 \\times 10^{35}$", error="5e34"), "So the final answer is \\boxed{8.3 \\cdot 10^{35}}.", 0.0),
    (olympiad("$7.1 \\times 10^{35}$", error="5e34"), "So the final answer is \\boxed{7.1e35}.", 1.0),
    (olympiad("$x = 5$", answer_type="Expression"), "So the final answer is \\boxed{5}.", 1.0),
    (olympiad("$x = 5$", answer_type="Expression"), "So the final answer is \\boxed{6}.", 0.0),
    (olympiad("$5$", answer_type="Expression"), "So the final answer is \\boxed{x = 5}.", 1.0),
    (olympiad("$x = 5$", answer_type="Expression"), "So the final answer is \\boxed{x = 5}.", 1.0),
])
def test_olympiadbench_items_tolerance_and_equations(row, completion, expected):
    assert score("olympiadbench", row, completion) == expected


# ------------------------------------------------------------------------------------------------
# 8. A boxed currency value
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, row, completion, expected", [
    ("math500", {"problem": "p", "answer": "34", "unique_id": "w"}, "\\boxed{\\$34}", 1.0),
    ("math500", {"problem": "p", "answer": "34", "unique_id": "w"}, "\\boxed{\\$35}", 0.0),
    ("gsm8k", {"question": "q", "answer": "#### 34"}, "She pays \\boxed{\\$34}.", 1.0),
    ("mathvista", mathvista("4", "34"), "\\boxed{\\$34}", 1.0),
    ("mathvista", mathvista("5", "34.50", answer_type="float", precision=2), "\\boxed{\\$34.50}", 0.0),  # 34.5
])
def test_boxed_currency_is_stripped(name, row, completion, expected):
    assert score(name, row, completion) == expected


# ------------------------------------------------------------------------------------------------
# Linear time: the new rules on hostile input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hostile", [
    "1," * 500_000, "$" * 1_000_000, "(A), " * 200_000, "either B or " * 100_000, "So " * 300_000 + "56",
    "oxed{" * 200_000, "the answer is " * 100_000 + "(C)", "\\cdot 10^{" * 100_000,
])
def test_new_rules_are_linear_on_hostile_input(hostile):
    start = time.perf_counter()
    extract_answer(hostile, "ABCD")
    resolve(hostile[:1000], {"A": "1", "B": "2"})
    for name, row in (("mathvision", MV_CHOICE), ("mathvista", CHOICE), ("mmstar", MMSTAR), ("gsm8k", GSM8K),
                      ("olympiadbench", olympiad(TWELVE, multiple=True))):
        score(name, row, hostile)
    assert time.perf_counter() - start < 2.0


# ================================================================================================
# Part 2: differential tests against the official implementations
# ================================================================================================
# (row, completion) pairs in every answer form of each benchmark, right and wrong answers, prose included,
# scored by ours and by the official rule-based code (tests/oracles.py). Per benchmark the two agree on at
# least 98 % of the pairs, except forms listed in DIFFERENCES (and in docs/scoring.md's table, with the reason).
import oracles  # noqa: E402  (tests/ is on sys.path under pytest)

REASONING = "Let me work through it step by step.\nFirst I look at what is given, then I compute what is asked."


def free_forms(a: str, number: bool) -> dict[str, str]:
    """A free-form answer `a` stated in each way a model writes it."""
    forms = {
        "bare" if number else "bare formula": a,
        "boxed": f"{REASONING}\n\\boxed{{{a}}}",
        "boxed sentence": f"{REASONING}\nTherefore, the final answer is: $\\boxed{{{a}}}$. I hope it is correct",
        "final answer is": f"{REASONING}\nSo the final answer is ${a}$.",
        "answer is": f"{REASONING}\nThe answer is ${a}$.",
        "answer colon": f"{REASONING}\nAnswer: ${a}$",
        "lmmr1": f"<think>{REASONING}</think><answer>{a}</answer>",
        "lmmr1 boxed": f"<think>{REASONING}</think><answer>\\boxed{{{a}}}</answer>",
        "prose formula": f"{REASONING}\nThus we get $x = {a}$.",
        "last line": f"{REASONING}\n\n${a}$",
        "bold final answer": f"{REASONING}\n**Final Answer:** ${a}$",
        "boxed then a check": f"{REASONING}\nSo $\\boxed{{{a}}}$.\nCheck: it fits the question.",
    }
    if number:
        forms["prose"] = f"{REASONING}\nSo the result is {a} in total."
        forms["prose bare number"] = f"{REASONING}\n\n{a}"
        forms["prose with unit"] = f"{REASONING}\nTherefore, the total is {a} dollars."
        forms["prose equals"] = f"{REASONING}\nHence the value equals {a}."
    return forms


def choice_forms(letter: str, text: str, other: str) -> dict[str, tuple[str, str]]:
    """An option (its letter and text) stated in each way a model writes it, with what a perfect extractor
    (the official GPT step) reads from it; `other` is another letter."""
    hedge = f"either {letter} or {other}"
    return {
        "letter": (letter, letter),
        "letter parenthesised": (f"({letter})", letter),
        "letter and text": (f"({letter}) {text}", letter),
        "boxed letter": (f"{REASONING}\n\\boxed{{{letter}}}", letter),
        "answer is letter": (f"{REASONING}\nThe answer is {letter}.", letter),
        "answer is (letter)": (f"{REASONING}\nThe answer is ({letter}).", letter),
        "answer colon letter": (f"{REASONING}\nAnswer: {letter}", letter),
        "lmmr1 letter": (f"<think>{REASONING}</think><answer>{letter}</answer>", letter),
        "prose option": (f"{REASONING}\nHence the correct option is ({letter}) {text}.", letter),
        "closing letter": (f"{REASONING}\nComparing the options, I choose {letter}.", letter),
        "first line letter": (f"{letter}\n{REASONING}", letter),
        "option word": (f"{REASONING}\nThe answer is Option {letter}", letter),
        "bold answer letter": (f"{REASONING}\n**Answer: {letter}**", letter),
        "answer colon (letter)": (f"{REASONING}\nAnswer: ({letter})", letter),
        "final answer is letter": (f"{REASONING}\nThe final answer is {letter}", letter),
        "boxed letter and text": (f"{REASONING}\n\\boxed{{({letter}) {text}}}", letter),
        "option text": (f"{REASONING}\nThe answer is {text}.", text),
        "prose option text": (f"{REASONING}\nSo it must be {text}.", text),
        "hedge": (f"{REASONING}\nThe answer is {hedge}.", hedge),
        "hedge list": (f"{REASONING}\nThe answer is ({other}), ({letter}).", f"({other}), ({letter})"),
    }


def pairs_free(rows, gold_of, wrong_of, number_of):
    """(row, completion, form, stated) for each row: its gold and a wrong answer in every free form."""
    out = []
    for row in rows:
        for answer in (gold_of(row), wrong_of(row)):
            for form, completion in free_forms(answer, number_of(row)).items():
                out.append((row, completion, form, answer))
    return out


def pairs_choice(rows, options_of, gold_of):
    """(row, completion, form, stated) for each row: its gold option and a wrong one in every form."""
    out = []
    for row in rows:
        options, gold = options_of(row), gold_of(row)
        wrong = next(letter for letter in options if letter != gold)
        for letter in (gold, wrong):
            other = next((x for x in options if x not in (gold, wrong)), wrong if letter == gold else gold)
            capital = options[letter][-1:].isupper()  # "(C) Solution A": a form of its own (class 3)
            for form, (completion, stated) in choice_forms(letter, options[letter], other).items():
                if capital and options[letter] in completion:
                    form += ", capital-ending text"
                out.append((row, completion, form, stated))
    return out


# Forms where ours and the official rule-based code differ on purpose, with the reason (docs/scoring.md's table too).
DIFFERENCES = {
    "math500": {
        "bare formula": "LightEval reads LaTeX only inside $...$, \\[...\\] or \\boxed{}: a completion that is a bare "
                        "`2\\sqrt{3}` reads as nothing or its first number; ours reads a last line that is a "
                        "formula alone",
        "lmmr1": "LightEval's expression regexes do not read a value written straight between tags "
                 "(`<answer>56</answer>`); ours reads the `<answer>` block, as the training reward does",
    },
    "mathvision": {
        "lmmr1": "MATH-V's rule predates the tag format: it reads `<answer>56</answer>` as text (0); ours hands "
                 "it the `<answer>` block as the response",
        "lmmr1 letter": "the same, for `<answer>B</answer>`",
    },
    "gpqa_diamond": {
        "letter and text, capital-ending text": "LightEval reads '(A) Solution B' as B, the text's last capital; "
                                                "ours as A (class 3 of issue 26)",
        "prose option, capital-ending text": "the same, in 'Hence the correct option is (A) Solution B.'",
        "boxed letter and text, capital-ending text": "the same, in '\\boxed{(A) Solution B}'",
        "option text, capital-ending text": "LightEval reads the text's last capital as a letter; ours the "
                                            "option the text names",
        "option text": "LightEval reads letters only; ours also accepts the correct answer's exact text",
        "prose option text": "the same, for the text named in a concluding sentence",
        "prose option text, capital-ending text": "the same; LightEval may read the text's last capital",
        "hedge": "LightEval scores a hedge ('either B or D') as one of its letters; ours scores it 0",
        "hedge list": "LightEval scores a hedge ('(A), (C)') as one of its letters; ours scores it 0",
    },
    "mmstar": {
        "letter and text, capital-ending text": "lmms-eval's mcq_extract reads '(C) Solution A and B' as B; ours as C",
        "prose option, capital-ending text": "the same, after 'the correct option is'",
        "boxed letter and text, capital-ending text": "the same, inside \\boxed{}",
        "option text, capital-ending text": "mcq_extract reads the text's last capital as a letter; ours the option "
                                            "the text names",
        "option text": "lmms-eval's mcq_extract reads letters only; ours also accepts exactly one option's text, "
                       "as MM-Star's official GPT-free matching of the option content does",
        "prose option text": "the same, for the text named in a concluding sentence",
        "prose option text, capital-ending text": "the same; mcq_extract may read the text's last capital",
        "hedge": "mcq_extract picks one letter of a hedge; ours scores it 0",
        "hedge list": "mcq_extract picks one letter of a hedge; ours scores it 0",
        "option word": "mcq_extract's priority order can pick a letter inside the reasoning; ours reads 'Option D'",
    },
    "mathvista": {
        "hedge": "MathVista maps any extraction to the nearest choice by edit distance, so a hedge ('either A or "
                 "B') can land on the gold; ours scores a hedge 0",
        "hedge list": "the same, for '(A), (B)'",
    },
    "mathverse": {
        "option text": "the official judge (GPT) counts an option's text as its letter; lmms-eval's rule-based "
                       "quick match (extraction equal to `answer`) does not; ours does, as the judge",
        "prose option text": "the same, for the text named in a concluding sentence",
    },
}


def agreement(name, pairs, official, ours_bench=None):
    bench = ours_bench or benchmarks.get(name)
    ours = bench.score_batch([row for row, *_ in pairs], [completion for _, completion, *_ in pairs])
    skipped = DIFFERENCES.get(name, {})
    compared, disagreements, verdicts = 0, [], set()
    for (row, completion, form, stated), mine in zip(pairs, ours):
        if form in skipped:
            continue
        theirs = official(row, completion, stated)
        verdicts.add(theirs)
        compared += 1
        if theirs != mine:
            disagreements.append((form, completion[-60:], mine, theirs))
    assert verdicts == {0.0, 1.0}, f"{name}: the official code scored every pair {verdicts}"
    return compared, disagreements


def assert_agrees(name, compared, disagreements):
    assert compared >= 40, f"{name}: only {compared} pairs compared"
    rate = 1 - len(disagreements) / compared
    assert rate >= 0.98, f"{name}: agreement {rate:.3f} over {compared} pairs; disagreements: {disagreements[:12]}"


def needs(package):
    pytest.importorskip(package)


MATH500_ROWS = [{"problem": "p", "answer": a, "unique_id": f"d/{i}"} for i, a in enumerate(
    ["56", "-4", "0.25", "1000", "\\frac{14}{3}", "2\\sqrt{3}", "\\frac{\\sqrt{3}}{2}", "(3, \\frac{\\pi}{2})",
     "x^2+1", "12\\pi", "[0, 1)", "\\frac{1}{2}"])]
WRONG = {"56": "65", "-4": "4", "0.25": "0.3", "1000": "100", "\\frac{14}{3}": "\\frac{3}{14}",
         "2\\sqrt{3}": "3\\sqrt{2}",
         "\\frac{\\sqrt{3}}{2}": "\\frac{\\sqrt{2}}{2}", "(3, \\frac{\\pi}{2})": "(3, \\pi)", "x^2+1": "x^2-1",
         "12\\pi": "6\\pi", "[0, 1)": "[0, 1]", "\\frac{1}{2}": "\\frac{1}{3}"}


def is_number(text):
    return text.lstrip("-").replace(".", "", 1).isdigit()


def test_math500_agrees_with_lighteval():
    needs("lighteval")
    pairs = pairs_free(MATH500_ROWS, lambda r: r["answer"], lambda r: WRONG[r["answer"]],
                       lambda r: is_number(r["answer"]))
    compared, disagreements = agreement("math500", pairs, lambda row, c, stated: oracles.lighteval_math500(row, c))
    assert_agrees("math500", compared, disagreements)


GPQA_ROWS = [{"Question": f"Question {i}?", "Correct Answer": right, "Incorrect Answer 1": w1,
              "Incorrect Answer 2": w2, "Incorrect Answer 3": w3, "Record ID": f"rec{i}"}
             for i, (right, w1, w2, w3) in enumerate([
                 ("photon", "gluon", "W boson", "graviton"), ("7", "1", "14", "0"),
                 ("Solution B", "Solution A", "Solution C", "Solution D"), ("It increases", "It decreases",
                                                                             "It stays the same", "It oscillates"),
                 ("2.5 eV", "1.2 eV", "3.1 eV", "0.4 eV"), ("sp3", "sp2", "sp", "dsp2")])]


def test_gpqa_agrees_with_lighteval():
    needs("lighteval")
    pairs = pairs_choice(GPQA_ROWS, lambda r: gpqa.options(r)[0], lambda r: gpqa.options(r)[1])
    compared, disagreements = agreement("gpqa_diamond", pairs, lambda row, c, stated: oracles.lighteval_gpqa(row, c))
    assert_agrees("gpqa_diamond", compared, disagreements)


GSM8K_ROWS = [{"question": "q", "answer": f"work\n#### {gold}"} for gold in ("56", "1,012", "-3", "0", "18")]


@pytest.mark.parametrize("name", ["flexible-extract", "strict-match"])
def test_gsm8k_filters_agree_with_lm_eval(name):
    needs("lm_eval")
    from lmmr1_lite.benchmarks import gsm8k

    bench = gsm8k.GSM8K(**{k: getattr(benchmarks.get("gsm8k"), k) for k in ("name", "paper_column", "modality",
                                                                             "hub_id", "split", "config", "required")})
    bench.filter = name
    golds = {"56": "65", "1012": "1102", "-3": "3", "0": "10", "18": "$18.50"}
    pairs = pairs_free(GSM8K_ROWS, lambda r: r["answer"].split("#### ")[1],
                       lambda r: golds[gsm8k.gold_number(r["answer"])], lambda r: True)
    pairs += [(row, f"{REASONING}\nThe answer is {text}. Check: 2 + 2 = 4.", "strict sentence", text)
              for row in GSM8K_ROWS for text in (row["answer"].split("#### ")[1], "$1,012", "7")]
    compared, disagreements = agreement("gsm8k", pairs, lambda row, c, stated: oracles.lm_eval_gsm8k(row, c, name),
                                        bench)
    assert compared >= 40 and not disagreements, disagreements[:10]  # the filter is reproduced exactly


# Real model outputs: the 0.5B model's GSM8K completions committed by bench/real_fre.py (the base at 700 problems,
# the FRE adapter at 500; golds in its eval.json), scored by ours and by lm-evaluation-harness itself.
REAL_FRE = Path(__file__).resolve().parent.parent / "bench" / "results" / "real_fre"
# Why the kit's default rule and lm-eval's flexible-extract disagree on a real completion (docs/scoring.md's table too).
GSM8K_KIT_CLASSES = {
    "decimal zeros": "`\\boxed{4.00}` for the gold 4: lm-eval compares strings ('4.00' is not '4'); ours compares "
                     "numbers",
    "number after the answer": "`\\boxed{18} more vlogs to complete the 72 vlogs`: flexible-extract reads the "
                               "completion's last number (72); ours the boxed answer (18)",
    "number inside the answer": "`\\boxed{\\frac{3}{2}}` for the gold 2: flexible-extract reads the last number, "
                                "the denominator 2, and scores 1; ours compares 3/2 with 2",
}


def gsm8k_kit_class(completion: str, kit_answer: str | None) -> str | None:
    """The class of GSM8K_KIT_CLASSES a disagreement of the kit's rule with flexible-extract falls in (None:
    none), from where flexible-extract's match (lm-eval's regex, its last match) lies against the kit's answer
    (the answer's last occurrence in the completion)."""
    from lmmr1_lite.benchmarks.gsm8k import lm_eval_normal

    matches = list(re.finditer(oracles.LM_EVAL_FILTERS["flexible-extract"][0], completion))
    start = completion.rfind(kit_answer) if kit_answer else -1
    if not matches or start < 0:
        return None
    found, end = matches[-1], start + len(kit_answer)
    try:
        if float(kit_answer.replace(",", "")) == float(lm_eval_normal(found.group().strip())):
            return "decimal zeros"
    except ValueError:
        pass
    if start <= found.start() and found.end() <= end:
        return "number inside the answer"
    return "number after the answer" if found.start() >= end else None


def test_gsm8k_kit_class_by_hand():
    assert gsm8k_kit_class("So \\(\\boxed{4.00}\\).", "4.00") == "decimal zeros"
    assert gsm8k_kit_class("So \\boxed{13} years old in 3 years.", "13") == "number after the answer"
    assert gsm8k_kit_class("It is \\(\\boxed{\\frac{3}{2}}\\) pints.", "\\frac{3}{2}") == "number inside the answer"
    # flexible-extract's number lies before the kit's answer, or there is no answer: no class
    assert gsm8k_kit_class("We get 12 in all.\n<answer>twelve</answer>", "twelve") is None
    assert gsm8k_kit_class("No answer here, 7.", None) is None
    assert gsm8k_kit_class("So \\boxed{5}.", "6") is None


def test_gsm8k_on_real_model_completions(capsys):
    """Every committed real completion scored by our three GSM8K rules and by lm-eval 0.4.13's two filters: our
    filters reproduce lm-eval's on every row; the kit's default rule is within the issue's 1.5 points of
    flexible-extract on each file, and each row where they disagree falls in a class docs/scoring.md's table names."""
    needs("lm_eval")
    import json
    import sys

    from lmmr1_lite.benchmarks import gsm8k

    sys.path.insert(0, str(REAL_FRE.parent.parent))
    from real_fre import judged

    golds = json.loads((REAL_FRE / "eval.json").read_text())["problems"]
    files = sorted((REAL_FRE / "predictions").glob("*.jsonl"))
    readme = (REAL_FRE.parent.parent.parent / "docs" / "scoring.md").read_text()
    assert len(files) == 2
    for path in files:
        records = judged(path, golds)  # bench/real_fre.py's verdicts: the kit's rule, as its tables report
        assert len(records) >= 500
        kit, official, ours, classes = [], {}, {}, {}
        for key, record in records.items():
            row, completion = {"question": "", "answer": f"#### {golds[key]}"}, record["completion"]
            kit.append(record["score"])
            variants = gsm8k.BENCHMARK.variants(row, completion)
            for name in ("flexible-extract", "strict-match"):
                official.setdefault(name, []).append(oracles.lm_eval_gsm8k(row, completion, name))
                ours.setdefault(name, []).append(float(variants[name]))
            if record["score"] != official["flexible-extract"][-1]:
                found = gsm8k_kit_class(completion, gsm8k.BENCHMARK.extract(row, completion))
                classes.setdefault(found, []).append(key)
        assert ours == official, f"{path.name}: our filters and lm-eval's disagree on a row"
        n = len(kit)
        accuracy = {name: 100 * sum(v) / n for name, v in [("kit", kit), *official.items()]}
        agree = 100 * sum(a == b for a, b in zip(kit, official["flexible-extract"])) / n
        assert abs(accuracy["kit"] - accuracy["flexible-extract"]) <= 1.5, (path.name, accuracy)
        assert None not in classes, f"{path.name}: disagreements of no known class: {classes.get(None)}"
        for name in classes:
            assert f"| gsm8k | {name} |" in readme, name
        with capsys.disabled():
            print(f"\n{path.name}: {n} rows; accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
                  + f"; kit vs flexible-extract agree on {agree:.2f} %; disagreements: "
                  + ", ".join(f"{name} {len(keys)} ({', '.join(keys)})" for name, keys in sorted(classes.items())))


MATHVISION_CHOICE = [mathvision(gold, options) for gold, options in [
    ("B", ["1", "2", "3", "4", "5"]), ("D", ["3/11", "5/11", "6/11", "8/11", "1"]),
    ("A", ["\\frac{1}{2}", "\\frac{1}{3}", "\\frac{1}{4}", "1", "2"]),
    ("E", ["red", "blue", "green", "white", "black"]),
    ("C", ["2\\sqrt{3}", "\\sqrt{3}", "3", "4", "6"])]]
MATHVISION_FREE = [mathvision(gold) for gold in ("56", "3.14", "2\\sqrt{3}", "\\frac{3}{4}", "0.5", "12", "(1, 2)")]
MATHVISION_WRONG = {"56": "65", "3.14": "3.41", "2\\sqrt{3}": "3\\sqrt{2}", "\\frac{3}{4}": "\\frac{4}{3}",
                    "0.5": "0.25",
                    "12": "21", "(1, 2)": "(2, 1)"}


def test_mathvision_agrees_with_the_official_rule():
    needs("lmms_eval")
    pairs = pairs_choice(MATHVISION_CHOICE, lambda r: dict(zip("ABCDE", r["options"])), lambda r: r["answer"])
    pairs += pairs_free(MATHVISION_FREE, lambda r: r["answer"], lambda r: MATHVISION_WRONG[r["answer"]],
                        lambda r: is_number(r["answer"]))
    compared, disagreements = agreement("mathvision", pairs, lambda row, c, stated: oracles.lmms_mathvision(row, c))
    assert_agrees("mathvision", compared, disagreements)


MATHVISTA_CHOICE = [mathvista(str(i), choices[ord(gold) - 65], choices=choices) for i, (gold, choices) in enumerate([
    ("B", ["3/11", "8/11", "6/11", "3/5"]), ("C", ["Solution A", "Solution B", "Solution C", "Solution D"]),
    ("A", ["yes", "no"]), ("D", ["10", "20", "30", "40"]), ("B", ["triangle", "square", "circle", "pentagon"])])]
MATHVISTA_FREE = [mathvista("20", "56"), mathvista("21", "1.45", answer_type="float", precision=2),
                  mathvista("22", "3.5", answer_type="float", precision=1), mathvista("23", "12", unit="cm"),
                  mathvista("24", "[2007, 2008]", answer_type="list"), mathvista("25", "1000")]
MATHVISTA_WRONG = {"56": "65", "1.45": "1.54", "3.5": "5.3", "12": "21", "[2007, 2008]": "[2008, 2009]", "1000": "100"}


def test_mathvista_agrees_with_the_official_normalisation():
    needs("lmms_eval")
    pairs = pairs_choice(MATHVISTA_CHOICE, lambda r: dict(zip("ABCD", r["choices"])),
                         lambda r: "ABCD"[r["choices"].index(r["answer"])])
    pairs += pairs_free(MATHVISTA_FREE, lambda r: r["answer"], lambda r: MATHVISTA_WRONG[r["answer"]],
                        lambda r: is_number(r["answer"]))
    compared, disagreements = agreement("mathvista", pairs, oracles.lmms_mathvista)
    assert_agrees("mathvista", compared, disagreements)


MATHVERSE_CHOICE = [mathverse(gold) for gold in ("C", "A", "D")]
MATHVERSE_FREE = [mathverse(gold, "free-form", "") for gold in ("22.3", "56", "(-2, 1]", "\\frac{3}{4}")]
MATHVERSE_WRONG = {"22.3": "22.4", "56": "65", "(-2, 1]": "(-2, 1)", "\\frac{3}{4}": "\\frac{4}{3}"}


def test_mathverse_agrees_with_the_exact_match():
    needs("lmms_eval")
    pairs = pairs_choice(MATHVERSE_CHOICE, lambda r: {"A": "2", "B": "2√{3}", "C": "√{3}", "D": "2√{2}"},
                         lambda r: r["answer"])
    pairs += pairs_free(MATHVERSE_FREE, lambda r: r["answer"], lambda r: MATHVERSE_WRONG[r["answer"]],
                        lambda r: is_number(r["answer"]))
    compared, disagreements = agreement("mathverse", pairs, oracles.lmms_mathverse)
    assert_agrees("mathverse", compared, disagreements)


MMSTAR_ROWS = [MMSTAR, MMSTAR_TEXT,
               {"index": 2, "question": "Where is the cat?\nOptions: A: on the mat, B: under the bed, C: in the box, "
                "D: on the roof", "image": None, "answer": "B"},
               {"index": 3, "question": "Which is larger?\nOptions: A: 2.5, B: 3.1, C: 0.4, D: 1.2", "image": None,
                "answer": "D"}]


def test_mmstar_agrees_with_lmms_eval():
    needs("lmms_eval")
    from lmmr1_lite.benchmarks.choices import inline_options

    pairs = pairs_choice(MMSTAR_ROWS, lambda r: inline_options(r["question"]), lambda r: r["answer"])
    compared, disagreements = agreement("mmstar", pairs, lambda row, c, stated: oracles.lmms_mmstar(row, c))
    assert_agrees("mmstar", compared, disagreements)


OLYMPIAD_ROWS = [olympiad("$3, 5$", multiple=True), olympiad("$3.14$", error="1e-2"), olympiad("$12$", unit="m"),
                 olympiad("$\\frac{\\sqrt{3}}{2}$", answer_type="Expression"),
                 olympiad("$x = 5$", answer_type="Expression"),
                 olympiad("$7.1 \\times 10^{35}$", error="5e34"), olympiad(f"${TWELVE}$", multiple=True),
                 olympiad("$(-\\infty, 2]$", answer_type="Interval"), olympiad("$y = 2x + 1$", answer_type="Equation")]
OLYMPIAD_WRONG = {"$3, 5$": "3, 6", "$3.14$": "3.3", "$12$": "13", "$\\frac{\\sqrt{3}}{2}$": "\\frac{1}{2}",
                  "$x = 5$": "x = 6", "$7.1 \\times 10^{35}$": "8.3 \\times 10^{35}", f"${TWELVE}$": TWELVE[:-4],
                  "$(-\\infty, 2]$": "(-\\infty, 2)", "$y = 2x + 1$": "y = 2x - 1"}


def test_olympiadbench_agrees_with_the_official_judge():
    needs("lmms_eval")
    forms = {"final answer boxed": "{r}\nSo the final answer is \\boxed{{{a}}}.",
             "final answer": "{r}\nSo the final answer is ${a}$.",
             "lmmr1 boxed": "<think>{r}</think><answer>\\boxed{{{a}}}</answer>",
             "boxed": "{r}\n\\boxed{{{a}}}"}
    pairs = []
    for row in OLYMPIAD_ROWS:
        gold = row["final_answer"][0].strip("$")
        for answer in (gold, OLYMPIAD_WRONG[row["final_answer"][0]]):
            pairs += [(row, form.format(r=REASONING, a=answer), name, answer) for name, form in forms.items()]
    compared, disagreements = agreement("olympiadbench", pairs,
                                        lambda row, c, stated: oracles.lmms_olympiadbench(row, c))
    assert_agrees("olympiadbench", compared, disagreements)


def test_every_difference_is_in_the_scoring_page():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "scoring.md").read_text()
    for name, forms in DIFFERENCES.items():
        for form in forms:
            assert f"| {name} | {form} |" in readme, (name, form)


# ------------------------------------------------------------------------------------------------
# eval.md: the rule of each number, and how the paper's evaluation differs
# ------------------------------------------------------------------------------------------------
def test_eval_md_states_each_rule_and_the_papers_evaluation():
    from argparse import Namespace

    from lmmr1_lite.benchmark_eval import parse_request, rules
    from lmmr1_lite.config import ConfigError

    args = Namespace(benchmark="math500,gpqa_diamond,olympiadbench,mathvision,mathverse,mmstar,mathvista,gsm8k",
                     data=None, model=None, adapter=[], prompt="auto", limit=None, max_new_tokens=None, batch_size=4,
                     out=None, sets=[], scoring="mathvision=lenient,gsm8k=strict-match")
    request = parse_request(args)
    assert request.scoring == {"mathvision": "lenient", "gsm8k": "strict-match"}
    assert benchmarks.get("mathvision").scoring == "official", "parsing changes no benchmark"
    results = {"base, cot": {"gsm8k": {"accuracy": 0.5, "variants": {"flexible-extract": 0.25, "strict-match": 0.125}}}}
    text = rules(request, results)
    for name in request.names:
        line = next(line for line in text.splitlines() if line.startswith(f"- {name}"))
        assert "Paper's evaluation: " in line and len(line) > 120, line
    for judged in ("mathvista", "mathverse", "mathvision", "mmstar"):
        line = next(line for line in text.splitlines() if line.startswith(f"- {judged}"))
        assert "GPT" in line, line  # the official pipelines' language-model step is named
    assert "- mathvision [scoring: official]" in text and "- gsm8k [scoring: kit]" in text
    assert "  - base, cot: flexible-extract 25.0, strict-match 12.5" in text
    bench = benchmarks.get("gsm8k")
    bench.use_scoring("flexible-extract")
    try:
        assert "- gsm8k [scoring: flexible-extract]: lm-evaluation-harness" in rules(request, results)
    finally:
        bench.use_scoring("kit")
    for bad, expected in (("mathvision=loose", "mathvision scores by official, lenient"),
                          ("math500=x", "none: it has one rule"), ("mmlu=x", "not one of the --benchmark names")):
        with pytest.raises(ConfigError, match=expected):
            parse_request(Namespace(**{**vars(args), "scoring": bad}))


@pytest.mark.parametrize("completion, expected", [
    ("Options A and B are wrong, so C.", 1.0),            # letters before the conclusion are no hedge
    ("I rule out A and D. Therefore C", 1.0),
    ("A and B fit, so it is either C or D.", 0.0),         # the conclusion hedges
    ("Reasoning.\nC. 4", 1.0),                              # a last line led by the letter and its text
    ("Reasoning.\nB. 3 is wrong, so D.", 0.0),              # led by one letter, concluding another: neither
])
def test_the_conclusion_decides_not_the_letters_before_it(completion, expected):
    assert score("mmstar", MMSTAR, completion) == expected


SHAPES = mathvista("30", "square", choices=["triangle", "square", "circle", "pentagon"])


@pytest.mark.parametrize("name, row, completion, expected", [
    ("mathvista", SHAPES, "It has four equal sides.\nSo the shape is a square.", 1.0),   # the option in words
    ("mathvista", SHAPES, "I see a big square with 4 sides.", 1.0),
    ("mathvista", SHAPES, "So the shape is a circle.", 0.0),
    ("mathvista", SHAPES, "So the shape is not a triangle.", 0.0),                   # a negation names nothing
    ("mathvista", SHAPES, "It could be a square or a circle.", 0.0),                 # two options named
    ("mathvista", SHAPES, "The circle is wrong, so B.", 1.0),                        # a letter wins over words
    ("mmstar", MMSTAR_TEXT, "Both apply, so Solution A and B.", 1.0),                # its text has letters in it
    ("mmstar", MMSTAR_TEXT, "Only the first, so Solution A.", 0.0),
])
def test_an_option_named_in_words(name, row, completion, expected):
    assert score(name, row, completion) == expected
