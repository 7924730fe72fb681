"""Benchmarks: rows in each benchmark's published schema (images made with PIL), prompts in both modes,
scoring of right and wrong answers in lmmr1 (<think>/<answer>) and cot (boxed / "the answer is") styles,
each benchmark's quirks, extraction on hostile input, lazy images and the loaders."""
import io
import json
import os
import time

import pytest
from PIL import Image

from lmmr1_lite import benchmarks, verifier
from lmmr1_lite.benchmarks import gpqa, sokoban
from lmmr1_lite.benchmarks.choices import inline_options, nearest, resolve
from lmmr1_lite.benchmarks.extract import extract_answer
from lmmr1_lite.benchmarks.images import LazyImages
from lmmr1_lite.config import LMM_R1_SYSTEM_PROMPT, ConfigError


def png(color: str = "red", size=(32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def r1(answer: str) -> str:
    """An lmmr1-mode completion."""
    return f"<think>Let me work it out step by step.</think><answer>{answer}</answer>"


# ------------------------------------------------------------------------------------------------
# Rows, as each benchmark publishes them (column names and value shapes of the Hub datasets)
# ------------------------------------------------------------------------------------------------
MATH500 = [
    {"problem": "What is $2+3$?", "solution": "We add: $2+3=\\boxed{5}$.", "answer": "5", "subject": "Prealgebra",
     "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $3x = 14$.", "solution": "$x=\\boxed{\\frac{14}{3}}$", "answer": "\\frac{14}{3}",
     "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"},
    {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "...",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
]
GPQA = [
    {"Question": "Which particle mediates the electromagnetic force?", "Correct Answer": "photon",
     "Incorrect Answer 1": "gluon", "Incorrect Answer 2": "W boson", "Incorrect Answer 3": "graviton",
     "Record ID": "recA", "Subdomain": "Physics (general)", "High-level domain": "Physics", "Explanation": "QED."},
    {"Question": "What is the pH of pure water at 25 C?", "Correct Answer": "7", "Incorrect Answer 1": "1",
     "Incorrect Answer 2": "14", "Incorrect Answer 3": "0", "Record ID": "recB", "Subdomain": "Chemistry (general)",
     "High-level domain": "Chemistry", "Explanation": "Neutral."},
]


def olympiad_row(i, question, final_answer, multiple=False, unit=None, answer_type="Numerical", error=None):
    return {"id": 2000 + i, "question": question, "solution": ["..."], "final_answer": [final_answer],
            "context": None, "image_1": None, "image_2": None, "image_3": None, "image_4": None, "image_5": None,
            "modality": "Text-only", "difficulty": "Competition", "is_multiple_answer": multiple, "unit": unit,
            "answer_type": answer_type, "error": error, "question_type": "Open-ended", "subfield": "Algebra",
            "subject": "Math", "language": "English"}


OLYMPIAD = [
    olympiad_row(0, "Find all primes $p$ with $p^2 - 8p + 15 = 0$.", "$3, 5$", multiple=True),
    olympiad_row(1, "Approximate $\\pi$.", "$3.14$", error="1e-2"),
    olympiad_row(2, "Give $\\pi$ to two decimals.", "$3.14$"),
    olympiad_row(3, "How tall is the pole?", "$12$", unit="m"),
    olympiad_row(4, "Compute $\\sin 60^\\circ$.", "$\\frac{\\sqrt{3}}{2}$", answer_type="Expression"),
    olympiad_row(5, "Solve $x^2 - 2x - 1 = 0$.", "$1 \\pm \\sqrt{2}$", multiple=True, answer_type="Expression"),
]
MATHVISION = [
    {"id": "1", "question": "<image1>\nWhich number is in the middle?", "options": ["1", "2", "3", "4", "5"],
     "image": "images/1.png", "decoded_image": {"bytes": png("red"), "path": "1.png"}, "answer": "B",
     "solution": None, "level": 2, "subject": "arithmetic"},
    {"id": "2", "question": "<image1>\nHow long is the diagonal?", "options": [], "image": "images/2.png",
     "decoded_image": {"bytes": png("green"), "path": "2.png"}, "answer": "2\\sqrt{3}", "solution": None,
     "level": 3, "subject": "metric geometry - length"},
    {"id": "3", "question": "<image1>\nEstimate the ratio.", "options": [], "image": "images/3.png",
     "decoded_image": {"bytes": png("blue"), "path": "3.png"}, "answer": "3.14", "solution": None, "level": 1,
     "subject": "algebra"},
]
_MC = "As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()"
_CHOICES = "\nChoices:\nA:2\nB:2√{3}\nC:√{3}\nD:2√{2}"


def mathverse_row(i, version, question, answer, question_type="multi-choice", image=True):
    cot_hint = ("According to the question shown in the image, please first conduct reasoning, and then answer the "
                "question and provide the correct option letter, e.g., A, B, C, D, at the end.")
    return {"sample_index": str(i), "problem_index": "1", "problem_version": version, "question": question,
            "image": {"bytes": png("white"), "path": f"{i}.png"} if image else "", "answer": answer,
            "question_type": question_type,
            "metadata": {"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry", "subfield": "Length"},
            "query_wo": "According to the question shown in the image, please directly answer the question.",
            "query_cot": f"{cot_hint}\nQuestion: {question}",
            "question_for_eval": question or _MC + _CHOICES}


MATHVERSE = [
    mathverse_row(1, "Text Dominant", _MC + _CHOICES, "C"),
    mathverse_row(2, "Vision Only", "", "C"),
    mathverse_row(3, "Text Lite", "Find the distance d. Round to one decimal place.", "22.3", "free-form"),
    mathverse_row(4, "Text Only", "Write the set shown in interval notation.", "(-2, 1]", "free-form", image=False),
]
MMSTAR = [
    {"index": 0, "question": "Which option describe the object relationship in the image correctly?\nOptions: "
     "A: The suitcase is on the book., B: The suitcase is beneath the cat., C: The suitcase is beneath the bed., "
     "D: The suitcase is beneath the book.", "image": {"bytes": png("gray"), "path": None}, "answer": "A",
     "category": "instance reasoning", "l2_category": "cross-instance relation reasoning",
     "meta_info": {"source": "MMBench", "split": "val", "image_path": "0.jpg"}},
    {"index": 1, "question": "How many apples are there in the image?\nOptions: A: 2, B: 3, C: 4, D: 5",
     "image": {"bytes": png("yellow"), "path": None}, "answer": "C", "category": "fine-grained perception",
     "l2_category": "object counting", "meta_info": {"source": "SEEDBench", "split": "val", "image_path": "1.jpg"}},
]


def mathvista_row(pid, question, answer, question_type="free_form", answer_type="integer", choices=None,
                  unit=None, precision=None):
    hint = {"multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
                            "D, at the end.",
            "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, "
                       "e.g., 1, 2, 3, at the end.",
            "float": "Hint: Please answer the question requiring a floating-point number with two decimal places and "
                     "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
            "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final "
                    "list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end."}
    query = hint["multi_choice" if choices else answer_type] + f"\nQuestion: {question}"
    if choices:
        query += "\nChoices:\n" + "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(choices))
    return {"pid": pid, "question": question, "image": f"images/{pid}.png", "decoded_image": None,
            "choices": choices, "unit": unit, "precision": precision, "answer": answer,
            "question_type": question_type, "answer_type": answer_type,
            "metadata": {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "elementary school",
                         "language": "english", "skills": ["arithmetic reasoning"], "source": "IconQA",
                         "split": "testmini", "task": "math word problem"}, "query": query}


MATHVISTA = [
    mathvista_row("1", "What fraction of the shape is blue?", "8/11", "multi_choice", "text",
                  choices=["3/11", "8/11", "6/11", "3/5"]),
    mathvista_row("2", "How long is the bar? (Unit: cm)", "5", unit="cm"),
    mathvista_row("3", "How much do the two candies cost? (Unit: $)", "1.45", answer_type="float", precision=2.0),
    mathvista_row("4", "Between which two years was the peak?", "[2007, 2008]", answer_type="list"),
    mathvista_row("5", "How much does the toy cost? (Unit: £)", "12", unit="£"),
]
GSM8K = [  # openai/gsm8k rows: question, answer ending in "#### N"
    {"question": "Ali has 3 boxes of 12 pens and gives away 5 pens. How many pens are left?",
     "answer": "3 * 12 = <<3*12=36>>36 pens.\n36 - 5 = <<36-5=31>>31\n#### 31"},
    {"question": "A car costs $12,500 and a bike $1,250. What do both cost together, in dollars?",
     "answer": "12,500 + 1,250 = <<12500+1250=13750>>13,750\n#### 13,750"},
]
ROWS = {"math500": MATH500, "gpqa_diamond": GPQA, "olympiadbench": OLYMPIAD, "mathvision": MATHVISION,
        "mathverse": MATHVERSE, "mmstar": MMSTAR, "mathvista": MATHVISTA, "gsm8k": GSM8K}


def gpqa_letter(row, text):
    choices, _ = gpqa.options(row)
    return next(letter for letter, option in choices.items() if option == text)


# (benchmark, row index, completion, expected score): right and wrong, lmmr1 and cot styles
CASES = [
    ("gsm8k", 0, "36 - 5 = 31, so \\boxed{31}", 1.0),
    ("gsm8k", 0, "He keeps 31 pens in the end.", 1.0),               # prose: the last number
    ("gsm8k", 0, "36 pens, 5 given away: 31. That is 2 boxes left.", 0.0),
    ("gsm8k", 1, r1("13,750"), 1.0),
    ("gsm8k", 1, "Together they cost $13,750.", 1.0),
    ("gsm8k", 1, "\\boxed{13,700}", 0.0),
    ("math500", 0, "Adding gives 5. Therefore the answer is $5$.", 1.0),
    ("math500", 0, r1("$5$"), 1.0),
    ("math500", 0, "So it is \\boxed{6}.", 0.0),
    ("math500", 1, "Therefore, the final answer is: $\\boxed{\\dfrac{14}{3}}$. I hope it is correct", 1.0),
    ("math500", 1, r1("14/3"), 1.0),
    ("math500", 1, r1("4.67"), 0.0),
    ("math500", 2, "\\boxed{(3, \\frac{\\pi}{2})}", 1.0),
    ("math500", 2, r1("(3, \\pi)"), 0.0),
    ("gpqa_diamond", 0, f"Photons carry it.\nAnswer: {gpqa_letter(GPQA[0], 'photon')}", 1.0),
    ("gpqa_diamond", 0, r1(gpqa_letter(GPQA[0], "photon")), 1.0),
    ("gpqa_diamond", 0, r1("photon"), 1.0),
    ("gpqa_diamond", 0, f"Answer: {gpqa_letter(GPQA[0], 'gluon')}", 0.0),
    ("gpqa_diamond", 0, "The answer is gluon.", 0.0),
    ("gpqa_diamond", 1, f"\\boxed{{{gpqa_letter(GPQA[1], '7')}}}", 1.0),
    ("gpqa_diamond", 1, "the final answer is: 7", 1.0),
    ("gpqa_diamond", 1, r1(gpqa_letter(GPQA[1], "14")), 0.0),
    ("olympiadbench", 0, "So the final answer is \\boxed{5, 3}.", 1.0),
    ("olympiadbench", 0, "The roots are \\boxed{3} and \\boxed{5}.", 1.0),
    ("olympiadbench", 0, r1("3, 5"), 1.0),
    ("olympiadbench", 0, "So the final answer is \\boxed{3}.", 0.0),
    ("olympiadbench", 0, r1("3, 6"), 0.0),
    ("olympiadbench", 1, "So the final answer is \\boxed{3.141}.", 1.0),
    ("olympiadbench", 1, r1("3.2"), 0.0),
    ("olympiadbench", 2, "So the final answer is \\boxed{3.141}.", 0.0),
    ("olympiadbench", 2, r1("3.14"), 1.0),
    ("olympiadbench", 3, "So the final answer is \\boxed{12 m}.", 1.0),
    ("olympiadbench", 3, "So the final answer is \\boxed{12}(m).", 1.0),
    ("olympiadbench", 3, r1("13"), 0.0),
    ("olympiadbench", 4, r1("\\frac{1}{2}\\sqrt{3}"), 1.0),
    ("olympiadbench", 4, "So the final answer is \\boxed{\\frac{1}{2}}.", 0.0),
    ("olympiadbench", 5, "So the final answer is \\boxed{1-\\sqrt{2}, 1+\\sqrt{2}}.", 1.0),
    ("olympiadbench", 5, r1("1+\\sqrt{2}"), 0.0),
    ("mathvision", 0, r1("B"), 1.0),
    ("mathvision", 0, "The middle number is \\boxed{(B)}", 1.0),
    ("mathvision", 0, "It is the second option, \\boxed{2}", 1.0),      # the gold option's text (their is_equal)
    ("mathvision", 0, "the answer is C", 0.0),
    ("mathvision", 0, "B. 2", 0.0),                                     # MATH-V's rule reads "b.2"
    ("mathvision", 0, "So the answer is B.", 1.0),
    ("mathvision", 1, r1("\\sqrt{12}"), 0.0),                     # theirs compares symbolic values as text
    ("mathvision", 1, r1("2\\sqrt{3}"), 1.0),
    ("mathvision", 1, "\\boxed{3}", 0.0),
    ("mathvision", 2, "\\boxed{3.14159}", 1.0),
    ("mathvision", 2, r1("3.15"), 0.0),
    ("mathverse", 0, r1("C"), 1.0),
    ("mathverse", 0, "BC = √{3}, so the answer is √{3}.", 1.0),
    ("mathverse", 0, "the answer is B", 0.0),
    ("mathverse", 1, "Reasoning from the figure...\nC. √{3}", 1.0),
    ("mathverse", 1, r1("A"), 0.0),
    ("mathverse", 2, "Therefore the answer is 22.3.", 1.0),
    ("mathverse", 2, r1("22.4"), 0.0),
    ("mathverse", 3, r1("(-2, 1]"), 1.0),
    ("mathverse", 3, "\\boxed{(-2, 1)}", 0.0),
    ("mmstar", 0, r1("A"), 1.0),
    ("mmstar", 0, "\\boxed{A. The suitcase is on the book.}", 1.0),
    ("mmstar", 0, r1("The suitcase is on the book."), 1.0),
    ("mmstar", 0, "\\boxed{D}", 0.0),
    ("mmstar", 1, "I count four apples, so the answer is 4.", 1.0),
    ("mmstar", 1, "Counting again... Option C", 1.0),
    ("mmstar", 1, r1("5"), 0.0),
    ("mmstar", 0, "Comparing the positions, the final answer is: A", 1.0),
    ("mmstar", 0, r1("The answer is A"), 1.0),
    ("mathvista", 0, r1("B"), 1.0),
    ("mathvista", 0, "The correct answer is (B) 8/11.", 1.0),
    ("mathvista", 0, "\\boxed{8/1l}", 1.0),       # nearest choice by edit distance
    ("mathvista", 0, r1("A"), 0.0),
    ("mathvista", 1, "\\boxed{5 cm}", 1.0),
    ("mathvista", 1, "So the answer is 5.0", 1.0),
    ("mathvista", 1, r1("6"), 0.0),
    ("mathvista", 2, "\\boxed{1.449}", 1.0),      # rounded to the row's precision (2)
    ("mathvista", 2, r1("1.4"), 0.0),
    ("mathvista", 3, r1("[2007,2008]"), 1.0),
    ("mathvista", 3, "\\boxed{[2007, 2009]}", 0.0),
    ("mathvista", 4, "It costs \\boxed{£12}", 1.0),       # the row's unit stripped
    ("mathvista", 4, r1("£13"), 0.0),
]


@pytest.fixture(scope="module", autouse=True)
def warm_verifier():
    verifier.pool().warm_up()


# ------------------------------------------------------------------------------------------------
# Registry and API
# ------------------------------------------------------------------------------------------------
def test_registry_names_columns_and_sources():
    assert set(benchmarks.NAMES) == {"math500", "gpqa_diamond", "olympiadbench", "mathvision", "mathverse", "mmstar",
                                     "mathvista", "sokoban", "gsm8k"}
    columns = {name: benchmarks.get(name).paper_column for name in benchmarks.NAMES}
    assert columns == {"math500": "MATH500", "gpqa_diamond": "GPQA", "olympiadbench": "OlympiadBench",
                       "mathvision": "MathVision", "mathverse": "MathVerse", "mmstar": "MM-Star",
                       "mathvista": "MathVista", "sokoban": "Sokoban", "gsm8k": "GSM8K"}
    assert {name for name in benchmarks.NAMES if benchmarks.get(name).modality == "text"} == \
        {"math500", "gpqa_diamond", "olympiadbench", "gsm8k"}
    assert (benchmarks.get("math500").hub_id, benchmarks.get("math500").split) == ("HuggingFaceH4/MATH-500", "test")
    assert benchmarks.get("gpqa_diamond").config == "gpqa_diamond"
    assert benchmarks.get("olympiadbench").config == "OE_TO_maths_en_COMP"
    assert all(benchmarks.get(name).sources for name in benchmarks.NAMES)
    with pytest.raises(ConfigError, match="not registered"):
        benchmarks.get("mmlu")


@pytest.mark.parametrize("name", sorted(ROWS))
def test_scoring_right_and_wrong_answers(name):
    cases = [(i, completion, expected) for bench, i, completion, expected in CASES if bench == name]
    assert {expected for _, _, expected in cases} == {0.0, 1.0}
    rows = ROWS[name]
    got = benchmarks.get(name).score_batch([rows[i] for i, _, _ in cases], [c for _, c, _ in cases])
    wrong = [(i, c, e, g) for (i, c, e), g in zip(cases, got) if g != e]
    assert not wrong, f"{name}: (row, completion, expected, got): {wrong}"
    # score() and the module-level score() agree with score_batch
    i, completion, expected = cases[0]
    assert benchmarks.score(name, rows[i], completion) == benchmarks.get(name).score(rows[i], completion) == expected


def test_score_batch_sends_all_checks_in_one_pool_call(monkeypatch):
    calls = []

    class FakePool:
        def check(self, pairs):
            calls.append(list(pairs))
            return [(True, "ok")] * len(pairs)

    monkeypatch.setattr(verifier, "pool", lambda *a, **k: FakePool())
    bench = benchmarks.get("math500")
    scores = bench.score_batch([MATH500[1], MATH500[2], MATH500[0]],
                               ["\\boxed{\\dfrac{14}{3}}", "\\boxed{(3, \\frac{\\pi}{2})}", "\\boxed{5}"])
    assert scores == [1.0, 1.0, 1.0] and len(calls) == 1 and len(calls[0]) == 2  # "5" decided without the pool
    calls.clear()
    assert benchmarks.get("mmstar").score_batch(MMSTAR, ["\\boxed{A}", "\\boxed{C}"]) == [1.0, 1.0]
    assert calls == []  # letter rows never start the pool


# ------------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, letters, expected", [
    ("Therefore the answer is $5$.", "", "5"),
    ("Thinking...\nThe final answer is: B", "ABCD", "B"),
    ("B. 2", "ABCD", "B. 2"),                                       # the line; resolve() names the option
    ("Final answer: 42", "", "42"),
    ("**Final Answer:** $\\frac{1}{2}$", "", "\\frac{1}{2}"),
    ("<think>the answer is 3</think><answer> \\boxed{7} </answer>", "", "7"),
    ("<think>x</think><answer>$12$</answer>", "", "12"),
    ("<think>x</think><answer>So the answer is B.</answer>", "ABCD", "B"),
    ("blah \\boxed{4} and later the answer is 5", "", "4"),        # a boxed answer wins over a phrase
    ("I compared all options, so D.", "ABCD", "D"),
    ("I compared all options, so D.", "", None),                   # letters only for multiple-choice rows
    ("(C)", "ABC", "C"),
    ("<answer>unclosed 5", "", "5"),                                # no block: the concluding value
    ("", "", None),
])
def test_extraction_rules(completion, letters, expected):
    assert extract_answer(completion, letters) == expected


@pytest.mark.parametrize("hostile", [
    "<answer>" * 50000, "x" * 1_000_000, "\\boxed{" * 50000, "the answer is " * 50000,
    "<answer>" * 50000 + "</answer>" * 50000, "(" * 200000 + " 7", "<answer>" + "1, " * 300000 + "</answer>",
    "<answer>" + "\\text{" * 100000 + "</answer>", "<answer>" + "up " * 300000 + "</answer>",
])
def test_extraction_and_scoring_are_fast_on_hostile_input(hostile):
    rows = dict(ROWS, sokoban=[{"level": "#####/#@$.#/#####"}])
    start = time.perf_counter()
    extract_answer(hostile, "ABCD")
    for name in ("mmstar", "olympiadbench", "mathvista", "math500", "mathvision", "sokoban"):
        assert benchmarks.score(name, rows[name][0], hostile) == 0.0, name
    assert time.perf_counter() - start < 1.0


def test_choice_resolution_letter_and_text():
    options = {"A": "1", "B": "2", "C": "3"}
    for answer in ("B", "(B)", "B. 2", "B) 2", "B: 2", "Option B", "2", "2.0", "$2$", "\\text{B}"):
        assert resolve(answer, options) == "B", answer
    for answer in ("a triangle", "4", "", "E", "B" * 600):
        assert resolve(answer, options) is None, answer
    assert resolve("2", {"A": "2", "B": "2"}) is None  # ambiguous text names no option
    assert inline_options(MMSTAR[1]["question"]) == {"A": "2", "B": "3", "C": "4", "D": "5"}
    assert inline_options(_MC + _CHOICES) == {"A": "2", "B": "2√{3}", "C": "√{3}", "D": "2√{2}"}
    assert inline_options("no options here") == {}
    assert nearest("8/1l", {"A": "3/11", "B": "8/11", "C": "6/11"}) == "B"


# ------------------------------------------------------------------------------------------------
# Prompts and examples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROWS))
def test_examples_carry_mode_system_prompt_gold_and_row(name, tmp_path):
    bench, row = benchmarks.get(name), ROWS[name][0]
    lmmr1, cot = bench.to_example(row, "lmmr1", tmp_path), bench.to_example(row, "cot", tmp_path)
    assert lmmr1.system == LMM_R1_SYSTEM_PROMPT and cot.system == ""
    assert lmmr1.prompt and cot.prompt and lmmr1.prompt != cot.prompt
    assert lmmr1.answer == cot.answer == bench.gold(row)
    assert cot.meta["row"] is row and cot.meta["benchmark"] == name and cot.meta["id"] == bench.row_id(row)
    assert (len(cot.images) > 0) == (bench.modality == "multimodal")
    with pytest.raises(ConfigError):
        bench.to_example(row, "fewshot")


def test_prompts_follow_the_reference_evaluations():
    math = benchmarks.get("math500")
    assert math.prompt(MATH500[0], "lmmr1") == "What is $2+3$?"
    assert "Therefore, the final answer is: $\\boxed{ANSWER}$" in math.prompt(MATH500[0], "cot")
    choices, gold = gpqa.options(GPQA[0])
    cot = benchmarks.get("gpqa_diamond").prompt(GPQA[0], "cot")
    assert "'Answer: $LETTER'" in cot and f"{gold}) photon" in cot
    assert all(f"{letter}) {text}" in cot for letter, text in choices.items())
    olympiad = benchmarks.get("olympiadbench").prompt(OLYMPIAD[0], "cot")
    assert "So the final answer is \\boxed{multiple answers connected with commas}." in olympiad
    assert "each of them should be a numerical value" in olympiad
    assert "(unit)" in benchmarks.get("olympiadbench").prompt(OLYMPIAD[3], "cot")
    vision = benchmarks.get("mathvision").prompt(MATHVISION[0], "lmmr1")
    assert vision.startswith("Question: Which number") and "(B) 2" in vision and "<image1>" not in vision
    assert "provide the correct option letter" in vision
    assert "latex expression" in benchmarks.get("mathvision").prompt(MATHVISION[1], "cot")
    assert "two decimal places" in benchmarks.get("mathvision").prompt(MATHVISION[2], "lmmr1")
    star = benchmarks.get("mmstar").prompt(MMSTAR[0], "lmmr1")
    assert star.endswith("Answer with the option's letter from the given choices directly")
    assert benchmarks.get("mathvista").prompt(MATHVISTA[0], "lmmr1") == MATHVISTA[0]["query"]


def test_mathverse_versions_prompts_and_question_types():
    bench = benchmarks.get("mathverse")
    assert [bench.details(row)["version"] for row in MATHVERSE] == ["Text Dominant", "Vision Only", "Text Lite",
                                                                      "Text Only"]
    assert [bench.details(row)["question_type"] for row in MATHVERSE] == ["multi-choice"] * 2 + ["free-form"] * 2
    assert bench.prompt(MATHVERSE[0], "lmmr1") == MATHVERSE[0]["question"]
    assert bench.prompt(MATHVERSE[1], "lmmr1") == MATHVERSE[1]["query_wo"]  # Vision Only: the question is in the image
    assert bench.prompt(MATHVERSE[1], "cot") == MATHVERSE[1]["query_cot"].strip()
    assert bench.letters(MATHVERSE[0]) == "ABCD" and bench.letters(MATHVERSE[2]) == ""
    assert len(bench.to_example(MATHVERSE[3]).images) == 0  # Text Only has no image
    assert bench.to_example(MATHVERSE[0]).meta["version"] == "Text Dominant"


def test_mmstar_categories_in_details():
    bench = benchmarks.get("mmstar")
    assert [bench.details(row) for row in MMSTAR] == [
        {"category": "instance reasoning", "l2_category": "cross-instance relation reasoning"},
        {"category": "fine-grained perception", "l2_category": "object counting"}]
    assert bench.to_example(MMSTAR[1]).meta["l2_category"] == "object counting"


def test_gpqa_options_are_shuffled_stably_under_a_seed():
    many = [dict(GPQA[0], Question=f"Question {i}?") for i in range(40)]
    first = [gpqa.options(row) for row in many]
    assert first == [gpqa.options(row) for row in many]  # same row, same order, every call
    for (choices, gold), row in zip(first, many):
        assert choices[gold] == row["Correct Answer"] and sorted(choices.values()) == sorted(
            [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)])
    assert len({gold for _, gold in first}) == 4  # the correct answer is not always in one place
    assert [gpqa.options(row, seed=1) for row in many] != first  # the benchmark seed changes the order
    # pinned: the order depends on no per-process salt (hash()), so another process gives the same letters
    assert "".join(gold for _, gold in first[:8]) == PINNED_GPQA_LETTERS
    assert benchmarks.get("gpqa_diamond").gold(GPQA[0]) == gpqa.options(GPQA[0])[1]


PINNED_GPQA_LETTERS = "CDAADDAB"


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def test_images_decode_lazily_from_every_published_form(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(30):
        Image.new("RGB", (20 + i, 10), "blue").save(tmp_path / "images" / f"{i}.png")
    bench = benchmarks.get("mathvista")
    rows = [dict(MATHVISTA[1], pid=str(i), image=f"images/{i}.png") for i in range(30)]
    before = open_descriptors()
    examples = [bench.to_example(row, "cot", tmp_path) for row in rows]
    assert all(isinstance(e.images, LazyImages) for e in examples)
    decoded = [image for e in examples for image in e.images]
    assert [im.size for im in decoded] == [(20 + i, 10) for i in range(30)]
    assert {im.mode for im in decoded} == {"RGB"}
    assert open_descriptors() == before  # every file closed after decoding
    # a {"bytes", "path"} dict (parquet), a PIL image (datasets), a path: all give RGB images
    from_bytes = benchmarks.get("mmstar").to_example(MMSTAR[0]).images[0]
    pil_row = dict(MATHVISION[0], decoded_image=Image.new("L", (5, 6)))
    from_pil = benchmarks.get("mathvision").to_example(pil_row).images[0]
    assert (from_bytes.size, from_bytes.mode, from_pil.size, from_pil.mode) == ((32, 24), "RGB", (5, 6), "RGB")
    with pytest.raises(ValueError, match="not found"):
        bench.to_example(dict(rows[0], image="images/missing.png"), "cot", tmp_path).images[0]


# ------------------------------------------------------------------------------------------------
# Loading local copies
# ------------------------------------------------------------------------------------------------
def test_load_rows_reads_jsonl_json_parquet_and_datasets_dirs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "math500.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in MATH500) + "\n")
    assert benchmarks.load_rows("math500", jsonl) == MATH500
    array = tmp_path / "gpqa.json"
    array.write_text(json.dumps(GPQA))
    assert benchmarks.load_rows("gpqa_diamond", array) == GPQA
    parquet = tmp_path / "mmstar.parquet"
    pq.write_table(pa.Table.from_pylist(MMSTAR), parquet)
    rows = benchmarks.load_rows("mmstar", parquet)
    assert rows[0]["image"]["bytes"] == MMSTAR[0]["image"]["bytes"]
    assert benchmarks.get("mmstar").score(rows[1], "\\boxed{C}") == 1.0
    assert benchmarks.get("mmstar").to_example(rows[1]).images[0].size == (32, 24)

    import datasets
    dataset = datasets.Dataset.from_list([{k: v for k, v in row.items() if k != "meta_info"} for row in MMSTAR])
    dataset = dataset.cast_column("image", datasets.Image())
    datasets.DatasetDict({"val": dataset}).save_to_disk(str(tmp_path / "mmstar_disk"))
    rows = benchmarks.load_rows("mmstar", tmp_path / "mmstar_disk")
    assert [row["answer"] for row in rows] == ["A", "C"] and rows[0]["image"]["bytes"]  # undecoded until used
    assert benchmarks.get("mmstar").to_example(rows[0]).images[0].mode == "RGB"


def test_load_rows_names_file_row_and_missing_column(tmp_path):
    path = tmp_path / "mathvista.jsonl"
    broken = [MATHVISTA[0], {k: v for k, v in MATHVISTA[1].items() if k != "answer_type"}]
    path.write_text("\n".join(json.dumps(row) for row in broken))
    with pytest.raises(ConfigError) as err:
        benchmarks.load_rows("mathvista", path)
    assert str(path) in str(err.value) and "row 1" in str(err.value) and "'answer_type'" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="no such file"):
        benchmarks.load_rows("math500", tmp_path / "absent.jsonl")


def test_load_rows_from_the_hub_turns_network_errors_into_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match="needs the network or a local copy"):
        benchmarks.load_rows("math500")
    with pytest.raises(ConfigError, match="AI4Math/MathVista"):
        benchmarks.load_rows("mathvista", "AI4Math/MathVista")


# ------------------------------------------------------------------------------------------------
# Sokoban
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_files", [False, True])
def test_sokoban_levels_prompts_and_scores(tmp_path, env_files):
    path = sokoban.write_levels(tmp_path, 3, seed=1, env_files=env_files)
    rows = benchmarks.load_rows("sokoban", path)
    bench = benchmarks.get("sokoban")
    assert len(rows) == 3 and all(row["level"] for row in rows)
    example = bench.to_example(rows[0], "lmmr1")
    level = sokoban.level_text(rows[0])
    assert example.meta["level"] == level and example.answer == rows[0]["solution"] and "left" in example.prompt
    from lmmr1_lite.rewards import REWARDS
    assert REWARDS["sokoban"]([r1(rows[0]["solution"]), r1("up")], [example, example]) == [1.0, 0.0]
    assert example.images[0].size == (28 * level.find("/"), 28 * len(level.split("/")))
    completions = [r1(rows[0]["solution"]), f"Plan...\n\\boxed{{{rows[1]['solution']}}}", r1("up"),
                   r1("jump, " + rows[2]["solution"])]
    assert bench.score_batch([rows[0], rows[1], rows[0], rows[2]], completions) == [1.0, 1.0, 0.0, 0.0]


def test_sokoban_rows_with_a_level_string_or_newlines():
    bench = benchmarks.get("sokoban")
    assert bench.score({"level": "#####/#@$.#/#####"}, r1("right")) == 1.0
    assert bench.score({"level": "#####\n#@$.#\n#####\n"}, "Push it once: \\boxed{R}") == 1.0
    assert bench.score({"level": "#####/#@$.#/#####"}, r1("left")) == 0.0
    assert bench.score({"level": "#####/#@$.#/####"}, r1("right")) == 1.0  # ragged rows are padded
    assert bench.missing({"answer": ""}) == "level (or env_path)"
